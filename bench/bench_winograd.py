"""im2col against Winograd F(2×2, 3×3), layer by layer: time and float32 error.

    python bench/bench_winograd.py                      # the 3x3 layers of demo and depth8
    python bench/bench_winograd.py --nets depth8 --repeats 7 --no-error

For every distinct 3×3 stride-1 layer shape of the chosen networks (``timing.NETWORKS``, at
their batch size): forward + backward (dx and dW) of each algorithm, timed alternately
(im2col, Winograd, im2col, ...), medians and their ratio (above 1: Winograd is faster); then
the float32 error of each against the float64 result, max|a - ref| / max|ref| for the output,
dx and dW, on a batch of 8.  Also prints what ``algo="auto"`` picks for the shape.
"""
import argparse
import os
import sys
import time

import numpy as np

from minicompact.layers import Conv2D
from minicompact.layers.conv import conv2d_backward, conv2d_forward
from minicompact.model import ModelConfig, dictionary_sizes
from minicompact.winograd import winograd_backward, winograd_forward
from timing import NETWORKS


def layer_shapes(net):
    """(C, K, side) of each 3×3 stride-1 conv of a ``NETWORKS`` entry, in data order."""
    cfg = ModelConfig(depth=net["depth"], width_mult=net["width_mult"], stem=net["stem"])
    sizes = dictionary_sizes(cfg.depth, cfg.widths, cfg.width_mult)
    side, channels, out = net["image_size"], cfg.in_channels, []
    for k, (ks, sc, sp) in zip(sizes, cfg.feature_layers()):
        side = (side + 2 * (ks // 2) - ks) // sc + 1
        if ks == 3 and sc == 1:
            out.append((channels, k, side))
        side = (side + 2 - 3) // sp + 1
        channels = k
    return out


def steps(x, W, dout):
    def im2col_step():
        out, cols = conv2d_forward(x, W, 1, 1)
        conv2d_backward(dout, cols, W, x.shape, 1, 1, overwrite_cols=True)

    def winograd_step():
        out, V = winograd_forward(x, W, 1)
        winograd_backward(dout, V, W, x.shape, 1)
    return im2col_step, winograd_step


def rel(a, ref):
    return float(np.abs(a.astype(np.float64) - ref).max() / np.abs(ref).max())


def errors(c, k, side, rng):
    """Float32 relative errors (y, dx, dW) of im2col and Winograd against float64."""
    x = rng.standard_normal((8, c, side, side))
    W = rng.standard_normal((k, c, 3, 3)) * np.sqrt(2 / (9 * c))
    y, cols = conv2d_forward(x, W, 1, 1)
    dout = rng.standard_normal(y.shape)
    ref = (y,) + conv2d_backward(dout, cols, W, x.shape, 1, 1)
    x32, W32, d32 = x.astype(np.float32), W.astype(np.float32), dout.astype(np.float32)
    y, cols = conv2d_forward(x32, W32, 1, 1)
    im = (y,) + conv2d_backward(d32, cols, W32, x.shape, 1, 1)
    y, V = winograd_forward(x32, W32, 1)
    wi = (y,) + winograd_backward(d32, V, W32, x.shape, 1)
    return [rel(a, r) for a, r in zip(im, ref)], [rel(b, r) for b, r in zip(wi, ref)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", default="demo,depth8", help=f"comma-separated, from {', '.join(NETWORKS)}")
    ap.add_argument("--repeats", type=int, default=5, help="timed pairs per layer shape")
    ap.add_argument("--no-error", action="store_true", help="skip the float32 error table")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.nets.split(",") if n.strip()]
    unknown = [n for n in names if n not in NETWORKS]
    if unknown:
        ap.exit(2, f"bench_winograd.py: error: unknown network(s) {unknown}; choose from {list(NETWORKS)}\n")
    rng = np.random.default_rng(0)
    print(f"float32, forward + backward, median of {args.repeats} alternating pairs; load average "
          f"{os.getloadavg()[0]:.2f}; OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
    print(f"{'net':<7s} {'batch':>5s} {'C':>4s} {'K':>4s} {'side':>4s} {'im2col ms':>10s} "
          f"{'winograd ms':>11s} {'speed-up':>8s} {'auto':>8s}")
    seen, total = set(), {}
    for name in names:
        net = NETWORKS[name]
        n = net["batch"]
        for c, k, side in layer_shapes(net):
            x = rng.standard_normal((n, c, side, side), dtype=np.float32)
            W = (rng.standard_normal((k, c, 3, 3)) * np.sqrt(2 / (9 * c))).astype(np.float32)
            dout = rng.standard_normal((n, k, side, side), dtype=np.float32)
            a, b = steps(x, W, dout)
            a(), b()   # warm-up: buffers, BLAS threads
            ta, tb = [], []
            for _ in range(args.repeats):
                for fn, store in ((a, ta), (b, tb)):
                    t0 = time.perf_counter()
                    fn()
                    store.append(time.perf_counter() - t0)
            ma, mb = float(np.median(ta)), float(np.median(tb))
            tot = total.setdefault(name, [0.0, 0.0])
            tot[0] += ma
            tot[1] += mb
            layer = Conv2D(c, k, 3, padding=1, algo="auto")
            layer.params["W"] = W
            pick = layer.algorithm(x)   # what auto measures and keeps for this shape
            print(f"{name:<7s} {n:>5d} {c:>4d} {k:>4d} {side:>4d} {1e3 * ma:>10.1f} {1e3 * mb:>11.1f} "
                  f"{ma / mb:>8.2f} {pick:>8s}", flush=True)
            seen.add((c, k, side))
    for name, (ta, tb) in total.items():
        print(f"{name}: all 3x3 layers, im2col {1e3 * ta:.0f} ms, winograd {1e3 * tb:.0f} ms, "
              f"speed-up {ta / tb:.2f}")
    if not args.no_error:
        print("\nfloat32 error against float64, max|a - ref| / max|ref| (batch 8, He-initialised W)")
        print(f"{'C':>4s} {'K':>4s} {'side':>4s} | {'im2col y':>9s} {'dx':>8s} {'dW':>8s} | "
              f"{'winograd y':>10s} {'dx':>8s} {'dW':>8s} | {'worst ratio':>11s}")
        for c, k, side in sorted(seen):
            im, wi = errors(c, k, side, rng)
            ratio = max(w / i for w, i in zip(wi, im))
            print(f"{c:>4d} {k:>4d} {side:>4d} | {im[0]:>9.1e} {im[1]:>8.1e} {im[2]:>8.1e} | "
                  f"{wi[0]:>10.1e} {wi[1]:>8.1e} {wi[2]:>8.1e} | {ratio:>11.2f}")
    print(f"(load average {os.getloadavg()[0]:.2f} at the end)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

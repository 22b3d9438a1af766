"""Thinning's speed and memory: dense vs thin vs thin with compact convolutions, for one model.

    python bench/bench_thin.py runs/x/model.npz                 # a run's model (thinned here)
    python bench/bench_thin.py runs/x/model.npz --batch 64 --pairs 9
    python bench/bench_thin.py --layer 128 128 16 --blocks 2     # one conv: Γ pattern of 2 blocks
    python bench/bench_thin.py --layer 128 128 16 --density 0.5  # one conv: random zero groups

A model file: thins it (``minicompact.thin.thin_model``, after the run's threshold),
decides per conv layer whether ``CompactConv2D`` is faster (``choose_convs``; CompactNets
only: a VGG11 or ResNet18 is timed dense and thin) and prints
images/s of inference (evaluation mode, one random batch of the run's image size) for the
three networks, timed in alternating order (A, B, C, A, B, C, ...) and reported as the
median over --pairs rounds; the peak memory one forward allocates (``tracemalloc``, which
sees NumPy's buffers) and the parameter bytes; then each conv's dense and compact times.

``--layer K C H``: one 3×3 conv, K filters reading C channels of H×H maps, batch --batch,
whose zero groups Θ[k, t] form ``--blocks`` diagonal blocks (filters and channels then
shuffled) or are random with ``--density``; prints dense vs compact ms and the ratio.
The machine is shared: the load average is printed before and after; read ratios.
"""
import argparse
import os
import time
import tracemalloc

import numpy as np

from minicompact.layers.compact_conv import CompactConv2D, dense_fraction
from minicompact.layers.conv import Conv2D
from minicompact.model import CompactNet
from minicompact.thin import choose_convs, load_dense, thin_model


def alternate(calls, x, pairs):
    """Median seconds of each call on x, the calls interleaved round by round."""
    for f in calls.values():
        f(x)
    times = {k: [] for k in calls}
    for _ in range(pairs):
        for k, f in calls.items():
            t0 = time.perf_counter()
            f(x)
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def peak_bytes(model, x):
    """Peak bytes allocated during one forward (the model's caches dropped first and after)."""
    model.release_caches()
    tracemalloc.start()
    model.forward(x)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    model.release_caches()
    return peak


def param_bytes(model):
    return sum(p.nbytes for layer in model.layers for p in layer.params.values())


def bench_model(args):
    dense, state, settings = load_dense(args.model)
    threshold = settings.get("threshold")
    if threshold:
        from minicompact.metrics import threshold_
        threshold_(dense.thetas() + [dense.classifier.params["W"]], threshold)
    thin, record = thin_model(dense)
    size = args.image_size or settings.get("image_size", 32)
    batch = args.batch or settings.get("batch_size", 32)
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    models, convs = {"dense": dense.eval(), "thin": thin}, []
    if isinstance(thin, CompactNet):        # choose_convs walks a CompactNet's chain
        fast = CompactNet(thin.config).load_state_arrays(thin.state_arrays()).eval()
        convs = choose_convs(fast, x, repeats=args.pairs)
        models["thin+compact"] = fast
    print(f"{args.model}: widths {record['widths_before']} -> {record['widths_after']}, "
          f"parameters {record['params_before']:,} -> {record['params_after']:,}; "
          f"batch {batch} x {size} px; load average before {os.getloadavg()[0]:.1f}")
    secs = alternate({k: m.forward for k, m in models.items()}, x, args.pairs)
    print(f"{'network':<14}{'images/s':>10}{'vs dense':>10}{'peak MB':>10}{'params MB':>11}")
    for k, m in models.items():
        print(f"{k:<14}{batch / secs[k]:>10.0f}{secs['dense'] / secs[k]:>9.2f}x"
              f"{peak_bytes(m, x) / 2**20:>10.1f}{param_bytes(m) / 2**20:>11.3f}")
    if convs:
        print(f"{'layer':<8}{'groups':>7}{'computed':>10}{'dense ms':>10}{'compact ms':>12}  choice")
    for c in convs:
        d = "-" if c["dense_ms"] is None else f"{c['dense_ms']:.2f}"
        k = "-" if c["compact_ms"] is None else f"{c['compact_ms']:.2f}"
        print(f"{c['layer']:<8}{c['groups']:>7}{100 * c['computed']:>9.0f}%{d:>10}{k:>12}  {c['choice']}")
    print(f"load average after {os.getloadavg()[0]:.1f}")


def bench_layer(args):
    k, c, h = args.layer
    rng = np.random.default_rng(0)
    W = rng.standard_normal((k, c, 3, 3), dtype=np.float32)
    if args.blocks:
        mask = np.zeros((k, c), dtype=bool)
        for g in range(args.blocks):
            mask[g * k // args.blocks:(g + 1) * k // args.blocks, g * c // args.blocks:(g + 1) * c // args.blocks] = True
        mask = mask[rng.permutation(k)][:, rng.permutation(c)]
        what = f"{args.blocks} diagonal blocks (shuffled)"
    else:
        mask = rng.random((k, c)) < args.density
        what = f"random groups, density {args.density:g}"
    W *= mask[:, :, None, None]
    x = rng.standard_normal((args.batch or 32, c, h, h), dtype=np.float32)
    dense = Conv2D(c, k, 3, padding=1)
    dense.params["W"] = W
    compact = CompactConv2D(W, padding=1)
    dense.eval(), compact.eval()
    load = os.getloadavg()[0]
    secs = alternate({"dense": dense.forward, "compact": compact.forward}, x, args.pairs)
    print(f"conv 3x3 {c}->{k} on {x.shape[0]}x{c}x{h}x{h}, {what}: layer sparsity "
          f"{100 * (1 - mask.mean()):.0f}%, {len(compact.groups)} groups computing "
          f"{100 * dense_fraction(compact.groups, k, c):.0f}% of the channel pairs")
    print(f"dense {1e3 * secs['dense']:.2f} ms, compact {1e3 * secs['compact']:.2f} ms: "
          f"{secs['dense'] / secs['compact']:.2f}x (median of {args.pairs} alternating pairs; "
          f"load average {load:.1f} -> {os.getloadavg()[0]:.1f})")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", help="a run's model.npz / best.npz / last.npz")
    p.add_argument("--batch", type=int, help="images per forward (default: the run's batch, 32)")
    p.add_argument("--image-size", type=int, help="default: the run's")
    p.add_argument("--pairs", type=int, default=7, help="alternating timing rounds (median)")
    p.add_argument("--layer", type=int, nargs=3, metavar=("K", "C", "H"), help="one synthetic conv")
    p.add_argument("--blocks", type=int, default=0, help="--layer: zero pattern of this many blocks")
    p.add_argument("--density", type=float, default=0.5, help="--layer: share of live groups (random)")
    args = p.parse_args()
    if args.layer:
        bench_layer(args)
    elif args.model:
        bench_model(args)
    else:
        p.error("give a model file or --layer K C H")


if __name__ == "__main__":
    main()

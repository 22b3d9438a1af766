"""Time forward and backward of each CompactNet layer at realistic sizes.

    python bench/bench_layers.py --device cpu --dtype float32 --repeats 5

Prints the median milliseconds per call and, for the convolutions, GFLOP/s (forward is one
GEMM of 2·N·K·C·kh·kw·Ho·Wo flops, backward two of them).  For the memory-bound layers
(batch-norm, ReLU, max-pool, pyramid) it prints the achieved bandwidth in GB/s, counting the
least traffic any implementation needs: forward reads x once and writes y once; backward
reads x (or what stands for it) and dout once and writes dx once.  Compare it with the
device's memory bandwidth (an H100 or H200 moves 3–5 TB/s; the target is at least half).
The "(paper)" rows are the largest maps of the paper network at batch 64: 128 maps of
56×56 in layers 2–4, 512 maps of 14×14 into the pyramid.  A layer whose module is not
importable yet is skipped with a note.
"""
import argparse
import importlib
import time

import numpy as np


from minicompact.backend import array_module, resolve_device, set_precision, synchronize


def _layer_class(module, name):
    """minicompact.layers.<module>.<name>, or None with a note when it does not import."""
    try:
        return getattr(importlib.import_module(f"minicompact.layers.{module}"), name)
    except (ImportError, AttributeError) as exc:
        print(f"  skipping {name}: {type(exc).__name__}: {exc}")
        return None


def cases(n):
    """(label, module, class name, constructor args, input shape, forward flops or None);
    memory-bound layers have flops None and get GB/s instead."""
    def conv_flops(c, k, ks, ho, wo):
        return 2 * n * k * c * ks * ks * ho * wo
    return [
        ("conv 3x3 128->128, 28x28", "conv", "Conv2D", (128, 128, 3, 1, 1), (n, 128, 28, 28),
         conv_flops(128, 128, 3, 28, 28)),
        ("conv 7x7/2 3->64, 224x224", "conv", "Conv2D", (3, 64, 7, 2, 3), (n, 3, 224, 224),
         conv_flops(3, 64, 7, 112, 112)),
        ("  same, need_input_grad=False", "conv", "Conv2D", (3, 64, 7, 2, 3, np.float32, None, False),
         (n, 3, 224, 224), conv_flops(3, 64, 7, 112, 112)),
        ("batchnorm 128, 28x28", "batchnorm", "BatchNorm2D", (128,), (n, 128, 28, 28), None),
        ("relu 128, 28x28", "activations", "ReLU", (), (n, 128, 28, 28), None),
        ("maxpool 3x3/1 128, 28x28", "pooling", "MaxPool2D", (3, 1, 1), (n, 128, 28, 28), None),
        ("maxpool 3x3/2 128, 28x28", "pooling", "MaxPool2D", (3, 2, 1), (n, 128, 28, 28), None),
        ("spp (1,2,4) 128, 7x7", "pooling", "SpatialPyramidPool", ((1, 2, 4),), (n, 128, 7, 7), None),
        ("classifier 128x21 -> 1000", "classifier", "SoftmaxClassifier", (128, 21, 1000),
         (n, 128, 21), 2 * n * 128 * 21 * 1000),
        ("batchnorm 128, 56x56 (paper)", "batchnorm", "BatchNorm2D", (128,), (n, 128, 56, 56), None),
        ("relu 128, 56x56 (paper)", "activations", "ReLU", (), (n, 128, 56, 56), None),
        ("maxpool 3x3/1 128, 56x56 (paper)", "pooling", "MaxPool2D", (3, 1, 1), (n, 128, 56, 56), None),
        ("maxpool 3x3/2 256, 56x56 (paper)", "pooling", "MaxPool2D", (3, 2, 1), (n, 256, 56, 56), None),
        ("spp (1,2,4) 512, 14x14 (paper)", "pooling", "SpatialPyramidPool", ((1, 2, 4),),
         (n, 512, 14, 14), None),
    ]


def traffic(x, out):
    """Least bytes moved: forward reads x and writes out; backward reads x and dout, writes dx."""
    return x.nbytes + out.nbytes, 2 * x.nbytes + out.nbytes


def median_ms(fn, repeats):
    """Median wall time of fn() in ms over ``repeats`` calls, GPU work included."""
    times = []
    for _ in range(repeats):
        synchronize()
        t0 = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu", "auto"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--only", default="", help="run only the layers whose label contains this")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "tf32"],
                    help="tf32: CuPy's float32 GEMMs on TF32 tensor cores (GPU only)")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    set_precision(args.precision)
    xp = array_module(device)
    dtype = np.dtype(args.dtype)
    rng = np.random.default_rng(0)
    print(f"device {device}, dtype {dtype} ({args.precision}), batch {args.batch}, median of {args.repeats}")
    print(f"{'layer':34s} {'fwd ms':>9s} {'bwd ms':>9s} {'total ms':>9s} {'fwd GF/s':>9s} "
          f"{'bwd GF/s':>9s} {'fwd GB/s':>9s} {'bwd GB/s':>9s}")
    for label, module, name, ctor, shape, flops in cases(args.batch):
        if args.only not in label:
            continue
        cls = _layer_class(module, name)
        if cls is None:
            continue
        layer = cls(*ctor).astype(dtype).to(device)
        x = xp.asarray(rng.standard_normal(shape, dtype=np.float32).astype(dtype))
        out = layer.forward(x)
        dout = xp.asarray(rng.standard_normal(out.shape, dtype=np.float32).astype(dtype))
        layer.backward(dout)                       # warm-up: allocations, caches
        fwd = median_ms(lambda: layer.forward(x), args.repeats)
        # backward may need the forward just before it (Conv2D reuses its cache as scratch)
        both = median_ms(lambda: (layer.forward(x), layer.backward(dout)), args.repeats)
        bwd = both - fwd
        if flops:
            bwd_flops = flops if getattr(layer, "need_input_grad", True) is False else 2 * flops
            rate = f"{flops / fwd / 1e6:9.1f} {bwd_flops / bwd / 1e6:9.1f}"   # GFLOP/s
        else:
            fwd_bytes, bwd_bytes = traffic(x, out)
            rate = f"{'':9s} {'':9s} {fwd_bytes / fwd / 1e6:9.1f} {bwd_bytes / bwd / 1e6:9.1f}"
        print(f"{label:34s} {fwd:9.2f} {bwd:9.2f} {both:9.2f} {rate}")
        layer = x = out = dout = None  # free before the next case


if __name__ == "__main__":
    main()

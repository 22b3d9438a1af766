"""Time forward and backward of each CompactNet layer at realistic sizes.

    python bench/bench_layers.py --device cpu --dtype float32 --repeats 5

Prints the median milliseconds per call and, for the convolutions, GFLOP/s (forward is one
GEMM of 2·N·K·C·kh·kw·Ho·Wo flops, backward two of them).  A layer whose module is not
importable yet is skipped with a note.
"""
import argparse
import importlib
import time

import numpy as np


from minicompact.backend import array_module, resolve_device, synchronize


def _layer_class(module, name):
    """minicompact.layers.<module>.<name>, or None with a note when it does not import."""
    try:
        return getattr(importlib.import_module(f"minicompact.layers.{module}"), name)
    except (ImportError, AttributeError) as exc:
        print(f"  skipping {name}: {type(exc).__name__}: {exc}")
        return None


def cases(n):
    """(label, module, class name, constructor args, input shape, forward flops or None)."""
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
         (n, 128, 21), None),
    ]


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
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    xp = array_module(device)
    dtype = np.dtype(args.dtype)
    rng = np.random.default_rng(0)
    print(f"device {device}, dtype {dtype}, batch {args.batch}, median of {args.repeats}")
    print(f"{'layer':28s} {'fwd ms':>9s} {'bwd ms':>9s} {'total ms':>9s} {'fwd GF/s':>9s} "
          f"{'bwd GF/s':>9s}")
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
        gf = (f"{flops / fwd / 1e6:9.1f} {2 * flops / bwd / 1e6:9.1f}" if flops else "")
        if getattr(layer, "need_input_grad", True) is False:
            gf = f"{flops / fwd / 1e6:9.1f} {flops / bwd / 1e6:9.1f}"   # backward: dW only
        print(f"{label:28s} {fwd:9.2f} {bwd:9.2f} {both:9.2f} {gf}")
        layer = x = out = dout = None  # free before the next case


if __name__ == "__main__":
    main()

"""Time one training step (forward, backward, regularizer, SGD update) of a whole CompactNet.

    python bench/bench_model.py                                   # the demo preset's network
    python bench/bench_model.py --width-mult 0.25 --image-size 64 --batch 64
    python bench/bench_model.py --device gpu --width-mult 1 --image-size 224 --stem imagenet

Prints milliseconds per step and images per second (median of --repeats steps after one
warm-up step), and the share of the step spent in each kind of layer.
"""
import argparse
import time
from collections import defaultdict

import numpy as np


from minicompact.backend import array_module, resolve_device, synchronize
from minicompact.losses import softmax_cross_entropy
from minicompact.model import CompactNet, ModelConfig
from minicompact.objective import Regularizer
from minicompact.optim import SGD
from minicompact.regularizers import variant


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--width-mult", type=float, default=0.0625)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--stem", default="small", choices=["small", "imagenet"])
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu", "auto"])
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    xp = array_module(device)
    cfg = ModelConfig(depth=args.depth, num_classes=args.classes, width_mult=args.width_mult, stem=args.stem)
    model = CompactNet(cfg, seed=0).to(device)
    opt = SGD(model.param_layers, lr=0.01, momentum=0.9)
    reg = Regularizer(model, variant("compact", args.depth, 0.03))
    rng = np.random.default_rng(0)
    x = xp.asarray(rng.standard_normal((args.batch, 3, args.image_size, args.image_size), dtype=np.float32))
    y = xp.asarray(rng.integers(0, args.classes, args.batch))

    per_kind = defaultdict(float)

    def timed(layer, fn, arg):
        t0 = time.perf_counter()
        out = fn(arg)
        synchronize(out)
        per_kind[type(layer).__name__] += time.perf_counter() - t0
        return out

    def step():
        h = x
        for layer in model.layers:
            h = timed(layer, layer.forward, h)
        _, d = softmax_cross_entropy(h, y)
        for layer in reversed(model.layers):
            d = timed(layer, layer.backward, d)
        t0 = time.perf_counter()
        reg.add_gradient()  # what objective.objective adds after the backward
        opt.step()
        reg.after_step(opt.lr)
        synchronize()
        per_kind["SGD + regularizer"] += time.perf_counter() - t0

    step()
    per_kind.clear()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    ms = 1e3 * float(np.median(times))
    print(f"device {device}; depth {args.depth}, width x{args.width_mult:g}, {args.image_size}px "
          f"({args.stem} stem), batch {args.batch}, {model.parameter_count():,} parameters")
    print(f"training step: {ms:.1f} ms median of {args.repeats}, {1e3 * args.batch / ms:.0f} images/s")
    total = sum(per_kind.values())
    for kind, t in sorted(per_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<20s} {100 * t / total:5.1f}%")


if __name__ == "__main__":
    main()

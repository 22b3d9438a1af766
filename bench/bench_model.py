"""Time one training step (forward, backward, regularizer, SGD update) of a whole CompactNet.

    python bench/bench_model.py                                   # the demo preset's network
    python bench/bench_model.py --net depth8                      # a network of the speed table
    python bench/bench_model.py --width-mult 0.25 --image-size 64 --batch 64
    python bench/bench_model.py --device gpu --net paper --precision tf32

Prints milliseconds per step and images per second: the median of --repeats whole steps
after --warmup steps, each step timed with no sync inside it (one at its end, for the GPU's
queue).  Then, from a separate pass that syncs after every layer, the share of the step
spent in each kind of layer (those syncs make that pass slower than a real step).
"""
import argparse

import numpy as np

from minicompact.backend import resolve_device, set_precision, synchronize
from timing import NETWORKS, Setup, describe, layer_times, timed


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", choices=sorted(NETWORKS), default="demo",
                    help="a network of the speed table (the flags below override its fields)")
    ap.add_argument("--depth", type=int)
    ap.add_argument("--width-mult", type=float)
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--stem", choices=["small", "imagenet"])
    ap.add_argument("--classes", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu", "auto"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "tf32"],
                    help="tf32: CuPy's float32 GEMMs on TF32 tensor cores (GPU only)")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    set_precision(args.precision)
    net = dict(NETWORKS[args.net])
    for key in ("depth", "width_mult", "image_size", "stem", "classes", "batch"):
        if getattr(args, key) is not None:
            net[key] = getattr(args, key)
    setup = Setup(net, device)
    for _ in range(args.warmup):
        setup.step()
    times = [timed(setup.step, synchronize) for _ in range(args.repeats)]
    ms = 1e3 * float(np.median(times))
    print(f"device {device} ({args.precision}); {describe(net)}; "
          f"{setup.model.parameter_count():,} parameters")
    print(f"training step: {ms:.1f} ms median of {args.repeats} (min {1e3 * min(times):.1f}), "
          f"{1e3 * net['batch'] / ms:.0f} images/s")
    shares = layer_times(setup)
    total = sum(shares.values())
    print(f"per layer kind (separate pass, a sync after every layer: {1e3 * total:.1f} ms in all):")
    for kind, t in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<20s} {1e3 * t:8.2f} ms  {100 * t / total:5.1f}%")


if __name__ == "__main__":
    main()

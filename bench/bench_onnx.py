"""Images per second of exported networks in ONNX Runtime (CPU): a dense model against its thinning.

    python bench/bench_onnx.py runs/x/model.npz runs/x/thin/thin.npz
    python bench/bench_onnx.py runs/x/model.npz runs/x/thin/thin.npz --batches 1,64 --threads 1 --json out.json

Each checkpoint is exported as ``run.py --export`` does (``export.to_onnx``, the run's crop
size and normalisation) and run in one ONNX Runtime session with ``--threads`` intra-op
threads, on random uint8 crops (the speed does not depend on the pixels).  The models take
turns, ``--rounds`` times, each turn the median of ``--calls`` calls after one warm-up, so that
a change in the machine's load touches both alike; the figure is the best turn's.  Prints
images/s per model and batch, the speed-up of each model over the first, and the ONNX file
sizes; ``--json`` also writes them.  Needs ``pip install -e ".[onnx]"``.
"""
import argparse
import json
import os
import statistics
import time

import numpy as np
import onnxruntime

from minicompact.data.transforms import scaled_sizes
from minicompact.export import to_onnx
from minicompact.thin import load_dense


def exported(path):
    """(name, serialized ONNX model, crop) of a checkpoint, exported as run.py --export does."""
    model, state, settings = load_dense(path)
    _, crop = scaled_sizes(settings.get("image_size", 224))
    proto = to_onnx(model, crop, state["mean"], state["std"])
    return os.path.relpath(path), proto.SerializeToString(), crop, model.parameter_count()


def images_per_second(run, x, calls):
    """Median images/s of ``calls`` calls of the session ``run`` on ``x`` (after one warm-up)."""
    run.run(["scores"], {"image": x})
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        run.run(["scores"], {"image": x})
        times.append(time.perf_counter() - t0)
    return len(x) / statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", help="the first is the baseline (e.g. model.npz, then thin.npz)")
    ap.add_argument("--batches", default="1,64", help="comma-separated batch sizes")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    ap.add_argument("--rounds", type=int, default=5, help="turns each model takes")
    ap.add_argument("--calls", type=int, default=20, help="timed calls per turn")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    models = [exported(p) for p in args.checkpoints]
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = args.threads
    sessions = [onnxruntime.InferenceSession(m[1], options, providers=["CPUExecutionProvider"]) for m in models]
    rng = np.random.default_rng(0)
    result = {"threads": args.threads, "load_average": os.getloadavg()[0], "models": [
        {"checkpoint": name, "onnx_bytes": len(blob), "parameters": params, "images_per_s": {}}
        for name, blob, _, params in models]}
    for batch in [int(b) for b in args.batches.split(",")]:
        best = [0.0] * len(models)
        for _ in range(args.rounds):
            for i, ((_, _, crop, _), run) in enumerate(zip(models, sessions)):
                x = rng.integers(0, 256, size=(batch, 3, crop, crop), dtype=np.uint8)
                best[i] = max(best[i], images_per_second(run, x, args.calls))
        for record, speed in zip(result["models"], best):
            record["images_per_s"][str(batch)] = speed
    print(f"ONNX Runtime {onnxruntime.__version__}, {args.threads} thread(s), load average "
          f"{result['load_average']:.1f}")
    base = result["models"][0]
    for record in result["models"]:
        speeds = ", ".join(f"batch {b}: {v:,.0f} img/s ({v / base['images_per_s'][b]:.2f}x)"
                           for b, v in record["images_per_s"].items())
        print(f"  {record['checkpoint']}: {record['parameters']:,} parameters, {record['onnx_bytes']:,} bytes; "
              f"{speeds}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

"""Kernel launches and bytes of one training step on a GPU, counted on the CPU, and the step
time they imply.

    python bench/gpu_budget.py                          # demo and depth 8 ×¼, kernels off and on
    python bench/gpu_budget.py --nets demo,depth8,paper # the paper network too (slow on a CPU)
    python bench/gpu_budget.py --kernels off            # the twins' operations only (today's code)
    python bench/gpu_budget.py --fit                    # refit the model's constants
    python bench/gpu_budget.py --json -                 # the counts as JSON (tests read this)

One steady-state step (forward, loss, backward, regularizer, SGD with momentum: the step
``training.trainer.Trainer`` runs, through ``bench/timing.py``'s ``Setup``) of each network of
``timing.NETWORKS`` runs on ``launch_counter``'s stand-in for CuPy, which records every kernel
launch CuPy would make, with the bytes it moves, by layer.  No GPU is used: the launches and
bytes are counts, the step times estimates from the model below.

The model (``estimate_ms``):

    t = launches × US_PER_LAUNCH + bytes / BANDWIDTH + GEMM flops / GEMM_FLOPS

Its constants were fitted to the whole-step times measured on one H200 (CuPy 14.2, strict
float32, docs/gpu.md): US_PER_LAUNCH and BANDWIDTH solve the two equations of the demo and
depth 8 ×¼ step times with GEMM_FLOPS fixed at the card's fp32 rate (``--fit`` redoes it from
the counts of the running code with the kernels off).  ``--kernels`` counts with the
hand-written kernels of minicompact/cuda on ("on": each one launch), off
(``MINICOMPACT_KERNELS=off``: their twins' operations one by one) or both.
"""
import argparse
import json
import sys
import time

import launch_counter
from timing import NETWORKS, Setup, describe, kernels_switch

# One H200 (docs/gpu.md), strict float32, whole training steps: (images/s, batch).  The
# paper network's figure was measured by an earlier version of the code (docs/data-parallel.md).
MEASURED_H200 = {"demo": (832, 32), "depth8": (2852, 128), "paper": (399, 64)}
FIT_NETS = ("demo", "depth8")

# H200 SXM specifications, for comparison with the fit: HBM3e 4.8 TB/s; about 60 TFLOP/s of
# float32 without tensor cores (the ~67 TFLOP/s NVIDIA lists, rounded down for real GEMMs).
SPEC_BANDWIDTH = 4.8e12
GEMM_FLOPS = 60e12
# Fitted (``--fit``, kernels off, commit 7dde784) to the demo and depth 8 ×¼ steps above:
# the cost of a launch, and the bandwidth that chains of small, strided kernels reach.  The
# fit puts the paper network at 255 ms against 160 ms measured (docs/gpu.md says why).
US_PER_LAUNCH = 20.1
BANDWIDTH = 0.81e12

LAYERS = ("conv", "batchnorm", "relu", "maxpool", "pyramid", "classifier", "loss",
          "objective", "regularizer", "optimizer", "other")


def estimate_ms(launches, nbytes, flops, us_per_launch=US_PER_LAUNCH, bandwidth=BANDWIDTH,
                gemm_flops=GEMM_FLOPS):
    """Milliseconds the model gives for ``launches`` launches moving ``nbytes`` bytes and
    doing ``flops`` GEMM flops: each term in series (no overlap assumed)."""
    return 1e3 * (launches * us_per_launch * 1e-6 + nbytes / bandwidth + flops / gemm_flops)


def measured_ms(net):
    """The H200 step time of network ``net`` (ms), from its images/s and batch."""
    rate, batch = MEASURED_H200[net]
    return 1e3 * batch / rate


def count_step(net, kernels="off"):
    """The ``LaunchLog`` of one steady-state training step of ``net`` (a dict of NETWORKS).

    A first step runs uncounted: it makes the momentum buffers and the column buffers that
    every later step reuses."""
    with kernels_switch(kernels), launch_counter.installed():
        setup = Setup(net, "gpu")
        setup.step()
        with launch_counter.counting() as log:
            setup.step()
    return log


def summary(log):
    """The JSON-ready counts of one step: totals, by layer, and the estimate."""
    total = log.total()
    layers = {}
    for name, row in sorted(log.by_layer().items(), key=lambda kv: LAYERS.index(kv[0])
                            if kv[0] in LAYERS else len(LAYERS)):
        layers[name] = dict(row, estimated_ms=estimate_ms(row["launches"], row["bytes"], row["flops"]),
                            operations=log.by_name(name))
    return dict(total, estimated_ms=estimate_ms(total["launches"], total["bytes"], total["flops"]),
                layers=layers)


def fit(counts):
    """(µs per launch, bytes/s) that make the model give the measured step times of
    ``FIT_NETS`` exactly, GEMM_FLOPS fixed: two linear equations in (µs, 1/bandwidth)."""
    (l1, b1, f1, t1), (l2, b2, f2, t2) = [
        (c["launches"], c["bytes"], c["flops"], measured_ms(n) * 1e-3 - c["flops"] / GEMM_FLOPS)
        for n, c in ((n, counts[n]) for n in FIT_NETS)]
    det = l1 * b2 - l2 * b1
    us = (t1 * b2 - t2 * b1) / det
    inv_bw = (l1 * t2 - l2 * t1) / det
    return us * 1e6, 1.0 / inv_bw


def fit_least_squares(counts):
    """(µs per launch, bytes/s) minimising the relative errors over every network of
    ``counts`` with a measured time (GEMM_FLOPS fixed): the alternative to ``fit``."""
    import numpy as np
    names = [n for n in counts if n in MEASURED_H200]
    t = np.array([measured_ms(n) * 1e-3 for n in names])
    a = np.array([[counts[n]["launches"], counts[n]["bytes"]] for n in names]) / t[:, None]
    y = np.array([(measured_ms(n) * 1e-3 - counts[n]["flops"] / GEMM_FLOPS) for n in names]) / t
    (us, inv_bw), *_ = np.linalg.lstsq(a, y, rcond=None)
    return us * 1e6, 1.0 / inv_bw


def print_table(name, net, results):
    """One network's table: a row per layer, a column group per kernels mode."""
    modes = list(results)
    print(f"\n{name}: {describe(net)}")
    head = "".join(f" | {m:>3}: launches (fwd/bwd)   MB    est ms" for m in modes)
    print(f"{'layer':<12}{head}")
    names = [n for n in LAYERS if any(n in r["layers"] for r in results.values())]
    for layer in names + ["total"]:
        cells = []
        for mode in modes:
            r = results[mode]
            row = r if layer == "total" else r["layers"].get(layer)
            if row is None:
                cells.append(" | " + " " * 38)
                continue
            split = "" if layer == "total" else f"({row['forward']}/{row['backward']})"
            cells.append(f" | {row['launches']:>13} {split:>11} {row['bytes'] / 1e6:>7.1f} "
                         f"{row['estimated_ms']:>6.2f}")
        print(f"{layer:<12}{''.join(cells)}")
    if name in MEASURED_H200:
        rate, batch = MEASURED_H200[name]
        note = "" if batch == net["batch"] else f" (measured at batch {batch})"
        print(f"measured on one H200 (kernels off, CuPy 14.2): {measured_ms(name):.2f} ms per step "
              f"({rate} img/s){note}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default="demo,depth8",
                        help=f"comma-separated, of {','.join(NETWORKS)} (default demo,depth8; "
                             "paper takes about 80 s per kernels mode on 2 cores)")
    parser.add_argument("--kernels", choices=("on", "off", "both"), default="both",
                        help="count the hand-written kernels as one launch each (on), their twins' "
                             "operations (off, MINICOMPACT_KERNELS=off), or both (default)")
    parser.add_argument("--batch", type=int, help="override every network's batch (bytes scale "
                                                  "with it, launches do not)")
    parser.add_argument("--fit", action="store_true",
                        help=f"refit US_PER_LAUNCH and BANDWIDTH to {' and '.join(FIT_NETS)} (kernels off)")
    parser.add_argument("--json", metavar="PATH", help="write the counts as JSON ('-': stdout only)")
    args = parser.parse_args(argv)
    nets = [n.strip() for n in args.nets.split(",") if n.strip()]
    unknown = [n for n in nets if n not in NETWORKS]
    if unknown:
        parser.error(f"unknown network(s) {unknown}; choose from {sorted(NETWORKS)}")
    if args.fit:
        nets = list(dict.fromkeys(nets + list(FIT_NETS)))
    modes = ["off", "on"] if args.kernels == "both" or args.fit and args.kernels == "on" else [args.kernels]
    if args.fit and "off" not in modes:
        modes.insert(0, "off")
    quiet = args.json == "-"
    out = {"model": {"us_per_launch": US_PER_LAUNCH, "bandwidth": BANDWIDTH, "gemm_flops": GEMM_FLOPS},
           "nets": {}}
    for name in nets:
        net = dict(NETWORKS[name])
        if args.batch:
            net["batch"] = args.batch
        results = {}
        for mode in modes:
            t0 = time.perf_counter()
            results[mode] = summary(count_step(net, mode))
            if not quiet:
                print(f"[{name}, kernels {mode}: counted in {time.perf_counter() - t0:.0f} s]",
                      file=sys.stderr)
        out["nets"][name] = dict(net=net, kernels=results,
                                 measured_ms=measured_ms(name) if name in MEASURED_H200 else None)
        if not quiet:
            print_table(name, net, results)
    if args.fit:
        counts = {n: out["nets"][n]["kernels"]["off"] for n in FIT_NETS}
        us, bw = fit(counts)
        out["fit"] = {"us_per_launch": us, "bandwidth": bw}
        measured = {n: out["nets"][n]["kernels"]["off"] for n in out["nets"]
                    if n in MEASURED_H200 and out["nets"][n]["net"]["batch"] == MEASURED_H200[n][1]}
        lsq = fit_least_squares(measured) if len(measured) > 2 else None
        if not quiet:
            print(f"\nfit to {' and '.join(FIT_NETS)} (kernels off, GEMM at {GEMM_FLOPS / 1e12:g} TFLOP/s): "
                  f"{us:.2f} µs per launch, {bw / 1e12:.2f} TB/s (spec {SPEC_BANDWIDTH / 1e12:g} TB/s)")
            if lsq:
                print(f"least squares over {', '.join(measured)} (relative errors): {lsq[0]:.2f} µs "
                      f"per launch, {lsq[1] / 1e12:.2f} TB/s")
            print(f"{'network':<8} {'measured':>9} {'this fit':>9}" + (f" {'lsq fit':>8}" if lsq else "")
                  + f" {'spec (10 µs, 4.8 TB/s)':>23}")
            for n, c in measured.items():
                cells = [estimate_ms(c["launches"], c["bytes"], c["flops"], u, b)
                         for u, b in [(us, bw)] + ([lsq] if lsq else []) + [(10.0, SPEC_BANDWIDTH)]]
                print(f"{n:<8} {measured_ms(n):>9.1f} " + " ".join(f"{v:>8.1f}" for v in cells[:-1])
                      + f" {cells[-1]:>23.1f}")
    if args.json:
        text = json.dumps(out, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")


if __name__ == "__main__":
    main()

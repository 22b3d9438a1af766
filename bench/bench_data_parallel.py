"""Data-parallel speed: images/s of whole training steps on R ranks, and the gradient all-reduce.

    python bench/bench_data_parallel.py                                   # one process
    OMP_NUM_THREADS=1 mpiexec -n 2 python bench/bench_data_parallel.py    # two ranks
    mpiexec -n 2 python bench/bench_data_parallel.py --steps 0 --allreduce 21395560

Each rank trains the same network on its own batch of --batch images (the global batch is
R·batch), with ``train_step`` (no sync inside a step) and the gradient all-reduce of
``distributed``; one process runs without a communicator (under ``mpiexec -n 1`` it
reduces with itself: on GPUs, the NCCL path).  Prints, on rank 0, the median step time
over --steps steps after two warm-up steps, the global images/s, and the share of the step
spent in the all-reduce.  ``--allreduce F`` also times the all-reduce of a buffer of F float32 values
(21,395,560: the gradients of the paper's depth-12 ImageNet network), as algorithm
bandwidth (bytes / time) and bus bandwidth (the ring's 2(R-1)/R · bytes / time).
"""
import argparse
import time

import numpy as np

from minicompact.backend import array_module, resolve_device, synchronize
from minicompact.distributed import GradientAllReduce, broadcast_model, init
from minicompact.distributed.sync_batchnorm import use_sync_batchnorm
from minicompact.model import CompactNet, ModelConfig
from minicompact.objective import Penalty, train_step
from minicompact.optim import SGD
from minicompact.regularizers import variant


class _Timed:
    """Wraps the reducer to add up the time spent in it."""

    def __init__(self, reducer):
        self.reducer, self.seconds = reducer, 0.0

    def __call__(self, loss, n):
        t0 = time.perf_counter()
        out = self.reducer(loss, n)
        synchronize(self.reducer.flat)
        self.seconds += time.perf_counter() - t0
        return out


def bench_steps(comm, args, device):
    xp = array_module(device)
    cfg = ModelConfig(depth=args.depth, num_classes=args.classes, width_mult=args.width_mult,
                      stem=args.stem)
    model = broadcast_model(CompactNet(cfg, seed=0).to(device), comm)
    if args.sync_bn:
        use_sync_batchnorm(model, comm)
    opt = SGD(model.param_layers, lr=0.01, momentum=0.9)
    reg = Penalty(model, variant("compact", args.depth, 0.03))
    # Under a launcher even one rank reduces: `mpiexec -n 1 ... --device gpu` runs the NCCL
    # code path of many ranks (NCCL, unlike MPI, does not skip a 1-rank all-reduce).
    reducer = _Timed(GradientAllReduce(comm, model)) if comm.backend != "single" else None
    rng = np.random.default_rng(comm.rank)
    x = xp.asarray(rng.standard_normal((args.batch, 3, args.image_size, args.image_size),
                                       dtype=np.float32))
    y = xp.asarray(rng.integers(0, args.classes, args.batch))
    times, reduce_times = [], []
    for i in range(args.steps + 2):
        comm.barrier()
        before = reducer.seconds if reducer else 0.0
        t0 = time.perf_counter()
        train_step(model, opt, x, y, reg, check_finite=False, reduce_gradients=reducer)
        synchronize()
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t0)
            reduce_times.append((reducer.seconds if reducer else 0.0) - before)
    # the slowest rank sets the pace: take each step's maximum over ranks
    gathered = comm.gather_object(times)
    if comm.is_root:
        step = float(np.median(np.max(np.array(gathered), axis=0)))
        red = float(np.median(reduce_times))
        params = sum(int(p.size) for layer in model.param_layers for p in layer.params.values())
        print(f"steps: {comm.size} rank(s) x batch {args.batch} (global {comm.size * args.batch}), "
              f"depth {args.depth}, widths x{args.width_mult}, {args.image_size} px, "
              f"{params:,} parameters, sync-BN {'on' if args.sync_bn else 'off'}")
        print(f"  step {1e3 * step:.1f} ms (median of {args.steps}), "
              f"{comm.size * args.batch / step:.0f} images/s; all-reduce {1e3 * red:.2f} ms "
              f"({100 * red / step:.1f} % of the step, rank 0)")


def bench_allreduce(comm, floats, repeats, device):
    xp = array_module(device)
    buf = xp.ones(floats, dtype=np.float32)
    times = []
    for _ in range(repeats + 1):
        comm.barrier()
        t0 = time.perf_counter()
        comm.allreduce(buf)
        synchronize(buf)
        times.append(time.perf_counter() - t0)
    t = float(np.median(times[1:]))
    nbytes = 4 * floats
    if comm.is_root:
        bus = 2 * (comm.size - 1) / comm.size * nbytes / t if comm.size > 1 else float("nan")
        print(f"all-reduce of {floats:,} float32 ({nbytes / 1e6:.1f} MB) over {comm.size} "
              f"rank(s), {comm.backend}: {1e3 * t:.2f} ms (median of {repeats}); "
              f"algorithm bandwidth {nbytes / t / 1e9:.2f} GB/s, bus bandwidth {bus / 1e9:.2f} GB/s")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--width-mult", type=float, default=0.0625)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--stem", default="small", choices=["small", "imagenet"])
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32, help="images per rank per step")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sync-bn", action="store_true")
    ap.add_argument("--allreduce", type=int, default=0, metavar="F",
                    help="also time the all-reduce of F float32 values")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu", "auto"])
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    comm = init(device)
    if args.steps:
        bench_steps(comm, args, device)
    if args.allreduce:
        bench_allreduce(comm, args.allreduce, args.repeats, device)


if __name__ == "__main__":
    main()

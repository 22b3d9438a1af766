"""Checks that run on several MPI ranks, launched by tests/test_distributed.py as

    mpiexec -n 2 python tests/mpi_checks.py CHECK

Every rank runs the same check; each compares what the ranks computed together with what
one process computes alone (recomputed on every rank, no communication), and raises on a
mismatch, which ends all ranks (``distributed.init`` installs the abort hook).  Rank 0
prints ``OK CHECK`` at the end.  Not collected by pytest (no ``test_`` prefix).

tests/test_run_distributed.py also runs run.py through here with a fault injected on one
rank, at one training step (``mpiexec -n 2 python tests/mpi_checks.py fault RANK KIND STEP
-- RUN.PY ARGS``): KIND is a signal name (SIGTERM, SIGINT: sent to that rank alone) or
"raise" (a RuntimeError on that rank).
"""
import os
import signal
import sys
import tempfile

# As run.py does, before NumPy starts its BLAS threads (this imports no NumPy): a fault launch
# stands in for `mpiexec ... run.py`, and its results are compared bit for bit with one, which
# they only match with the same number of BLAS threads per rank.
from minicompact.distributed.launcher import launcher_rank, share_cores

share_cores()

import numpy as np

from minicompact.data.sharding import eval_shard, rank_batch
from minicompact.distributed import (GradientAllReduce, MPICommunicator, average_buffers,
                                     broadcast_model, check_replicas, init)
from minicompact.gradcheck import GradientCheckError, assert_gradients_close, numerical_gradient
from minicompact.distributed.sync_batchnorm import SyncBatchNorm2D, use_sync_batchnorm
from minicompact.model import CompactNet, ModelConfig
from minicompact.objective import Penalty, objective, train_step
from minicompact.optim import SGD
from minicompact.regularizers import variant

CHECKS = {}
CLASSES = 5


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def tiny(dtype, seed=3):
    """Depth 3 (conv 7×7 → 2 maps, conv 3×3 → 4 maps), small stem, 5 classes, 8×8 inputs."""
    return CompactNet(ModelConfig(depth=3, num_classes=CLASSES, width_mult=1 / 64, stem="small"),
                      seed=seed, dtype=dtype)


def data(n, dtype, seed=5):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, 3, 8, 8)) * 2 + 0.3).astype(dtype)
    return x, rng.integers(0, CLASSES, n)


def state(model):
    return {k: v.copy() for k, v in model.state_arrays().items()}


def assert_close(got, want, rtol, atol, what):
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=atol,
                                   err_msg=f"{what}: {key}")


def global_batches(batch_size, size):
    """(order, step) pairs giving global batches of 2B, 2B, 3 and 1 images over 2·2B+3 + 1
    images: full parts, an uneven last batch (2 / 1) and one where rank 1's part is empty."""
    n = 2 * size * batch_size + 3
    order_a = np.random.default_rng(7).permutation(n)
    order_b = np.array([n])  # one more image, alone in its global batch
    return n + 1, [(order_a, 0), (order_a, 1), (order_a, 2), (order_b, 0)]


def train_both_ways(comm, dtype, sync_bn, update="subgradient", batch_size=3):
    """The same steps twice: data-parallel on this rank (comm) and one process (no comm).

    Returns (data-parallel state, one-process state).  The one-process reference trains on
    each whole global batch; without sync-BN it runs one backward per rank's part and
    averages the parts' gradients weighted by their sizes (what the all-reduce promises).
    """
    n, steps = global_batches(batch_size, comm.size)
    x, y = data(n, dtype)
    lr, config = 0.05, variant("compact", 3, 0.5)

    par = tiny(dtype)
    if sync_bn:
        use_sync_batchnorm(par, comm)
    par_opt = SGD(par.param_layers, lr=lr, momentum=0.9)
    par_reg = Penalty(par, config, cw=0.01, ctheta=0.01, update=update)
    reducer = GradientAllReduce(comm, par)

    one = tiny(dtype)
    one_opt = SGD(one.param_layers, lr=lr, momentum=0.9)
    one_reg = Penalty(one, config, cw=0.01, ctheta=0.01, update=update)

    for order, step in steps:
        mine = rank_batch(order, step, batch_size, comm.rank, comm.size)
        xs, ys = (x[mine], y[mine]) if len(mine) else (None, None)
        train_step(par, par_opt, xs, ys, par_reg, lr=lr, reduce_gradients=reducer)

        whole = np.concatenate([rank_batch(order, step, batch_size, r, comm.size)
                                for r in range(comm.size)])
        if sync_bn:
            train_step(one, one_opt, x[whole], y[whole], one_reg, lr=lr)
            continue
        grads = {}
        for r in range(comm.size):  # per-rank batch-norm: one forward/backward per part
            part = rank_batch(order, step, batch_size, r, comm.size)
            if len(part) == 0:
                continue
            objective(one, x[part], y[part])
            for i, layer in enumerate(one.param_layers):
                for k, g in layer.grads.items():
                    grads[i, k] = grads.get((i, k), 0) + g * (len(part) / len(whole))
        for i, layer in enumerate(one.param_layers):
            for k in layer.grads:
                layer.grads[k] = grads[i, k]
        one_reg.add_gradient()
        one_opt.step()
        one_reg.after_step(lr)
    return par, one


@check
def communicator():
    comm = init("cpu")
    assert isinstance(comm, MPICommunicator) and comm.size == 2, comm
    assert comm.local_size == 2 and comm.local_rank == comm.rank, comm
    x = np.full(3, comm.rank + 1.0)
    assert comm.allreduce(x) is x and x.tolist() == [3.0] * 3
    assert comm.allreduce(np.full(2, comm.rank + 1.0), op="mean").tolist() == [1.5, 1.5]
    b = np.arange(4.0) * (comm.rank + 1)
    comm.broadcast(b, root=1)
    assert b.tolist() == [0.0, 2.0, 4.0, 6.0]
    assert comm.sum([1, comm.rank]) == [2.0, 1.0]
    assert comm.broadcast_object({"r": comm.rank}, root=1) == {"r": 1}
    gathered = comm.gather_object(comm.rank)
    assert gathered == ([0, 1] if comm.rank == 0 else None), gathered
    comm.barrier()
    return comm


@check
def broadcast_weights():
    comm = init("cpu")
    model = tiny(np.float32, seed=10 + comm.rank)  # different weights on each rank
    for bn in model.bns:
        bn.buffers["running_mean"] += comm.rank
    assert not check_replicas(model, comm)
    broadcast_model(model, comm)
    assert check_replicas(model, comm)
    want = tiny(np.float32, seed=10).state_arrays()
    for key, v in model.state_arrays().items():
        assert np.array_equal(v, want[key]), key
    return comm


@check
def gradients_are_the_weighted_mean_of_the_parts():
    """Without sync-BN: one step's gradients equal the size-weighted average of the parts'
    gradients, each computed alone (equal parts: the plain average of the two halves)."""
    comm = init("cpu")
    x, y = data(8, np.float64)
    for sizes in ((4, 4), (3, 5)):
        bounds = np.cumsum((0,) + sizes)
        parts = [slice(bounds[r], bounds[r + 1]) for r in range(2)]
        want, losses = {}, []
        for r, part in enumerate(parts):
            model = tiny(np.float64)
            loss = objective(model, x[part], y[part])[1]
            losses.append(loss * sizes[r] / 8)
            for name, layer in model.named_layers():
                for k, g in layer.grads.items():
                    want[name, k] = want.get((name, k), 0) + g * (sizes[r] / 8)
        model = tiny(np.float64)
        mine = parts[comm.rank]
        _, loss, _ = objective(model, x[mine], y[mine], reduce_gradients=GradientAllReduce(comm, model))
        assert abs(loss - sum(losses)) < 1e-12, (loss, sum(losses))
        got = {(name, k): g for name, layer in model.named_layers() for k, g in layer.grads.items()}
        assert_close(got, want, 1e-12, 1e-14, f"gradients, parts {sizes}")
    return comm


@check
def per_rank_batchnorm_steps():
    """Several SGD steps (momentum, regularizer) without sync-BN: the parameters equal one
    process's that averages the parts' gradients; replicas stay bit-identical."""
    comm = init("cpu")
    par, one = train_both_ways(comm, np.float64, sync_bn=False)
    params = {f"{n}.{k}": p for n, layer in one.named_layers() for k, p in layer.params.items()}
    assert_close(par.state_arrays(), params, 1e-11, 1e-13, "per-rank BN, float64")
    assert not check_replicas(par, comm), "per-rank running statistics should differ"
    average_buffers(par, comm)
    assert check_replicas(par, comm), "replicas differ after steps"
    return comm


@check
def sync_batchnorm_steps():
    """2 ranks × B with sync-BN train like one process with batch 2B, including an uneven
    last batch and a step where one rank has no image; float64 tight, float32 to its
    precision; the running statistics agree; the replicas stay bit-identical."""
    comm = init("cpu")
    for dtype, rtol, atol in ((np.float64, 1e-11, 1e-13), (np.float32, 1e-5, 1e-6)):
        for update in ("subgradient", "proximal"):
            par, one = train_both_ways(comm, dtype, sync_bn=True, update=update)
            assert_close(par.state_arrays(), one.state_arrays(), rtol, atol,
                         f"sync-BN, {np.dtype(dtype).name}, {update}")
            assert check_replicas(par, comm), f"replicas differ ({np.dtype(dtype).name}, {update})"
    return comm


class _EquallyWeightedSyncBatchNorm2D(SyncBatchNorm2D):
    """A plausible mistake: weight every rank's gradient sums by 1/R instead of M_r/M."""

    def _batch_count(self, m):
        total = super()._batch_count(m)
        self.share = 1.0 / self.comm.size
        return total


def _sync_batchnorm_gradcheck(comm, layer_class, sizes):
    """Central differences of the global loss through one sync batch-norm layer, over ranks
    holding ``sizes`` images each; raises GradientCheckError on a mismatch.

    Rank r's loss is L_r = Σ out_r·dout_r (a random dout_r); the step minimises
    L = Σ_r (N_r/N) L_r, so ∂L/∂x_r = (N_r/N)·dx_r (backward returns rank r's own scale) and
    ∂L/∂gamma = Σ_r (N_r/N)·dgamma_r (what the gradient all-reduce computes).  The numerical
    side perturbs one entry of one rank's x (or gamma, beta on every rank alike) and runs
    the whole group's forward: every rank calls the loss in the same order.
    Returns the relative errors of x, gamma and beta on this rank.
    """
    rng = np.random.default_rng(0)
    total = sum(sizes)
    x_all = rng.standard_normal((total, 3, 4, 5)) * 2 + 0.5
    dout_all = rng.standard_normal(x_all.shape)
    gamma, beta = rng.uniform(0.5, 2.0, 3), rng.standard_normal(3)
    start = sum(sizes[:comm.rank])
    x = x_all[start:start + sizes[comm.rank]].copy()
    dout = dout_all[start:start + sizes[comm.rank]]
    weight = sizes[comm.rank] / total
    bn = layer_class(3, comm, dtype=np.float64)
    bn.params["gamma"], bn.params["beta"] = gamma, beta

    def global_loss():
        return comm.sum([weight * (bn.forward(x) * dout).sum()])[0]

    bn.forward(x)
    analytic = {"x": weight * bn.backward(dout)}
    for name in ("gamma", "beta"):
        analytic[name] = comm.allreduce(weight * bn.grads[name])
    # Five-point stencil, h = 1e-3, as tests/test_batchnorm.py's gradient check.
    numeric = {}
    for owner in range(comm.size):
        size = comm.broadcast_object(x.size if comm.rank == owner else None, root=owner)
        target = x if comm.rank == owner else np.zeros(size)  # the others only keep in step
        g = numerical_gradient(global_loss, target, h=1e-3, points=4)
        if comm.rank == owner:
            numeric["x"] = g
    for name in ("gamma", "beta"):
        numeric[name] = numerical_gradient(global_loss, bn.params[name], h=1e-3, points=4)

    def compare():  # on every rank; one rank's failure is raised on all (no rank left waiting)
        return [assert_gradients_close(f"{name} on rank {comm.rank}", analytic[name],
                                       numeric[name], tol=1e-7) for name in analytic]
    return comm.agree(compare, errors=GradientCheckError)


@check
def sync_batchnorm_gradcheck():
    """Finite differences through SyncBatchNorm2D over 2 ranks with unequal batches (3 and 1
    images) agree with its backward; weighting the ranks equally instead of by image count,
    a mistake equal batches would hide, fails the same check."""
    comm = init("cpu")
    for sizes in ((3, 1), (2, 2)):
        _sync_batchnorm_gradcheck(comm, SyncBatchNorm2D, sizes)
    _sync_batchnorm_gradcheck(comm, _EquallyWeightedSyncBatchNorm2D, (2, 2))  # equal: no harm
    try:
        _sync_batchnorm_gradcheck(comm, _EquallyWeightedSyncBatchNorm2D, (3, 1))
    except GradientCheckError:
        pass
    else:
        raise AssertionError("the check missed equally weighted gradient sums")
    return comm


@check
def sharded_evaluation():
    """Each rank evaluates its shard (centre crop and ten crops); the reduced report equals
    the one process's over the whole set."""
    from minicompact.data.folders import ImageFolder
    from minicompact.data.loader import BatchLoader
    from minicompact.data.synthetic import make_synthetic_dataset
    from minicompact.losses import softmax_cross_entropy
    from types import SimpleNamespace
    from minicompact.training.recipe import Network
    from minicompact.training.trainer import Trainer

    comm = init("cpu")
    root = None
    if comm.rank == 0:
        root = tempfile.mkdtemp(prefix="minicompact-mpi-")
        make_synthetic_dataset(root, num_classes=CLASSES, train_per_class=1, val_per_class=5,
                               size=16)
    root = comm.broadcast_object(root)
    val = ImageFolder(f"{root}/val")
    model = tiny(np.float32)
    rng = np.random.default_rng(0)
    for bn in model.bns:  # non-trivial running statistics
        bn.buffers["running_mean"][:] = rng.standard_normal(bn.channels)
        bn.buffers["running_var"][:] = rng.uniform(0.5, 2, bn.channels)
    net = Network(model, None, None, None, softmax_cross_entropy)
    images = SimpleNamespace(train=None, val=None, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    alone = Trainer(net, images, epochs=1, progress=False)
    together = Trainer(net, images, epochs=1, progress=False, comm=comm)
    for mode in ("center", "tencrop"):
        whole = alone.evaluate(BatchLoader(val, 4, resize=16, crop=8, mode=mode))
        mine = BatchLoader(val, 4, resize=16, crop=8, mode=mode, rank=comm.rank, ranks=comm.size)
        assert np.array_equal(mine.order(0), np.arange(len(val.samples))[eval_shard(len(val.samples),
                                                                                    comm.rank, comm.size)])
        got = together.evaluate(mine)
        assert 0 < len(mine.order(0)) < whole["n"] == got["n"] == len(val.samples), (whole, got)
        assert (got["top1"], got["top5"]) == (whole["top1"], whole["top5"]), (mode, got, whole)
        assert abs(got["loss"] - whole["loss"]) <= 1e-6 * abs(whole["loss"]), (mode, got, whole)
    comm.barrier()
    if comm.rank == 0:
        import shutil
        shutil.rmtree(root)
    return comm


@check
def per_rank_batchnorm_buffers_follow_the_global_batch():
    """GradientAllReduce(buffers=True): after each step every rank's running statistics are
    the image-weighted mean of what each rank's own would be, bit-identical on all ranks."""
    comm = init("cpu")
    n, steps = global_batches(3, comm.size)
    x, y = data(n, np.float64)
    par, own = tiny(np.float64), tiny(np.float64)  # own: this rank's part, no reduction
    reducer = GradientAllReduce(comm, par, buffers=True)
    for order, step in steps:
        mine = rank_batch(order, step, 3, comm.rank, comm.size)
        own.load_state_arrays(par.state_arrays())
        if len(mine):
            objective(own, x[mine], y[mine])
            objective(par, x[mine], y[mine], reduce_gradients=reducer)
        else:
            objective(par, None, None, reduce_gradients=reducer)
        total = comm.sum([len(mine)])[0]
        for key, b in own.state_arrays().items():
            if "running" not in key:
                continue
            want = comm.allreduce(b * len(mine)) / total  # a rank without images: weight 0
            np.testing.assert_allclose(par.state_arrays()[key], want, rtol=1e-13, atol=1e-15,
                                       err_msg=key)
        assert check_replicas(par, comm), "running statistics differ between ranks"
    return comm


class Refused(Exception):
    """An error for the ``agree`` check (module level: it travels between ranks pickled)."""


@check
def agree():
    """comm.agree: one rank's failure is every rank's; root_only sends rank 0's result; root_first
    runs rank 0 before the others."""
    comm = init("cpu")

    def fails_on(rank):
        if comm.rank == rank:
            raise Refused(f"refused on rank {rank}")
        return comm.rank

    assert comm.agree(fails_on, 5, errors=Refused) == comm.rank
    for rank in (0, 1):
        try:
            comm.agree(fails_on, rank, errors=Refused)
        except Refused as exc:
            assert str(exc) == f"refused on rank {rank}", exc
        else:
            raise AssertionError("every rank should raise")
    assert comm.agree(lambda: f"from {comm.rank}", root_only=True) == "from 0"
    marks = []
    path = os.path.join(tempfile.gettempdir(), f"minicompact-agree-{os.getppid()}")
    comm.agree(lambda: marks.append(os.path.exists(path)) or open(path, "w").close(), root_first=True)
    comm.barrier()
    if comm.rank == 0:
        os.remove(path)
    assert marks == [comm.rank == 1], marks  # rank 1 ran after rank 0 had written the file
    return comm


@check
def abort_ends_every_rank():
    """Rank 1 dies of an exception while rank 0 waits in a collective: the job ends (the
    test expects a non-zero exit with the message, within its timeout) instead of hanging."""
    comm = init("cpu")
    if comm.rank == 1:
        raise RuntimeError("a deliberate failure on rank 1")
    comm.barrier()  # never returns: rank 1 does not come
    return comm


@check
def exit_ends_every_rank():
    """Rank 1 calls sys.exit(3) inside ``abort_on_failure`` while rank 0 waits: the job ends
    with the status (without the guard it would hang: MPI_Finalize waits for rank 0)."""
    comm = init("cpu")
    with comm.abort_on_failure():
        if comm.rank == 1:
            sys.exit(3)
        comm.barrier()
    return comm


def fault(rank, kind, step, argv):
    """run.py's main on this rank, with ``kind`` injected on rank ``rank`` right after its
    ``step``-th SGD step (counted from 1 over the whole run)."""
    import run
    from minicompact import optim

    real_step, calls = optim.SGD.step, []

    def step_then_fault(self):
        real_step(self)
        calls.append(1)
        if len(calls) == step and launcher_rank() == rank:
            if kind == "raise":
                raise RuntimeError(f"a deliberate failure on rank {rank}")
            os.kill(os.getpid(), getattr(signal, kind))

    optim.SGD.step = step_then_fault
    return run.main(argv)


if __name__ == "__main__":
    name = sys.argv[1]
    if name == "fault":
        split = sys.argv.index("--")
        rank, kind, step = sys.argv[2:split]
        sys.exit(fault(int(rank), kind, int(step), sys.argv[split + 1:]))
    used = CHECKS[name]()
    if used.rank == 0:
        print(f"OK {name}", flush=True)

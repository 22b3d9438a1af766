"""Data-parallel training over processes and GPUs: ``mpiexec -n N python run.py ...``.

N ranks each hold a full replica of the model, train on disjoint slices of every global
batch (``data/sharding.py``) and all-reduce their gradients once per step; the
regularizer of eq. 1 is applied after that reduce, identically on every rank.

* ``launcher.py``       what ``mpiexec``/``srun`` say in the environment (no MPI, no NumPy)
* ``checks.py``         the argument checks every communicator shares
* ``comm.py``           the communicator interface; one process; MPI (mpi4py)
* ``start.py``          ``init``: picks the communicator (and the GPU) of this process
* ``nccl.py``           NCCL (CuPy) for GPU arrays; imported only by GPU runs; run with one rank only
* ``data_parallel.py``  the gradient all-reduce, the initial broadcast, the replica check,
                        averaging batch-norm buffers

``sync_batchnorm.py`` holds ``SyncBatchNorm2D`` (statistics over the global batch);
``training.trainer.Trainer`` runs the loop below when given a communicator with several ranks, and
``BatchLoader(rank=, ranks=)`` reads each rank's part of the data.  The loop::

    comm = distributed.init(device)                     # before any CuPy array exists
    model = CompactNet(...); broadcast_model(model, comm)
    if sync_bn: use_sync_batchnorm(model, comm)
    reducer = GradientAllReduce(comm, model, buffers=not sync_bn) if comm.size > 1 else None
    for step ...:
        indices = rank_batch(order, step, batch_size, comm.rank, comm.size)
        n = <readable images among them>
        if comm.sum([n])[0] == 0: continue             # no rank has an image: skip, as one process does
        train_step(model, opt, x if n else None, y if n else None, reg, loss, lr,
                   reduce_gradients=reducer)

The names below are imported on first use (PEP 562), so that importing ``launcher`` — which
run.py does before NumPy starts its threads — imports nothing else.
"""
import importlib

_WHERE = {"Communicator": "comm", "MPICommunicator": "comm", "init": "start",
          "launched_by_mpi": "launcher", "GradientAllReduce": "data_parallel",
          "average_buffers": "data_parallel", "broadcast_model": "data_parallel",
          "check_replicas": "data_parallel", "replica_digest": "data_parallel"}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)

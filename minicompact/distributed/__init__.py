"""Data-parallel training over processes and GPUs: ``mpiexec -n N python run.py ...``.

N ranks each hold a full replica of the model, train on disjoint slices of every global
batch (``data/sharding.py``) and all-reduce their gradients once per step; the
regularizer of eq. 1 is applied after that reduce, identically on every rank.

* ``comm.py``           the communicator interface; one process; MPI (mpi4py); ``init``
* ``nccl.py``           NCCL (CuPy) for GPU arrays; imported only by GPU runs; not yet run
* ``data_parallel.py``  the gradient all-reduce, the initial broadcast, the replica check,
                        averaging batch-norm buffers, reducing evaluation counts

``layers/sync_batchnorm.py`` holds ``SyncBatchNorm2D`` (statistics over the global batch).

A training loop uses them like this (run.py and the Trainer are wired in a later step)::

    comm = distributed.init(device)                     # before any CuPy array exists
    model = CompactNet(...); broadcast_model(model, comm)
    if sync_bn: use_sync_batchnorm(model, comm)
    reducer = GradientAllReduce(comm, model) if comm.size > 1 else None
    for step ...:
        indices = rank_batch(order, step, batch_size, comm.rank, comm.size)
        n = <readable images among them>
        if comm.sum([n])[0] == 0: continue             # no rank has an image: skip, as one process does
        train_step(model, opt, x if n else None, y if n else None, reg, loss, lr,
                   reduce_gradients=reducer)
"""
from .comm import Communicator, MPICommunicator, init, launched_by_mpi
from .data_parallel import (GradientAllReduce, average_buffers, broadcast_model,
                            check_replicas, reduce_evaluation, replica_digest)

__all__ = ["Communicator", "MPICommunicator", "init", "launched_by_mpi", "GradientAllReduce",
           "average_buffers", "broadcast_model", "check_replicas", "reduce_evaluation",
           "replica_digest"]

"""Data parallelism on top of a communicator: the gradient all-reduce, the initial broadcast,
the replica check, and the reductions of batch-norm buffers and evaluation counts.

Every rank holds a full replica of the model.  A step is::

    rank r:  forward + backward on its own N_r images     → gradient g_r of its mean loss L_r
    all:     g = Σ_r (N_r/N) g_r                           one all-reduce (GradientAllReduce)
    all:     + the regularizer's (sub)gradient, SGD, the proximal step   (same bits everywhere)

g is the gradient of the mean loss over the global batch of N = Σ_r N_r images, so N ranks
with batch B train like one process with batch N·B (exactly so with ``SyncBatchNorm2D``; with
per-rank batch-norm each rank normalises with its own images, as PyTorch DDP does).

Why the regularizer comes after the all-reduce: C_W Ω(W) + C_Θ Σ Γ_l(Θ^l) of eq. 1 is a
function of the weights alone, which are the same on every rank, so its (sub)gradient is
the same on every rank too.  Added before a summing all-reduce it would be counted R times;
before this weighted mean it would come back unchanged only up to rounding, after R ranks
computed it for nothing.  Added after, every rank adds the same term to the same reduced
gradient, and the proximal step (``update="proximal"``) likewise acts on identical weights.
The replicas start identical (``broadcast_model``) and apply identical updates to identical
gradients, so they stay bit-identical without ever exchanging weights (``check_replicas``
verifies it).

The all-reduce itself: a ring all-reduce of a buffer of S bytes over R ranks splits it into
R chunks; a reduce-scatter (R-1 steps: pass one chunk to the next rank, which adds its own)
leaves each rank with one fully summed chunk, and an all-gather (R-1 more steps) passes the
sums around.  Each rank sends and receives 2(R-1)/R·S bytes, nearly independent of R, which
is why one big buffer scales; each chunk is summed along one path and then copied, so
every rank gets the same bits.  NCCL uses rings (and trees) over NVLink and the network;
MPI libraries pick ring, recursive-doubling or Rabenseifner schedules by message size.
"""
import hashlib

from ..backend import get_array_module, to_cpu


class GradientAllReduce:
    """The ``reduce_gradients`` argument of ``objective``/``train_step``: one all-reduce per step.

    comm: a communicator; model: a ``CompactNet`` (its ``param_layers``, in order).

    Gradients of every parameter are packed into one persistent flat buffer, laid out as::

        flat = [ g_1 ... g_P | Σ loss | N ]     (P = number of parameter values, model dtype)

    ``__call__(data_loss, n)`` writes n·g (this rank's sum of per-image gradients), n·loss and
    n into it, all-reduces it (the sums over ranks), divides by the global N, and points each
    layer's ``grads[name]`` at its view of the buffer: no allocation per step, one copy in,
    none out.  Batches of different sizes are weighted by their image counts, so a rank with
    a short or empty batch (unreadable images, the last batch of an epoch) is counted exactly.
    A model with F float32 parameters moves 4·(F+2) bytes per step (21.4 M parameters: 86 MB).

    For one process pass ``reduce_gradients=None`` instead: nothing to reduce.
    """

    def __init__(self, comm, model):
        self.comm, self.model = comm, model
        entries = [(layer, name, p) for layer in model.param_layers
                   for name, p in layer.params.items()]
        dtypes = {p.dtype for _, _, p in entries}
        if len(dtypes) != 1:
            raise ValueError(f"GradientAllReduce needs one parameter dtype, got {sorted(map(str, dtypes))}")
        xp = get_array_module(entries[0][2])
        size = sum(int(p.size) for _, _, p in entries)
        self.flat = xp.zeros(size + 2, dtype=entries[0][2].dtype)
        self.slots, offset = [], 0
        for layer, name, p in entries:
            self.slots.append((layer, name, self.flat[offset:offset + p.size].reshape(p.shape)))
            offset += int(p.size)

    def __call__(self, data_loss, n):
        """data_loss: this rank's mean loss (float or 0-d array); n: its number of images (> 0).

        Returns the mean data loss over the global batch (the same value on every rank);
        every parameter's gradient is then the global batch's mean gradient.
        """
        xp = get_array_module(self.flat)
        for layer, name, view in self.slots:
            g = layer.grads.get(name)
            if g is None or g.shape != view.shape:
                raise ValueError(f"{type(layer).__name__}.{name}: gradient of shape "
                                 f"{None if g is None else tuple(g.shape)}, parameter "
                                 f"{tuple(view.shape)}; run backward first")
            xp.multiply(g, n, out=view)  # n · mean gradient = the batch's sum (g may be view)
        self.flat[-2] = data_loss * n
        self.flat[-1] = n
        return self._reduce()

    def without_data(self):
        """This rank's step when none of its images could be read: it contributes zero
        gradients with weight 0, and takes part in every ``SyncBatchNorm2D`` collective of
        the forward and backward the other ranks run.  Returns the global mean loss."""
        layers = [layer for layer in self.model.layers if hasattr(layer, "forward_without_data")]
        for layer in layers:
            layer.forward_without_data()
        for layer in reversed(layers):
            layer.backward_without_data()
        self.flat.fill(0)
        return self._reduce()

    def _reduce(self):
        self.comm.allreduce(self.flat)
        self.flat[:-1] /= self.flat[-1:]       # Σ_r N_r·(mean of r) / N = the global mean
        for layer, name, view in self.slots:
            layer.grads[name] = view
        return self.flat[-2]


def broadcast_model(model, comm, root=0):
    """Overwrite every parameter and buffer (batch-norm running statistics) with root's, so
    all replicas start from the same weights (call once, before training)."""
    for _, layer in model.named_layers():
        for store in (layer.params, layer.buffers):
            for array in store.values():
                comm.broadcast(array, root=root)
    return model


def average_buffers(model, comm):
    """Replace every batch-norm running statistic by its mean over ranks (bit-identical on
    every rank afterwards).

    With per-rank batch-norm each rank's running statistics follow its own batches and
    drift apart; call this before evaluating and before each checkpoint.  For equal batch
    sizes the averaged running mean is exactly the running mean of the global batches' means
    (the running average is linear); the averaged variance omits the spread of the ranks'
    means (use ``SyncBatchNorm2D`` for exact global statistics).
    """
    for _, layer in model.named_layers():
        for array in layer.buffers.values():
            comm.allreduce(array, op="mean")
    return model


def replica_digest(model):
    """SHA-256 of every parameter and buffer, in a fixed order (a hex string)."""
    h = hashlib.sha256()
    for key, array in sorted(model.state_arrays().items()):
        h.update(key.encode())
        h.update(to_cpu(array).tobytes())
    return h.hexdigest()


def check_replicas(model, comm):
    """True on every rank when all ranks hold bit-identical parameters and buffers."""
    digests = comm.gather_object(replica_digest(model))
    same = None if digests is None else len(set(digests)) == 1
    return comm.broadcast_object(same)


def reduce_evaluation(comm, result):
    """Combine the ranks' evaluations of disjoint shards into the whole set's.

    result: this rank's dict as ``Trainer.evaluate`` returns it (top1, top5: fractions; loss:
    mean; n: images; skipped).  Returns the same dict for the union, identical on every rank:
    the accuracies are exact (counts are summed), the loss equal up to float rounding.
    """
    n = int(result["n"])
    sums = comm.sum([round(result["top1"] * n), round(result["top5"] * n),
                     result["loss"] * n, n, result.get("skipped", 0)])
    top1, top5, loss_sum, total, skipped = sums
    total_ = max(total, 1)
    return dict(result, top1=top1 / total_, top5=top5 / total_, loss=loss_sum / total_,
                n=int(total), skipped=int(skipped))

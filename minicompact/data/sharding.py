"""Which images each rank of a data-parallel run reads: disjoint slices of every global batch.

An epoch's global order is a pure function of (seed, epoch) (``BatchLoader.order``).  With R
ranks and a per-rank batch size B, the global batch of step s is the slice
``order[s·R·B : (s+1)·R·B]``: exactly the batch one process with batch size R·B reads at
step s.  It is cut into R contiguous parts of near-equal size (the first ones one longer
when it does not divide), and rank r takes part r::

    order:  | step 0: rank 0 | rank 1 | ... | step 1: rank 0 | rank 1 | ... | last (short) |

So the R ranks together read each image once per epoch, every rank takes the same number
of steps (``steps_per_epoch``: a short last global batch gives every rank a short, possibly
empty, part; with ``drop_last`` it is dropped), and the gradient all-reduce weights each
rank's part by its image count (``distributed.GradientAllReduce``): the step equals one
process's step on the whole global batch.  Unreadable images shorten a part the same way;
a rank whose part is empty still takes part in the step's collectives with weight 0.

Evaluation needs no batches in step: ``eval_shard`` gives rank r one contiguous block of the
dataset order, and the ranks' counts are summed (``training.trainer.Trainer.evaluate``).

``BatchLoader(..., rank=r, ranks=R)`` reads rank r's batches by these rules.
"""


def _part(k, rank, size):
    """(start, stop) of part ``rank`` when k items are cut into ``size`` contiguous parts whose
    lengths differ by at most one (the first k % size parts are the longer ones)."""
    if not 0 <= rank < size:
        raise ValueError(f"rank must be in [0, {size}), got {rank}")
    q, r = divmod(k, size)
    start = rank * q + min(rank, r)
    return start, start + q + (rank < r)


def steps_per_epoch(n, batch_size, size=1, drop_last=False):
    """Steps in an epoch of n images with global batches of size·batch_size (same on every rank)."""
    if n < 0 or batch_size < 1 or size < 1:
        raise ValueError(f"need n >= 0, batch_size >= 1, size >= 1; got {n}, {batch_size}, {size}")
    g = size * batch_size
    return n // g if drop_last else -(-n // g)


def rank_batch(order, step, batch_size, rank, size):
    """Rank ``rank``'s part of global batch ``step``: a slice of ``order`` ((n,) indices) with
    batch_size entries, fewer (maybe none) in a short last global batch."""
    g = size * batch_size
    batch = order[step * g:(step + 1) * g]
    start, stop = _part(len(batch), rank, size)
    return batch[start:stop]


def eval_shard(n, rank, size):
    """The ``slice`` of an n-image evaluation set that rank ``rank`` evaluates (contiguous
    blocks, lengths differing by at most one, together covering all n)."""
    return slice(*_part(n, rank, size))

"""Batch normalization with the statistics of the *global* batch of a data-parallel step.

With R ranks, rank r holds x_r of shape (N_r, C, H, W): M_r = N_r·H·W values per channel,
M = Σ_r M_r in the global batch.  ``BatchNorm2D`` normalises each rank with its own batch
(the default: cheap, and what PyTorch DDP does); ``SyncBatchNorm2D`` normalises every rank
with the statistics of all R batches together, exactly as one process would with the
concatenated batch.  Per channel c (every sum below is a (C,) vector):

Forward, two passes (three small all-reduces; the two-pass variance stays accurate when
|mean| >> std, unlike Σx² - M·mean²)::

    M    = Σ_r M_r                                  all-reduce of one host number
    mean = (Σ_r Σ_{x_r} x) / M                      all-reduce of (C,)
    var  = (Σ_r Σ_{x_r} (x - mean)²) / M            all-reduce of (C,), biased; each rank's
           Σ_{x_r} (x - mean)² = Σ_{x_r} (x - mean_r)² + M_r·(mean_r - mean)², from its own
           centred sum (BatchNorm2D: the same sum, without cancellation)
    xhat = (x - mean) / sqrt(var + eps),   out = gamma·xhat + beta      (as BatchNorm2D)

so mean, var and therefore the running statistics are the same bits on every rank.

Backward.  Each rank's loss is the mean over its own N_r images, so its dout is
∂L_r/∂out with L_r = (1/N_r) Σ_{i in r} ℓ_i, and the step minimises the global mean
L = Σ_r (N_r/N) L_r (the gradient all-reduce weights rank r by N_r/N = M_r/M).  Through the
shared mean and variance, dL/dx on rank r, rescaled to rank r's own scale (× N/N_r) so that
the layers below it and the gradient all-reduce see what they expect, is::

    S1 = Σ_s (M_s/M) Σ_{x_s} dout,    S2 = Σ_s (M_s/M) Σ_{x_s} dout·xhat    one all-reduce of (2C,)
    dx_r = gamma·inv_std · (dout - S1/M_r - xhat·S2/M_r)

With equal batches S/M_r = (Σ over the global batch)/M: the textbook formula with global
sums.  With one rank S1 = Σ dout, S2 = Σ dout·xhat, and this is ``BatchNorm2D.backward``.
dgamma = Σ_{x_r} dout·xhat and dbeta = Σ_{x_r} dout stay this rank's own: the gradient
all-reduce sums them over ranks like every other parameter's gradient.

With a single-process communicator every all-reduce is the identity and each weight is
1.0, so the layer computes the same bits as ``BatchNorm2D`` (tested).
"""
from ..backend import get_array_module
from ..layers.batchnorm import BatchNorm2D


class SyncBatchNorm2D(BatchNorm2D):
    """``BatchNorm2D`` whose training statistics span every rank's batch (see module doc).

    channels, eps, momentum, dtype: as ``BatchNorm2D``; comm: a ``distributed`` communicator.
    Evaluation mode uses the running statistics and communicates nothing.  Every rank must
    call forward and backward for the same layers in the same order (each call is a
    collective); a rank without images in a step calls ``forward_without_data`` and
    ``backward_without_data`` instead.
    """

    def __init__(self, channels, comm, eps=1e-5, momentum=0.1, dtype=None):
        kwargs = {} if dtype is None else {"dtype": dtype}
        super().__init__(channels, eps=eps, momentum=momentum, **kwargs)
        self.comm = comm
        self.share = 1.0  # M_r / M of the last training forward

    @classmethod
    def from_batchnorm(cls, bn, comm):
        """A SyncBatchNorm2D that *shares* ``bn``'s params, grads and buffers dicts, so an
        optimizer built over ``bn`` keeps working with it."""
        sync = cls(bn.channels, comm, eps=bn.eps, momentum=bn.momentum)
        sync.params, sync.grads, sync.buffers = bn.params, bn.grads, bn.buffers
        sync.training = bn.training
        return sync

    def _batch_count(self, m):
        total = round(self.comm.sum([m])[0])
        self.share = m / total if total else 0.0
        return total

    def _batch_sum(self, sums):
        return self.comm.allreduce(sums)  # a fresh (C,) array: reduced in place

    def _gradient_sums(self, sum_dout_xhat, sum_dout):
        xp = get_array_module(sum_dout)
        both = xp.concatenate((sum_dout_xhat, sum_dout))
        both *= self.share                             # 1.0 with one rank: exact
        self.comm.allreduce(both)
        c = self.channels
        return both[:c], both[c:]

    # -- a rank with no image in this step still takes part in every collective -------------
    def forward_without_data(self):
        """Contribute nothing to the forward sums and update the running statistics exactly
        as the ranks with images do."""
        xp = get_array_module(self.params["gamma"])
        zeros = xp.zeros(self.channels, dtype=self.params["gamma"].dtype)
        m = self._batch_count(0)
        mean = self._batch_sum(zeros.copy()) / m
        var = self._batch_sum(zeros.copy()) / m
        self._update_running_statistics(mean, var, m)
        self.cache = None

    def backward_without_data(self):
        """Contribute nothing to backward's two sums; this rank's gamma and beta gradients are 0."""
        xp = get_array_module(self.params["gamma"])
        zeros = xp.zeros(self.channels, dtype=self.params["gamma"].dtype)
        self._gradient_sums(zeros, zeros)
        self.grads["gamma"], self.grads["beta"] = zeros, zeros.copy()

    def __repr__(self):
        return (f"SyncBatchNorm2D({self.channels}, eps={self.eps}, momentum={self.momentum}, "
                f"ranks={self.comm.size})")


def use_sync_batchnorm(model, comm):
    """Replace every ``BatchNorm2D`` of ``model`` (a ``CompactNet``, VGG11 or ResNet18) by a
    ``SyncBatchNorm2D`` sharing its parameters and buffers, where the data path reads it
    (``model.replace_layer``); returns the model.  Safe before or after an optimizer was
    built over ``model.param_layers``."""
    for bn in list(model.bns):
        if not isinstance(bn, SyncBatchNorm2D):
            model.replace_layer(bn, SyncBatchNorm2D.from_batchnorm(bn, comm))
    return model

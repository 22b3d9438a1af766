"""Batch normalization over the channels of an NCHW tensor (paper sec. 3.1, after each conv).

Training mode normalises each channel with the statistics of the current batch, taken over
the M = N·H·W values of that channel, and then applies a learned affine map::

    mean_c = 1/M Σ x,   var_c = 1/M Σ (x - mean_c)²     (biased, used to normalise)
    xhat   = (x - mean_c) / sqrt(var_c + eps)
    out    = gamma_c · xhat + beta_c

and updates the running statistics used in evaluation mode (PyTorch's convention)::

    running_mean = (1 - momentum) · running_mean + momentum · mean_c
    running_var  = (1 - momentum) · running_var  + momentum · var_c · M / (M - 1)

i.e. the running variance tracks the *unbiased* batch variance, exactly as
``torch.nn.BatchNorm2d`` does.  Evaluation mode uses ``running_mean`` / ``running_var``
in place of the batch statistics, so the layer is a fixed per-channel affine map.
"""
import numpy as np

from ..backend import get_array_module
from .base import Layer, check_input

_AXES = (0, 2, 3)  # the statistics of channel c run over batch, height and width


def _per_channel(v):
    """View a (C,) vector as (1, C, 1, 1) so it broadcasts against NCHW (no copy)."""
    return v.reshape(1, -1, 1, 1)


class BatchNorm2D(Layer):
    """Per-channel batch normalization of an (N, C, H, W) input, with a hand-written backward.

    channels: C; eps: added to the variance; momentum: weight of the new batch in the
    running statistics; dtype: of ``gamma``/``beta`` and the running buffers.

    params:  ``gamma`` (C,) = 1, ``beta`` (C,) = 0.
    buffers: ``running_mean`` (C,) = 0, ``running_var`` (C,) = 1 (not trained; saved with
    the model).

    Memory kept for backward: in training mode ``xhat`` (one array of the input's size and
    dtype) and ``inv_std`` (C,); in evaluation mode only a *reference* to the input (no copy)
    and a (C,) vector.  Training forward allocates two input-sized arrays (``xhat`` and the
    output), backward one (``dx``; two in evaluation mode).  Per-channel sums of products
    use ``einsum`` so that no input-sized array of products is written.

    All statistics are computed in the input's dtype (float32 stays float32) and the
    variance is taken in two passes (centre first, then average the squares), which stays
    accurate when |mean| >> std, unlike E[x²] - E[x]².
    """

    def __init__(self, channels, eps=1e-5, momentum=0.1, dtype=np.float32):
        super().__init__()
        if channels < 1:
            raise ValueError(f"BatchNorm2D needs channels >= 1, got {channels}")
        self.channels = int(channels)
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.params = {"gamma": np.ones(channels, dtype=dtype), "beta": np.zeros(channels, dtype=dtype)}
        self.buffers = {"running_mean": np.zeros(channels, dtype=dtype),
                        "running_var": np.ones(channels, dtype=dtype)}
        self.zero_grad()

    def forward(self, x):
        """x: (N, C, H, W) floating, the parameters' dtype → out: (N, C, H, W), same dtype."""
        check_input(self, x, 4, channels=self.channels)
        if self.training:
            return self._forward_train(x)
        return self._forward_eval(x)

    def _forward_train(self, x):
        """Normalise with the batch statistics and update the running statistics."""
        xp = get_array_module(x)
        n, _, h, w = x.shape
        m = self._batch_count(n * h * w)
        if m < 2:
            raise ValueError(f"BatchNorm2D in training mode needs more than one value per channel "
                             f"(N·H·W >= 2), got input of shape {tuple(x.shape)}")
        gamma, beta = self.params["gamma"], self.params["beta"]
        mean = self._batch_sum(x.sum(axis=_AXES)) / m    # (C,), x's dtype
        xhat = x - _per_channel(mean)                  # centred; becomes xhat in place below
        var = self._batch_sum(xp.einsum("nchw,nchw->c", xhat, xhat)) / m  # biased; no squares array
        inv_std = 1.0 / xp.sqrt(var + self.eps)
        xhat *= _per_channel(inv_std)
        out = xhat * _per_channel(gamma)
        out += _per_channel(beta)
        self._update_running_statistics(mean, var, m)
        self.cache = ("train", xhat, inv_std)
        return out

    def _update_running_statistics(self, mean, var, m):
        """Blend the batch's mean and biased variance (C,), over m values, into the buffers."""
        mom = self.momentum
        rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
        rm *= 1.0 - mom
        rm += mom * mean
        rv *= 1.0 - mom
        rv += (mom * m / (m - 1)) * var                # unbiased variance, as PyTorch

    # Where "the batch" is: this process's own here; SyncBatchNorm2D (distributed/sync_batchnorm.py)
    # overrides these three to take every rank's batch of a data-parallel step.
    def _batch_count(self, m):
        """M, the values per channel in the batch, from this process's m = N·H·W."""
        return m

    def _batch_sum(self, sums):
        """Per-channel sums (C,) over the batch, from this process's sums."""
        return sums

    def _gradient_sums(self, sum_dout_xhat, sum_dout):
        """backward's two sums Σ dout·xhat and Σ dout (C,), from this process's."""
        return sum_dout_xhat, sum_dout

    def _forward_eval(self, x):
        """A fixed per-channel affine map built from the running statistics."""
        xp = get_array_module(x)
        gamma, beta = self.params["gamma"], self.params["beta"]
        inv_std = 1.0 / xp.sqrt(self.buffers["running_var"] + self.eps)
        scale = gamma * inv_std                        # (C,)
        shift = beta - self.buffers["running_mean"] * scale
        out = x * _per_channel(scale)
        out += _per_channel(shift)
        self.cache = ("eval", x, inv_std)
        return out

    def backward(self, dout):
        """dout: (N, C, H, W) → dx (N, C, H, W); fills grads ``gamma`` and ``beta`` (C,).

        Training mode, with M = N·H·W and sums over (N, H, W) per channel, the compact form
        of the gradient through the batch mean and variance::

            dbeta  = Σ dout,   dgamma = Σ dout·xhat,   dxhat = gamma·dout
            dx = gamma·inv_std / M · (M·dout - Σ dout - xhat · Σ dout·xhat)

        Evaluation mode (statistics are constants): dx = gamma·inv_std·dout.
        """
        if self.cache is None:
            raise RuntimeError("BatchNorm2D.backward called before forward")
        mode, a, inv_std = self.cache
        if dout.shape != a.shape:
            raise ValueError(f"BatchNorm2D.backward expects dout of shape {tuple(a.shape)}, "
                             f"got {tuple(dout.shape)}")
        xp = get_array_module(dout)
        gamma = self.params["gamma"]
        if mode == "train":
            xhat = a
            m = xhat.shape[0] * xhat.shape[2] * xhat.shape[3]
            dgamma = xp.einsum("nchw,nchw->c", dout, xhat)
            dbeta = dout.sum(axis=_AXES)
            sum_dout_xhat, sum_dout = self._gradient_sums(dgamma, dbeta)
            dx = xhat * _per_channel(sum_dout_xhat / m)
            xp.subtract(dout, dx, out=dx)
            dx -= _per_channel(sum_dout / m)
            dx *= _per_channel(gamma * inv_std)
        else:
            x = a
            centred = x - _per_channel(self.buffers["running_mean"])  # xhat = centred·inv_std
            dgamma = xp.einsum("nchw,nchw->c", dout, centred) * inv_std
            dbeta = dout.sum(axis=_AXES)
            dx = dout * _per_channel(gamma * inv_std)
        self.grads["gamma"] = dgamma
        self.grads["beta"] = dbeta
        return dx

    def __repr__(self):
        return f"BatchNorm2D({self.channels}, eps={self.eps}, momentum={self.momentum})"

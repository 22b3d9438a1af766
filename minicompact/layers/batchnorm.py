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

``batchnorm_forward`` / ``batchnorm_backward`` are the training-mode pair to read, one screen
each (CS231n's layers); the tests hold ``BatchNorm2D`` against them.  The layer computes the
same in the steps below, with fewer input-sized arrays and room for sync batch-norm.

Training mode runs in four steps, each a function below with a CUDA kernel as its GPU twin
(``cuda/batchnorm.py``; the functions are what the CPU runs and what the kernels are tested
against), with the layer's hooks in between, where sync batch-norm all-reduces::

    forward:  batch_statistics  -> _batch_sum (twice) -> normalise
    backward: gradient_sums     -> _gradient_sums     -> input_gradient

**The ReLU after it, fused (GPU only).**  ``forward_relu`` is a training forward followed by
``ReLU``, with ``normalise_relu`` in place of ``normalise``; its backward takes the gradient
of the ReLU's output and masks it inside ``gradient_sums_relu`` and ``input_gradient_relu``.
``CompactNet`` uses it, skipping the ReLU layer, only for GPU arrays in training mode (three
launches fewer a layer); the CPU runs ``forward`` and then the ``ReLU`` layer, as written.
"""
import numpy as np

from ..backend import get_array_module
from ..cuda import CudaKernel
from ..cuda import batchnorm as cuda_bn
from .activations import relu, relu_backward
from .base import Layer, check_input

_AXES = (0, 2, 3)  # the statistics of channel c run over batch, height and width


def _per_channel(v):
    """View a (C,) vector as (1, C, 1, 1) so it broadcasts against NCHW (no copy)."""
    return v.reshape(1, -1, 1, 1)


def batchnorm_forward(x, gamma, beta, eps=1e-5):
    """Training-mode batch normalization with the batch's own statistics (Ioffe & Szegedy 2015,
    Algorithm 1), per channel over the M = N·H·W values of that channel.

    x: (N, C, H, W); gamma, beta: (C,).  Returns (out, cache): out = gamma·xhat + beta,
    (N, C, H, W), x's dtype, with xhat = (x - mean) / sqrt(var + eps) and var the biased
    batch variance; cache = (xhat, gamma, inv_std) for ``batchnorm_backward``.
    """
    xp = get_array_module(x)
    mean = x.mean(axis=_AXES, keepdims=True)                 # (1, C, 1, 1)
    var = x.var(axis=_AXES, keepdims=True)
    inv_std = 1.0 / xp.sqrt(var + eps)
    xhat = (x - mean) * inv_std
    out = _per_channel(gamma) * xhat + _per_channel(beta)
    return out, (xhat, gamma, inv_std)


def batchnorm_backward(dout, cache):
    """Gradients of ``batchnorm_forward`` through the batch mean and variance (CS231n's
    ``batchnorm_backward_alt``), sums per channel over the M = N·H·W values::

        dbeta = Σ dout,   dgamma = Σ dout·xhat,
        dx = gamma·inv_std / M · (M·dout - Σ dout - xhat · Σ dout·xhat)

    dout: (N, C, H, W), not modified; cache from forward.
    Returns (dx (N, C, H, W), dgamma (C,), dbeta (C,)), dout's dtype.
    """
    xhat, gamma, inv_std = cache
    m = dout.size // dout.shape[1]
    dbeta = dout.sum(axis=_AXES)
    dgamma = (dout * xhat).sum(axis=_AXES)
    dx = (_per_channel(gamma) * inv_std / m
          * (m * dout - _per_channel(dbeta) - xhat * _per_channel(dgamma)))
    return dx, dgamma, dbeta


def batch_statistics(x):
    """Per-channel Σ x and Σ (x - x̄)², x̄ = Σ x / (N·H·W) the batch's own mean.

    x: (N, C, H, W) → (sums, centred): two (C,) vectors, x's dtype.  Two passes (centre,
    then square; ``einsum`` writes no array of squares), which stays accurate when
    |mean| >> std, unlike Σ x² - (Σ x)²/M.  Twin of the kernel ``bn_stats``.
    """
    xp = get_array_module(x)
    sums = x.sum(axis=_AXES)
    centred = x - _per_channel(sums / (x.size // x.shape[1]))
    return sums, xp.einsum("nchw,nchw->c", centred, centred)


def normalise(x, mean, inv_std, gamma, beta):
    """xhat = (x - mean)·inv_std and out = gamma·xhat + beta, per channel.

    x: (N, C, H, W); mean, inv_std, gamma, beta: (C,) → (xhat, out), each (N, C, H, W),
    x's dtype.  Twin of the kernel ``bn_normalise``.
    """
    xhat = x - _per_channel(mean)
    xhat *= _per_channel(inv_std)
    out = xhat * _per_channel(gamma)
    out += _per_channel(beta)
    return xhat, out


def gradient_sums(dout, xhat):
    """Per-channel Σ dout·xhat and Σ dout (dgamma and dbeta of this batch).

    dout, xhat: (N, C, H, W) → two (C,) vectors.  Twin of the kernel ``bn_grad_sums``.
    """
    return get_array_module(dout).einsum("nchw,nchw->c", dout, xhat), dout.sum(axis=_AXES)


def input_gradient(dout, xhat, sum_dout_xhat, sum_dout, gamma, inv_std, m):
    """dx = gamma·inv_std · (dout - Σ dout / m - xhat · Σ dout·xhat / m), per channel.

    dout, xhat: (N, C, H, W); the sums, gamma, inv_std: (C,); m: an int → dx (N, C, H, W),
    a new array (dout is left untouched).  Twin of the kernel ``bn_grad_input``.
    """
    xp = get_array_module(dout)
    dx = xhat * _per_channel(sum_dout_xhat / m)
    xp.subtract(dout, dx, out=dx)
    dx -= _per_channel(sum_dout / m)
    dx *= _per_channel(gamma * inv_std)
    return dx


# With the ReLU that follows folded in (``forward_relu``): the functions above and then
# activations.py's ReLU, forward and backward, as the two layers compute them one by one.
def normalise_relu(x, mean, inv_std, gamma, beta):
    """``normalise`` then ReLU: (xhat, max(0, gamma·xhat + beta)).  Twin of ``bn_normalise_relu``."""
    xhat, out = normalise(x, mean, inv_std, gamma, beta)
    return xhat, relu(out)


def gradient_sums_relu(dout, xhat, relu_out):
    """``gradient_sums`` of ReLU's backward dout·[relu_out > 0], relu_out = ``normalise_relu``'s
    out (> 0 exactly where ReLU's input was).  Twin of ``bn_grad_sums_relu``."""
    return gradient_sums(relu_backward(dout, relu_out > 0), xhat)


def input_gradient_relu(dout, xhat, relu_out, sum_dout_xhat, sum_dout, gamma, inv_std, m):
    """``input_gradient`` of dout·[relu_out > 0].  Twin of ``bn_grad_input_relu``."""
    return input_gradient(relu_backward(dout, relu_out > 0), xhat, sum_dout_xhat, sum_dout,
                          gamma, inv_std, m)


# The functions above as CUDA kernels on a GPU (cuda/batchnorm.py), each checked against
# its function at first use; NumPy (and a kernel that fails its check) runs the function.
BN_STATS = CudaKernel("bn_stats", cuda_bn.SOURCE, ["bn_stats"], cuda_bn.launch_stats, batch_statistics,
                      cuda_bn.sample_stats)
BN_NORMALISE = CudaKernel("bn_normalise", cuda_bn.SOURCE, ["bn_normalise"], cuda_bn.launch_normalise,
                          normalise, cuda_bn.sample_normalise)
BN_GRAD_SUMS = CudaKernel("bn_grad_sums", cuda_bn.SOURCE, ["bn_grad_sums"], cuda_bn.launch_grad_sums,
                          gradient_sums, cuda_bn.sample_grad_sums)
BN_GRAD_INPUT = CudaKernel("bn_grad_input", cuda_bn.SOURCE, ["bn_grad_input"], cuda_bn.launch_grad_input,
                           input_gradient, cuda_bn.sample_grad_input)
BN_NORMALISE_RELU = CudaKernel("bn_normalise_relu", cuda_bn.SOURCE, ["bn_normalise_relu"],
                               cuda_bn.launch_normalise_relu, normalise_relu, cuda_bn.sample_normalise)
BN_GRAD_SUMS_RELU = CudaKernel("bn_grad_sums_relu", cuda_bn.SOURCE, ["bn_grad_sums_relu"],
                               cuda_bn.launch_grad_sums_relu, gradient_sums_relu,
                               cuda_bn.sample_grad_sums_relu)
BN_GRAD_INPUT_RELU = CudaKernel("bn_grad_input_relu", cuda_bn.SOURCE, ["bn_grad_input_relu"],
                                cuda_bn.launch_grad_input_relu, input_gradient_relu,
                                cuda_bn.sample_grad_input_relu)


class BatchNorm2D(Layer):
    """Per-channel batch normalization of an (N, C, H, W) input, with a hand-written backward.

    Training mode computes ``batchnorm_forward`` / ``batchnorm_backward`` (the short pair at
    the top of this module, tested against this class) in the steps ``batch_statistics``,
    ``normalise``, ``gradient_sums``, ``input_gradient``: on a GPU their CUDA kernels, with
    the ReLU after it fused by ``forward_relu``; the hooks between the steps let
    ``SyncBatchNorm2D`` take every rank's batch.  Evaluation mode is a fixed affine map.

    channels: C; eps: added to the variance; momentum: weight of the new batch in the
    running statistics; dtype: of ``gamma``/``beta`` and the running buffers.

    params:  ``gamma`` (C,) = 1, ``beta`` (C,) = 0.
    buffers: ``running_mean`` (C,) = 0, ``running_var`` (C,) = 1 (not trained; saved with
    the model).

    Memory kept for backward: in training mode ``xhat`` (one array of the input's size and
    dtype) and ``inv_std`` (C,); in evaluation mode only a *reference* to the input (no copy)
    and a (C,) vector.  Training forward keeps two new input-sized arrays (``xhat`` and the
    output; on the CPU a third, the centred input, lives only inside ``batch_statistics``),
    backward one (``dx``; two in evaluation mode).  Per-channel sums of products use
    ``einsum`` so that no input-sized array of products is written.  After ``forward_relu``
    (GPU) the output is kept too, by reference, in place of the ReLU layer's mask.

    All statistics are computed in the input's dtype (float32 stays float32) and the
    variance from centred values (``batch_statistics``), which stays accurate when
    |mean| >> std, unlike E[x²] - E[x]².
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

    def forward_relu(self, x):
        """Training forward and then ReLU in one step: x (N, C, H, W) → max(0, forward(x)).

        What ``CompactNet`` runs on a GPU in place of this layer and the ``ReLU`` after it
        (the kernel ``bn_normalise_relu``); ``backward`` then takes the gradient of this
        output and applies ReLU's mask itself.  Keeps the output (a reference) for backward.
        """
        check_input(self, x, 4, channels=self.channels)
        if not self.training:
            raise RuntimeError("BatchNorm2D.forward_relu is for training mode only")
        return self._forward_train(x, with_relu=True)

    @property
    def relu_fused(self):
        """Whether the last forward was ``forward_relu`` (backward masks dout itself)."""
        return self.cache is not None and self.cache[0] == "train_relu"

    def _forward_train(self, x, with_relu=False):
        """Normalise with the batch statistics and update the running statistics."""
        xp = get_array_module(x)
        n, _, h, w = x.shape
        m = self._batch_count(n * h * w)
        if m < 2:
            raise ValueError(f"BatchNorm2D in training mode needs more than one value per channel "
                             f"(N·H·W >= 2), got input of shape {tuple(x.shape)}")
        sums, centred = BN_STATS(x)             # (C,) each: Σ x, Σ (x - own mean)²
        own_mean = sums / (n * h * w)
        mean = self._batch_sum(sums) / m                # (C,), x's dtype
        # Move the centred sum from this batch's own mean to the mean of every process's
        # batch (Chan et al.: Σ (x - mean)² = Σ (x - own)² + M_r·(own - mean)², no
        # cancellation; + 0 with one process), then sum it over processes: M·variance.
        centred += (n * h * w) * (own_mean - mean) ** 2
        var = self._batch_sum(centred) / m
        inv_std = 1.0 / xp.sqrt(var + self.eps)
        gamma, beta = self.params["gamma"], self.params["beta"]
        if with_relu:
            xhat, out = BN_NORMALISE_RELU(x, mean, inv_std, gamma, beta)
            self.cache = ("train_relu", xhat, inv_std, out)
        else:
            xhat, out = BN_NORMALISE(x, mean, inv_std, gamma, beta)
            self.cache = ("train", xhat, inv_std)
        self._update_running_statistics(mean, var, m)
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
        After ``forward_relu``, dout is the gradient of the ReLU's output, and each formula
        reads dout·[out > 0] (ReLU's backward) in its place.
        """
        if self.cache is None:
            raise RuntimeError("BatchNorm2D.backward called before forward")
        mode, a, inv_std = self.cache[:3]
        if dout.shape != a.shape:
            raise ValueError(f"BatchNorm2D.backward expects dout of shape {tuple(a.shape)}, "
                             f"got {tuple(dout.shape)}")
        xp = get_array_module(dout)
        gamma = self.params["gamma"]
        if mode == "train":
            xhat = a
            m = xhat.shape[0] * xhat.shape[2] * xhat.shape[3]
            dgamma, dbeta = BN_GRAD_SUMS(dout, xhat)
            sum_dout_xhat, sum_dout = self._gradient_sums(dgamma, dbeta)
            dx = BN_GRAD_INPUT(dout, xhat, sum_dout_xhat, sum_dout, gamma, inv_std, m)
        elif mode == "train_relu":
            xhat, relu_out = a, self.cache[3]
            m = xhat.shape[0] * xhat.shape[2] * xhat.shape[3]
            dgamma, dbeta = BN_GRAD_SUMS_RELU(dout, xhat, relu_out)
            sum_dout_xhat, sum_dout = self._gradient_sums(dgamma, dbeta)
            dx = BN_GRAD_INPUT_RELU(dout, xhat, relu_out, sum_dout_xhat, sum_dout, gamma, inv_std, m)
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

"""The linear soft-max classifier on top of the spatial pyramid (paper sec. 3.2).

Its weights form the tensor W of shape (Y, K, R) — class y, feature map k of the last
feature layer (K = K^{L-1}), pyramid region r — on which the regularizer Ω(W) of Eq. (2)
acts by groups W[y, k, :].  The soft-max itself lives in ``minicompact.losses``; this layer
outputs the class scores.
"""
import numpy as np

from .base import Layer, check_input


class SoftmaxClassifier(Layer):
    """scores[n, y] = Σ_{k,r} W[y, k, r] · f[n, k, r] + b[y], as one GEMM.

    channels: K; regions: R (21 for a depth-3 pyramid); num_classes: Y; dtype: of W and b;
    rng: a ``numpy.random.Generator`` for the initialisation (a fresh one when None).

    params: ``W`` (Y, K, R) ~ N(0, 2 / (R·K)) (He et al., paper sec. 5.1), ``b`` (Y,) = 0.
    Memory kept for backward: a reference to the input f (no copy).
    """

    def __init__(self, channels, regions, num_classes, dtype=np.float32, rng=None):
        super().__init__()
        if min(channels, regions, num_classes) < 1:
            raise ValueError(f"SoftmaxClassifier needs channels, regions and num_classes >= 1, got "
                             f"({channels}, {regions}, {num_classes})")
        self.channels, self.regions, self.num_classes = int(channels), int(regions), int(num_classes)
        rng = np.random.default_rng() if rng is None else rng
        std = np.sqrt(2.0 / (regions * channels))
        W = rng.standard_normal((num_classes, channels, regions)) * std
        self.params = {"W": W.astype(dtype), "b": np.zeros(num_classes, dtype=dtype)}
        self.zero_grad()

    def forward(self, f):
        """f: (N, K, R) pyramid features, the parameters' dtype → scores (N, Y), same dtype."""
        check_input(self, f, 3, channels=self.channels)
        if f.shape[2] != self.regions:
            raise ValueError(f"SoftmaxClassifier expects input of shape (N, {self.channels}, "
                             f"{self.regions}), got shape {tuple(f.shape)}")
        W, b = self.params["W"], self.params["b"]
        f2 = f.reshape(f.shape[0], -1)                 # (N, K·R), a view for contiguous f
        W2 = W.reshape(W.shape[0], -1)                 # (Y, K·R), a view
        scores = f2 @ W2.T                             # W2.T is a view: BLAS reads it transposed
        scores += b
        self.cache = f
        return scores

    def backward(self, dscores):
        """dscores: (N, Y) → df (N, K, R); fills grads ``W`` (Y, K, R) and ``b`` (Y,)."""
        f = self.cache
        if f is None:
            raise RuntimeError("SoftmaxClassifier.backward called before forward")
        n = f.shape[0]
        if dscores.shape != (n, self.num_classes):
            raise ValueError(f"SoftmaxClassifier.backward expects dscores of shape "
                             f"{(n, self.num_classes)}, got {tuple(dscores.shape)}")
        W = self.params["W"]
        f2 = f.reshape(n, -1)
        self.grads["W"] = (dscores.T @ f2).reshape(W.shape)     # (Y, K·R) → (Y, K, R)
        self.grads["b"] = dscores.sum(axis=0)
        return (dscores @ W.reshape(W.shape[0], -1)).reshape(f.shape)

    def __repr__(self):
        return f"SoftmaxClassifier({self.channels}, {self.regions}, {self.num_classes})"

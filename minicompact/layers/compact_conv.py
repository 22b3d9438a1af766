"""A convolution whose filters read only some input channels: Γ's compactness made fast (eq. 6).

Γ (eq. 6) zeroes whole groups Θ^l[k, t, :, :]: filter k stops reading input channel t.  A
dense convolution still multiplies those zeros.  Here the K filters are split into groups
g = 1..G; group g reads only U_g, the union of the channels its filters read, so

    y[F_g] = Θ[F_g][:, U_g] ⋆ x[:, U_g]        (one im2col of x[:, U_g] and one GEMM per group)

which is exactly the dense result (the skipped groups are zero) with Σ_g |F_g|·|U_g| instead
of K·C channel pairs.  The loop runs over the G filter groups (a handful), never over
filters, channels or pixels.  ``group_filters`` chooses the groups from the zero pattern;
with one group holding every filter and every channel it is the dense convolution.

``compact_conv_forward`` / ``compact_conv_backward`` are the pure function pair, written
against ``xp``; ``CompactConv2D`` wraps them.  Its ``W`` is the full (K, C, kh, kw) array,
but only the entries inside the groups' supports are read or trained: backward returns
zero gradient elsewhere (the dead groups of Γ stay dead while fine-tuning).
"""
import numpy as np

from ..backend import get_array_module, to_cpu
from ..im2col import col2im, im2col, output_size
from .base import Layer, check_input, kernel_pair


def _index(xp, idx):
    """A slice when ``idx`` (sorted ints) is a contiguous range (a view, no copy), else an array."""
    idx = np.asarray(idx, dtype=np.int64)
    if idx.size and (idx == np.arange(idx[0], idx[0] + idx.size)).all():
        return slice(int(idx[0]), int(idx[0]) + idx.size)
    return xp.asarray(idx)


def compact_conv_forward(x, weights, groups, stride=1, padding=0, workspaces=None):
    """y[:, F_g] = Σ_{t∈U_g} x[:, t] ⋆ Θ[F_g, t] for each group g, as one GEMM per group.

    x: (N, C, H, W); weights: list of G arrays (|F_g|, |U_g|, kh, kw), x's dtype;
    groups: list of G pairs (filters F_g, channels U_g), each an index (slice or int array)
    over K output resp. C input channels; the F_g partition 0..K-1.  workspaces: optional
    list of G buffers for the column matrices (see ``im2col``; None entries allocate).
    Returns (out (N, K, Ho, Wo) contiguous, cols: list of G column matrices
    (|U_g|·kh·kw, N·Ho·Wo) that backward needs).
    """
    xp = get_array_module(x)
    n = x.shape[0]
    k = sum(w.shape[0] for w in weights)
    kh, kw = weights[0].shape[2:]
    ho, wo = output_size(x.shape[2], kh, stride, padding), output_size(x.shape[3], kw, stride, padding)
    out = xp.empty((n, k, ho, wo), dtype=x.dtype)
    out_t = out.transpose(1, 0, 2, 3)         # (K, N, Ho, Wo) view: rows of filters
    cols = []
    for g, (w, (f, u)) in enumerate(zip(weights, groups)):
        # x[:, u] is a view for a contiguous range; otherwise a copy of only |U_g| channels
        ws = None if workspaces is None else workspaces[g]
        c = im2col(x[:, u], kh, kw, stride, padding, out=ws)
        y = w.reshape(w.shape[0], -1) @ c      # (|F_g|, N·Ho·Wo)
        # the one transpose copy the dense conv makes too, group by group
        out_t[f] = y.reshape(w.shape[0], n, ho, wo)
        cols.append(c)
    return out, cols


def compact_conv_backward(dout, cols, weights, groups, x_shape, stride=1, padding=0, input_grad=True):
    """Gradients of ``compact_conv_forward`` for each group: dΘ_g = dy_g · cols_gᵀ and
    dx[:, U_g] += col2im(Θ_gᵀ · dy_g).

    dout: (N, K, Ho, Wo) (not modified); cols, weights, groups: as forward; x_shape: (N, C, H, W).
    Returns (dx (N, C, H, W) or None when not input_grad, [dΘ_g (|F_g|, |U_g|, kh, kw)]).
    """
    xp = get_array_module(dout)
    k = dout.shape[1]
    kh, kw = weights[0].shape[2:]
    dy = xp.ascontiguousarray(dout.transpose(1, 0, 2, 3)).reshape(k, -1)   # (K, N·Ho·Wo)
    dx = xp.zeros(x_shape, dtype=dout.dtype) if input_grad else None
    dws = []
    for w, c, (f, u) in zip(weights, cols, groups):
        dyg = dy[f]
        dws.append((c @ dyg.T).T.reshape(w.shape))
        if input_grad:
            shape = (x_shape[0], w.shape[1]) + tuple(x_shape[2:])
            # a group's channels are distinct, so this += adds each exactly once
            dx[:, u] += col2im(w.reshape(w.shape[0], -1).T @ dyg, shape, kh, kw, stride, padding)
    return dx, dws


def group_filters(W, im2col_cost=16.0, group_cost=None):
    """Split the filters of Θ (K, C, kh, kw) into groups that read few channels (Γ's zeros).

    Orders the filters so that neighbours read similar channels (a greedy chain by the
    number of channels two filters share), then cuts the order into contiguous groups by
    dynamic programming on the cost per output pixel of one group,
    ``S·|F|·|U| + im2col_cost·S·|U| + group_cost`` (S = kh·kw: the GEMM's multiply-adds
    and the im2col copy of its channels, which costs about ``im2col_cost`` multiply-adds an
    element; ``group_cost`` the fixed cost of one more GEMM, default S·C).
    Returns a list of (filters, channels) pairs of sorted int arrays; filters of all groups
    partition 0..K-1; a filter reading nothing gets a group of its own with no channel only
    if every filter reads nothing (it contributes zeros).
    """
    W = np.asarray(W)
    k, c = W.shape[:2]
    s = W.shape[2] * W.shape[3]
    group_cost = s * c if group_cost is None else group_cost
    use = W.reshape(k, c, -1).any(axis=2)                       # (K, C): filter reads channel
    if not use.any():
        return [(np.arange(k), np.arange(min(1, c)))]
    counts = use.sum(axis=1)
    shared = use.astype(np.int64) @ use.T.astype(np.int64)    # (K, K): channels two filters share
    order = [int(np.argmax(counts))]
    left = np.ones(k, dtype=bool)
    left[order[0]] = False
    for _ in range(k - 1):
        cand = np.flatnonzero(left)
        # most shared channels, then the fewest new ones
        nxt = cand[np.lexsort((counts[cand] - shared[order[-1], cand], -shared[order[-1], cand]))[0]]
        order.append(int(nxt))
        left[nxt] = False
    order = np.array(order)
    # best[i] = cheapest cut of order[:i]; a segment order[j:i] reads the union of its rows
    best = np.full(k + 1, np.inf)
    best[0], cut = 0.0, np.zeros(k + 1, dtype=np.int64)
    for i in range(1, k + 1):
        union = np.zeros(c, dtype=bool)
        for j in range(i - 1, -1, -1):
            union |= use[order[j]]
            u = int(union.sum())
            cost = best[j] + s * (i - j) * u + im2col_cost * s * u + group_cost
            if cost < best[i]:
                best[i], cut[i] = cost, j
    groups, i = [], k
    while i > 0:
        j = cut[i]
        f = np.sort(order[j:i])
        u = np.flatnonzero(use[f].any(axis=0))
        groups.append((f, u if u.size else np.arange(1)))
        i = j
    return groups[::-1]


def dense_fraction(groups, k, c):
    """Σ_g |F_g|·|U_g| / (K·C): the share of the dense convolution's channel pairs computed."""
    return sum(len(f) * len(u) for f, u in groups) / float(k * c)


class CompactConv2D(Layer):
    """A bias-free convolution whose filter groups read only their channels (eq. 6's zeros).

    W: (K, C, kh, kw) weights (a ``Conv2D``'s); groups: list of (filters, channels) int
    arrays from ``group_filters`` (default: computed from W's zero groups); stride, padding:
    ints.  Same forward as ``Conv2D`` whenever W is zero outside the groups (entries outside
    are ignored and get zero gradient).  params: ``W`` (K, C, kh, kw); dtype: W's.
    need_input_grad: False skips dx (the first layer).
    """

    def __init__(self, W, groups=None, stride=1, padding=0, need_input_grad=True):
        super().__init__()
        W = np.asarray(W) if isinstance(W, np.ndarray) else W
        self.out_channels, self.in_channels = int(W.shape[0]), int(W.shape[1])
        self.kernel_size = kernel_pair(tuple(int(v) for v in W.shape[2:]), "kernel_size")
        self.stride, self.padding = int(stride), int(padding)
        self.need_input_grad = bool(need_input_grad)
        self.groups = group_filters(to_cpu(W)) if groups is None else [
            (np.asarray(f, dtype=np.int64), np.asarray(u, dtype=np.int64)) for f, u in groups]
        covered = np.sort(np.concatenate([f for f, _ in self.groups]))
        if not np.array_equal(covered, np.arange(self.out_channels)):
            raise ValueError(f"CompactConv2D: the groups' filters must partition 0..{self.out_channels - 1}")
        self.params = {"W": W}
        self.zero_grad()

    def _split(self):
        """Per group: its (F_g, U_g) indices on W's device and its weights Θ[F_g][:, U_g]."""
        xp = get_array_module(self.params["W"])
        W = self.params["W"]
        idx = [(_index(xp, f), _index(xp, u)) for f, u in self.groups]
        weights = [xp.ascontiguousarray(W[f][:, u]) for f, u in idx]
        return idx, weights

    def forward(self, x):
        """x: (N, C, H, W), W's dtype → (N, K, Ho, Wo), same dtype."""
        kh, kw = self.kernel_size
        p = self.padding
        check_input(self, x, 4, channels=self.in_channels,
                    min_hw=(max(1, kh - 2 * p), max(1, kw - 2 * p)))
        if self.cache is not None and not self.training and self.cache[0] == "eval":
            idx, weights = self.cache[1], self.cache[2]      # evaluation: weights do not change
        else:
            idx, weights = self._split()
        ws = None
        if self.cache is not None and self.cache[4] is not None:  # the last forward's buffers
            ws = [c if c.shape == (w.shape[1] * kh * kw, self._pixels(x)) and c.dtype == x.dtype
                  else None for c, w in zip(self.cache[4], weights)]
        out, cols = compact_conv_forward(x, weights, idx, self.stride, p, workspaces=ws)
        self.cache = ("train" if self.training else "eval", idx, weights, x.shape, cols)
        return out

    def _pixels(self, x):
        (kh, kw), s, p = self.kernel_size, self.stride, self.padding
        return x.shape[0] * output_size(x.shape[2], kh, s, p) * output_size(x.shape[3], kw, s, p)

    def backward(self, dout):
        """dout: (N, K, Ho, Wo) → dx (N, C, H, W) (None if not need_input_grad); fills
        ``grads["W"]`` (zero outside the groups)."""
        if self.cache is None or self.cache[4] is None:
            raise RuntimeError("CompactConv2D.backward needs a forward first")
        _, idx, weights, x_shape, cols = self.cache
        xp = get_array_module(dout)
        dx, dws = compact_conv_backward(dout, cols, weights, idx, x_shape, self.stride,
                                        self.padding, input_grad=self.need_input_grad)
        dW = xp.zeros_like(self.params["W"])
        for (f, u), dw in zip(self.groups, dws):
            dW[xp.ix_(xp.asarray(f), xp.asarray(u))] = dw
        self.grads["W"] = dW
        return dx

    def train(self, mode=True):
        self.cache = None           # evaluation caches the split weights; training must not
        return super().train(mode)

    def __repr__(self):
        kh, kw = self.kernel_size
        frac = dense_fraction(self.groups, self.out_channels, self.in_channels)
        return (f"CompactConv2D({self.in_channels}, {self.out_channels}, kernel_size=({kh}, {kw}), "
                f"stride={self.stride}, padding={self.padding}, groups={len(self.groups)}, "
                f"computes {100 * frac:.0f}% of the dense channel pairs)")

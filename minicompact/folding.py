"""Folding removed channels: what a conv, its batch norm and the classifier become without them.

Both kinds of thinning use these (``thin.thin_model`` along a CompactNet's chain,
``thin_graph.thin_network`` across a ResNet's residual connections).  A removed channel k that
a kept filter still reads is a constant c_k (its filter is dead: all zero, or reading only
removed channels), so it adds δ_j = Σ_k c_k Σ_taps Θ[j, k] to filter j's pre-BN map, which
the batch norm absorbs as μ_j ← μ_j − δ_j; the classifier's biases absorb
Σ_k c_k Σ_r W[y, k, r] (a pyramid or global average of a constant map is that constant).
Exact except within kh//2 pixels of a zero-padded border (``thin.py``).
"""
import numpy as np

BN_ARRAYS = ("gamma", "beta", "running_mean", "running_var")


def fold_conv(T, bn, keep_in, const_in, keep_out, eps):
    """One conv and its batch norm without their removed channels, and the constant each
    filter outputs when it reads only removed (constant) channels (module docstring).

    T: Θ (K, C, kh, kw); bn: dict of the batch norm's arrays ("gamma", "beta",
    "running_mean", "running_var"), each (K,); keep_in: bool (C,), the input channels kept;
    const_in: float64 (C,), the value of each removed input channel (read where ~keep_in);
    keep_out: bool (K,), the filters kept; eps: the batch norm's ε.
    Returns (arrays, bn_const, folded): arrays, the conv's "W" (K', C', kh, kw) and its batch
    norm's four (K',) arrays, in their own dtypes; bn_const, float64 (K,): the batch norm's
    output (γ (δ − μ)/√(σ² + ε) + β) of a filter whose kept inputs are all zero;
    folded: how many (kept filter, removed input) pairs added a nonzero constant.
    """
    tap_sums = T[:, ~keep_in].astype(np.float64).sum(axis=(2, 3))          # (K, removed)
    delta = tap_sums @ const_in[~keep_in]
    mean = bn["running_mean"].astype(np.float64)
    scale = bn["gamma"].astype(np.float64) / np.sqrt(bn["running_var"].astype(np.float64) + eps)
    bn_const = (delta - mean) * scale + bn["beta"].astype(np.float64)
    arrays = {"W": T[keep_out][:, keep_in],
              "gamma": bn["gamma"][keep_out], "beta": bn["beta"][keep_out],
              "running_mean": (mean - delta)[keep_out].astype(bn["running_mean"].dtype),
              "running_var": bn["running_var"][keep_out]}
    folded = int(np.count_nonzero((tap_sums[keep_out] != 0) & (const_in[~keep_in] != 0)[None, :]))
    return arrays, bn_const, folded


def conv_record(name, T, keep_in, keep_out, alive, thin_W, folded):
    """One conv's row of a thinning record: widths, inputs and parameters before and after,
    the removed filters that were all zero, constant (reading no kept input) or unread, the
    kept filters that are dead ("dead_kept": a ResNet keeps those whose residual channel
    lives; 0 along a chain) and ``fold_conv``'s count of folded constants.

    name: the conv's name; T: Θ (K, C, kh, kw); keep_in (C,), keep_out (K,), alive (K,):
    booleans; thin_W: the kept Θ; folded: ``fold_conv``'s count."""
    groups = T.reshape(T.shape[0], T.shape[1], -1).any(axis=2)
    all_zero = ~groups.any(axis=1)
    reads_kept = groups[:, keep_in].any(axis=1)
    removed = ~keep_out
    return {"layer": name, "filters_before": int(T.shape[0]), "filters_after": int(keep_out.sum()),
            "inputs_before": int(T.shape[1]), "inputs_after": int(keep_in.sum()),
            "params_before": int(T.size + 2 * T.shape[0]),
            "params_after": int(thin_W.size + 2 * keep_out.sum()),
            "zero_filters": int((removed & all_zero).sum()),
            "constant_filters": int((removed & ~all_zero & ~reads_kept).sum()),
            "unread_filters": int((removed & ~all_zero & reads_kept).sum()),
            "dead_kept": int((keep_out & ~alive).sum()),
            "folded_constants": folded}


def fold_classifier(W, b, keep, const):
    """The classifier without its removed input maps, their constants folded into b.

    W: (Y, K, R); b: (Y,); keep: bool (K,), the maps kept; const: float64 (K,), the value of
    each removed map (read where ~keep).  Returns (arrays, row): "W" (Y, K', R) and "b" (Y,)
    in their own dtypes, and its row of the thinning record.
    """
    shift = W[:, ~keep, :].astype(np.float64).sum(axis=2) @ const[~keep]        # (Y,)
    arrays = {"W": W[:, keep, :], "b": (b.astype(np.float64) + shift).astype(b.dtype)}
    row = {"layer": "classifier", "filters_before": int(W.shape[0]), "filters_after": int(W.shape[0]),
           "inputs_before": int(W.shape[1]), "inputs_after": int(keep.sum()),
           "params_before": int(W.size + b.size), "params_after": int(arrays["W"].size + b.size),
           "folded_constants": int(np.count_nonzero((const[~keep] != 0) & W[:, ~keep, :].any(axis=(0, 2))))}
    return arrays, row

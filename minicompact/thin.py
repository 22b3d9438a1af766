"""Thinning: remove a trained CompactNet's dead structure for real (paper secs. 4 and 5.2.2).

``metrics.alive_channels`` finds, to a fixed point, the channels whose removal leaves the
network's function unchanged: filters that are all zero or read only dead channels (their
map is a constant), filters no alive filter or class reads, and so input channels no alive
filter reads and feature maps no class reads.  ``thin_model`` builds the narrower network
that ``metrics.effective_parameters`` counts ("structural"): a ``CompactNet`` with explicit
per-layer widths (``ModelConfig.layer_widths``), holding the alive rows and columns of every
Θ^l and of W, the alive batch-norm parameters and running statistics.

Folding the constants.  A dead filter k of layer l outputs a constant map: its pre-BN map
is a constant u_k (0 for an all-zero filter), so after evaluation-mode batch norm, ReLU and
max-pooling (padded with -inf, so still constant) it is the constant

    c_k = max(0, γ_k (u_k - μ_k) / sqrt(σ²_k + ε) + β_k).

A consumer j of layer l+1 then receives, *away from the zero-padded borders*, the constant
δ_j = Σ_{k dead} c_k · Σ_taps Θ^{l+1}[j, k] on its pre-BN map, and its batch norm computes
(y_j + δ_j - μ_j)·s_j: the thin model gets the same from y_j alone with μ_j ← μ_j - δ_j.
u of a dead filter of l+1 is its δ.  After the last feature layer the spatial pyramid of a
constant map is that constant in every region, so class y's score shifts by
Σ_{k dead} c_k Σ_r W[y, k, r], which goes into the bias b_y (exactly, no border there).

Inexact only at the borders: within kh//2 pixels of an edge the dense conv sees the
constant only through the in-image taps, the thin one assumes all taps.  The difference is
zero where a dead channel's constant is 0 (ReLU cut it) or its consumers' weights are
centre-only, and it is *measured* by ``compare_predictions`` (scores and predictions of the
dense and thin model on the same images); ``thin_run`` writes it into the report.

The first layer's input channels (the image's colours) are never removed: the data would
have to change with them.
"""
from dataclasses import replace

import numpy as np

from .backend import device_of, get_array_module, to_cpu
from .data.folders import DatasetError, open_dataset
from .data.loader import BatchLoader
from .data.transforms import estimate_mean_std, normalize, scaled_sizes
from .harness.atomic import atomic_write
from .harness.checkpoint import save_checkpoint
from .harness.checkpoint_check import read_checkpoint
from .harness.report import to_python
from .harness.rundir import (OutputError, check_writable, claim_new_folder, finished_or_removed, held_files,
                             remove_files)
from .layers.compact_conv import CompactConv2D, dense_fraction
from .losses import accuracy_topk, softmax
from .metrics import alive_channels, threshold_
from .model import CompactNet


class NothingToRemove(ValueError):
    """The network has no dead structure: thinning would return the same network."""


def _dead_error(l, k):
    return ValueError(f"every one of the {k} filters of conv{l} is dead (all zero, or read by no "
                      "class): the network's output does not depend on its input; nothing to thin")


def thin_model(model, threshold=None):
    """The network without its dead structure, and a record of what was removed.

    model: a ``CompactNet`` (any mode, any device, float32 or float64; not modified).
    threshold: zero |w| < threshold in copies of Θ^l and W first (sec. 5.2.1); None: only
    exact zeros count.
    Returns (thin, record): thin, a ``CompactNet`` on model's device and dtype, in
    evaluation mode, whose ``config.layer_widths`` are the alive counts; record, a dict of
    Python values: "layers" (one dict per conv and the classifier: widths, inputs and
    parameters before/after, how many filters were all zero, constant or unread, and how
    many constants were folded), "removed" (channels removed in all), "changed" (False when
    nothing was removed).  Raises ``ValueError`` (one line) when a whole layer is dead.
    """
    # Copies (state_arrays returns NumPy arrays themselves): the model is never modified.
    arrays = {k: np.array(v, copy=True) for k, v in model.state_arrays().items()}
    L1 = len(model.convs)
    thetas = [arrays[f"conv{l}.W"] for l in range(1, L1 + 1)]
    W, b = arrays["classifier.W"], arrays["classifier.b"]
    if threshold is not None:
        threshold_(thetas + [W], threshold)
    alive = alive_channels(thetas, W)
    if not all(a.any() for a in alive):       # one dead layer kills all: name where it starts
        zero_layers = [l for l, t in enumerate(thetas, 1) if not t.any()]
        l = zero_layers[0] if zero_layers else (len(thetas) if not W.any() else
                                                 next(l for l, a in enumerate(alive, 1) if not a.any()))
        raise _dead_error(l, thetas[l - 1].shape[0])

    out, layers = {}, []
    prev_alive, prev_const = None, None                 # of layer l-1: (K,) bool, (K,) float64
    for l in range(1, L1 + 1):
        T = thetas[l - 1]
        a = alive[l - 1]
        bn = model.bns[l - 1]
        gamma, beta = arrays[f"bn{l}.gamma"].astype(np.float64), arrays[f"bn{l}.beta"].astype(np.float64)
        mean, var = arrays[f"bn{l}.running_mean"].astype(np.float64), arrays[f"bn{l}.running_var"]
        if prev_alive is None:
            delta = np.zeros(T.shape[0])
            inputs = slice(None)                         # the image: every colour stays
        else:
            # δ_j = Σ_{k dead} c_k Σ_taps Θ[j, k]: the constant the removed inputs added
            tap_sums = T[:, ~prev_alive].astype(np.float64).sum(axis=(2, 3))      # (K, dead)
            delta = tap_sums @ prev_const[~prev_alive]
            inputs = prev_alive
        scale = gamma / np.sqrt(var.astype(np.float64) + bn.eps)
        const = np.maximum(0.0, (delta - mean) * scale + beta)    # c_k of a dead filter k
        const[a] = 0.0
        group_zero = ~T.reshape(T.shape[0], T.shape[1], -1).any(axis=2)
        all_zero = group_zero.all(axis=1)
        reads_alive = (~group_zero[:, inputs]).any(axis=1) if prev_alive is not None else ~all_zero
        out[f"conv{l}.W"] = T[a][:, inputs]
        out[f"bn{l}.gamma"], out[f"bn{l}.beta"] = arrays[f"bn{l}.gamma"][a], arrays[f"bn{l}.beta"][a]
        out[f"bn{l}.running_mean"] = (mean - delta)[a].astype(arrays[f"bn{l}.running_mean"].dtype)
        out[f"bn{l}.running_var"] = var[a]
        folded = 0 if prev_alive is None else int(np.count_nonzero(
            (np.abs(tap_sums[a]) > 0) & (prev_const[~prev_alive] != 0)[None, :]))
        k_in = T.shape[1]
        layers.append({
            "layer": f"conv{l}", "filters_before": int(T.shape[0]), "filters_after": int(a.sum()),
            "inputs_before": int(k_in), "inputs_after": int(k_in if prev_alive is None else prev_alive.sum()),
            "params_before": int(T.size + 2 * T.shape[0]),
            "params_after": int(out[f"conv{l}.W"].size + 2 * a.sum()),
            "zero_filters": int(all_zero.sum()),
            "constant_filters": int((~a & ~all_zero & ~reads_alive).sum()),
            "unread_filters": int((~a & ~all_zero & reads_alive).sum()),
            "folded_constants": folded})
        prev_alive, prev_const = a, const

    # The classifier: drop the maps no class reads or that are constant; fold c_k into b.
    shift = W[:, ~prev_alive, :].astype(np.float64).sum(axis=2) @ prev_const[~prev_alive]    # (Y,)
    out["classifier.W"] = W[:, prev_alive, :]
    out["classifier.b"] = (b.astype(np.float64) + shift).astype(b.dtype)
    layers.append({
        "layer": "classifier", "filters_before": int(W.shape[0]), "filters_after": int(W.shape[0]),
        "inputs_before": int(W.shape[1]), "inputs_after": int(prev_alive.sum()),
        "params_before": int(W.size + b.size), "params_after": int(out["classifier.W"].size + b.size),
        "folded_constants": int(np.count_nonzero(
            (prev_const[~prev_alive] != 0) & W[:, ~prev_alive, :].any(axis=(0, 2))))})

    widths = tuple(int(a.sum()) for a in alive)
    config = _with_widths(model.config, widths)
    dtype = model.classifier.params["W"].dtype
    thin = CompactNet(config, dtype=dtype, input_grad=model.convs[0].need_input_grad)
    thin.load_state_arrays(out)
    thin.to(device_of(model.classifier.params["W"])).eval()
    removed = sum(int((~a).sum()) for a in alive)
    return thin, {"layers": layers, "widths_before": [int(a.size) for a in alive],
                  "widths_after": list(widths), "removed": removed, "changed": removed > 0,
                  "params_before": model.parameter_count(), "params_after": thin.parameter_count()}


def _with_widths(config, widths):
    """A copy of ``config`` with explicit ``layer_widths`` (None when they equal the rule's)."""
    rule = replace(config, layer_widths=None).filter_counts()
    return replace(config, layer_widths=None if list(widths) == rule else tuple(widths)).validate()


def use_compact_convs(model, names, groups=None):
    """Swap the named convs of ``model`` (e.g. ["conv3"]) for ``CompactConv2D`` layers with
    the same weights, in place; returns model.  groups: dict name -> groups (default:
    ``group_filters`` of the weights).  The saved arrays do not change (``state_arrays``)."""
    for name in names:
        l = int(name[4:]) - 1
        old = model.convs[l]
        new = CompactConv2D(old.params["W"], groups=(groups or {}).get(name), stride=old.stride,
                            padding=old.padding, need_input_grad=old.need_input_grad)
        new.train(model.training)
        model.convs[l] = new
        model.layers[model.layers.index(old)] = new
    return model


def choose_convs(model, x, repeats=5, min_gain=1.1):
    """Per conv layer, measure once whether ``CompactConv2D`` beats the dense GEMM; use it
    where it does (by ``min_gain`` or more).  model: a (thin) ``CompactNet``, changed in
    place; x: a batch of its inputs (the layer inputs are this batch's activations).
    Timings alternate dense and compact calls on the layer's real input.
    Returns one dict per conv: layer, groups, computed (share of the dense channel pairs
    the groups compute), dense_ms, compact_ms, choice ("compact" or "dense").
    """
    import time
    was = model.training
    model.eval()
    records, chosen = [], []
    h = x
    for l, conv in enumerate(list(model.convs)):
        compact = CompactConv2D(conv.params["W"], stride=conv.stride, padding=conv.padding).eval()
        frac = dense_fraction(compact.groups, conv.out_channels, conv.in_channels)
        times = {"dense": [], "compact": []}
        if frac < 1.0:
            conv.forward(h), compact.forward(h)
            for _ in range(repeats):
                for name, layer in (("dense", conv), ("compact", compact)):
                    t0 = time.perf_counter()
                    layer.forward(h)
                    times[name].append(time.perf_counter() - t0)
        dense_s = float(np.median(times["dense"])) if times["dense"] else None
        compact_s = float(np.median(times["compact"])) if times["compact"] else None
        better = compact_s is not None and dense_s >= min_gain * compact_s
        records.append({"layer": f"conv{l + 1}", "groups": len(compact.groups), "computed": frac,
                        "dense_ms": None if dense_s is None else 1e3 * dense_s,
                        "compact_ms": None if compact_s is None else 1e3 * compact_s,
                        "choice": "compact" if better else "dense"})
        if better:
            chosen.append(f"conv{l + 1}")
        for layer in model.layers[4 * l:4 * l + 4]:      # conv, BN, ReLU, pool: the next input
            h = layer.forward(h)
        compact.cache = None
    model.release_caches()
    use_compact_convs(model, chosen)
    model.train(was)
    return records


def compare_predictions(dense, thin, x):
    """Scores of both models in evaluation mode on the same inputs, and how far apart they are.

    x: (N, C, H, W) on the models' device, their dtype.  Returns a dict: "max_abs_score_diff"
    (the largest |s_dense - s_thin| over N·Y scores), "max_abs_score" (of the dense scores),
    "same_prediction" (fraction of the N images with the same arg-max class), and the
    scores (NumPy (N, Y) arrays) as "dense" and "thin".
    """
    sd, st = to_cpu(dense.predict(x)), to_cpu(thin.predict(x))
    return {"max_abs_score_diff": float(np.abs(sd - st).max()), "max_abs_score": float(np.abs(sd).max()),
            "same_prediction": float((sd.argmax(axis=1) == st.argmax(axis=1)).mean()),
            "dense": sd, "thin": st}


# -- run.py --thin ------------------------------------------------------------------------
THIN_FILES = ("thin.npz", "thin-report.json")


def _both_scores(dense, thin, images, mean, std, xp):
    """Scores of both models on one loader batch: (N, 3, h, w) → (N, Y) each; a ten-crop
    batch (N, 10, 3, h, w) → the log of the crops' mean probabilities (sec. 5.1, as
    ``Trainer.evaluate``)."""
    if images.ndim == 5:
        b, c = images.shape[:2]
        x = normalize(images.reshape((b * c,) + images.shape[2:]), mean, std, xp)
        return [xp.log(xp.maximum(softmax(m.forward(x)).reshape(b, c, -1).mean(axis=1), 1e-30))
                for m in (dense, thin)]
    x = normalize(images, mean, std, xp)
    return [m.forward(x) for m in (dense, thin)]


def evaluate_pair(dense, thin, loader, mean, std):
    """Top-1/top-5 errors (%) of both models over ``loader`` and how often they disagree.

    dense, thin: ``CompactNet``s in evaluation mode; loader: a ``BatchLoader`` ("center" or
    "tencrop"); mean, std: the run's normalisation (3,).  Returns a dict: "dense" and "thin"
    ({"top1_error", "top5_error"}), "images", "same_prediction" (fraction of images whose
    top-1 class is the same), "max_abs_score_diff" (over every score, or log-probability
    for ten crops).
    """
    xp = get_array_module(dense.classifier.params["W"])
    hits = np.zeros((2, 2))
    same, n, diff = 0, 0, 0.0
    try:
        for images, labels in loader.epoch(0):
            sd, st = _both_scores(dense, thin, images, mean, std, xp)
            y = xp.asarray(labels)
            for i, s in enumerate((sd, st)):
                hits[i] += [int(c) for c in accuracy_topk(s, y, ks=(1, 5))]
            same += int((sd.argmax(axis=1) == st.argmax(axis=1)).sum())
            diff = max(diff, float(xp.abs(sd - st).max()))
            n += len(labels)
    finally:
        dense.release_caches()
        thin.release_caches()
    err = 100 * (1 - hits / max(n, 1))
    return {"dense": {"top1_error": err[0, 0], "top5_error": err[0, 1]},
            "thin": {"top1_error": err[1, 0], "top5_error": err[1, 1]},
            "images": n, "same_prediction": same / max(n, 1), "max_abs_score_diff": diff}


def images_per_second(models, x, repeats=7):
    """Inference throughput of each model on the same batch x, measured side by side.

    models: dict name -> model (evaluation mode); the calls alternate between the models
    (A, B, A, B, ...) so that a change of machine load hits them alike; one warm-up call
    each.  Returns dict name -> median images/s over ``repeats`` calls.
    """
    import time
    times = {name: [] for name in models}
    for name, m in models.items():
        m.forward(x)
    for _ in range(repeats):
        for name, m in models.items():
            t0 = time.perf_counter()
            m.forward(x)
            times[name].append(time.perf_counter() - t0)
    for m in models.values():
        m.release_caches()
    return {name: x.shape[0] / float(np.median(t)) for name, t in times.items()}


def _output_folder(path, out, overwrite):
    """(folder, created): RUN/thin (or -2, -3, ... when it exists: ``rundir.claim_new_folder``),
    or ``out`` refused when it holds a thinning already (unless ``overwrite``); created: this
    call made the folder (so an unfinished thinning removes all of it)."""
    import os
    created = out is None or not os.path.lexists(out)
    if out is None:
        out = claim_new_folder(os.path.join(os.path.dirname(os.path.abspath(path)), "thin"))
    else:
        held = held_files(out, THIN_FILES) if os.path.isdir(out) else []
        if held and not overwrite:
            raise ValueError(f"--out {out} already holds a thinning ({', '.join(held)}): choose another "
                             "--out, or add --overwrite to replace it")
        if held:
            remove_files(out, THIN_FILES)
    try:
        check_writable(out)
    except OutputError as exc:
        if created and os.path.isdir(out):  # check_writable made it before failing
            try:
                os.rmdir(out)
            except OSError:
                pass
        raise ValueError(str(exc)) from None
    return out, created


def load_dense(path):
    """(model, train_state, settings) from a run's checkpoint, checked whole before the model
    is built (``checkpoint_check.read_checkpoint``); ``ValueError`` (one line) otherwise."""
    config, arrays, _, state = read_checkpoint(path)  # CheckpointError is a ValueError
    model = CompactNet(config).load_state_arrays(arrays)
    return model.eval(), state, dict(state.get("settings") or {})


def thin_run(path, out=None, overwrite=False, data=None, workers=0, repeats=7, log=print):
    """``run.py --thin CKPT``: thin a run's model, evaluate both, write ``thin.npz`` and
    ``thin-report.json`` into CKPT's folder/thin (never over an earlier one).

    path: a run's model.npz, best.npz or last.npz (or a thin.npz); out: another folder;
    data: the dataset root when it moved (default: the run's own); workers: decoding
    processes; repeats: timed calls per model.  The run's threshold (sec. 5.2.1) is applied
    first, as its report does, so "dense" below is the thresholded network.
    Returns (report dict, output folder).  Raises ``ValueError`` with a one-line message for
    a file that is not a model, a model with nothing to remove (``NothingToRemove``; nothing
    is written) and one whose every filter is dead — all before any file is written.
    """
    import json
    import os

    dense, state, settings = load_dense(path)
    threshold = settings.get("threshold")
    zeroed = threshold_(dense.thetas() + [dense.classifier.params["W"]], threshold) if threshold else 0
    thin, record = thin_model(dense)
    if not record["changed"]:
        raise NothingToRemove(f"{path}: nothing to remove: every channel of its {len(dense.convs)} "
                              f"feature layers is alive (widths {record['widths_before']}); nothing written")
    root = data or settings.get("data")
    if not root:
        raise ValueError(f"{path} names no dataset; give --data ROOT (its val/ split is evaluated)")
    if not data and not os.path.isdir(root):  # as --evaluate says it of a moved data folder
        raise ValueError(f"the checkpoint's data folder {root!r} is not a folder; point --data at "
                         "where the data is now")
    try:
        train_set, val_set = open_dataset(root)
    except DatasetError as exc:
        raise ValueError(str(exc)) from None
    if list(val_set.classes) != list(dense.config.classes):
        raise ValueError(f"{root} has other classes than the model of {path}; give --data ROOT of its run")
    resize, crop = scaled_sizes(settings.get("image_size", 224))
    batch = int(settings.get("batch_size", 32))
    if "mean" in state:
        mean, std = state["mean"], state["std"]
    else:
        mean, std = estimate_mean_std(train_set, resize, seed=settings.get("seed", 0))
    folder, created = _output_folder(path, out, overwrite)

    # An error or Ctrl-C from here on leaves no empty or half-written thin/ behind.
    with finished_or_removed(folder, created, THIN_FILES):
        common = dict(resize=resize, crop=crop, workers=workers, seed=settings.get("seed", 0))
        accuracy = {}
        with BatchLoader(val_set, batch, mode="center", **common) as center:
            batches = center.epoch(0)
            first = next(batches)[0]                  # the batch both models are timed on
            batches.close()
            accuracy["single_crop"] = evaluate_pair(dense, thin, center, mean, std)
        with BatchLoader(val_set, max(1, batch // 10), mode="tencrop", **common) as ten:
            accuracy["ten_crop"] = evaluate_pair(dense, thin, ten, mean, std)
        x = normalize(first, mean, std)
        # Which convs run as CompactConv2D: measured once, on this batch, layer by layer.
        fast = CompactNet(thin.config).load_state_arrays(thin.state_arrays()).eval()
        convs = choose_convs(fast, x)
        timed = {"dense": dense, "thin": thin}
        if any(c["choice"] == "compact" for c in convs):
            timed["thin_compact"] = fast                 # else it is the same network as thin
        speed = images_per_second(timed, x, repeats)
        speed.setdefault("thin_compact", speed["thin"])

        thin_path = os.path.join(folder, "thin.npz")
        widths = record["widths_after"]
        thin_state = {k: v for k, v in state.items() if k != "final"}   # a fine-tune may resume it
        thin_state.update(settings=dict(settings, layer_widths=widths, threshold=threshold),
                          thinned_from=os.path.abspath(path),
                          compact_convs=[c["layer"] for c in convs if c["choice"] == "compact"])
        save_checkpoint(thin_path, thin, None, to_python(thin_state))
        report = to_python({
            "source": os.path.abspath(path), "threshold": threshold, "weights_zeroed_by_threshold": zeroed,
            "widths_before": record["widths_before"], "widths_after": widths,
            "params_before": record["params_before"], "params_after": record["params_after"],
            "layers": record["layers"], "accuracy": accuracy, "compact_convs": convs,
            "speed": {"batch": int(x.shape[0]), "image_size": int(x.shape[-1]), "repeats": repeats,
                      "images_per_s": speed, "speedup": speed["thin"] / speed["dense"],
                      "speedup_with_compact_convs": speed["thin_compact"] / speed["dense"],
                      "load_average": list(os.getloadavg())},
            "file_bytes": {"dense": os.path.getsize(path), "thin": os.path.getsize(thin_path)},
            "border_note": "dead filters' constants are folded exactly away from zero-padded borders; "
                           "max_abs_score_diff and same_prediction measure what the borders change"})
        with atomic_write(os.path.join(folder, "thin-report.json")) as f:
            json.dump(report, f, indent=2)
        log(format_thin_report(report, folder))
    return report, folder


def _compact_line(r):
    chosen = [c["layer"] for c in r["compact_convs"] if c["choice"] == "compact"]
    if not chosen:
        return "; compact convs: no layer measured faster (not used)"
    return (f", with compact convs on {', '.join(chosen)} {r['speed']['images_per_s']['thin_compact']:.0f} "
            f"({r['speed']['speedup_with_compact_convs']:.2f}x)")


def format_thin_report(r, folder):
    """The few lines ``run.py --thin`` prints."""
    s, t = r["accuracy"]["single_crop"], r["accuracy"]["ten_crop"]
    sp = r["speed"]
    lines = [f"thinned {r['source']}: widths {r['widths_before']} -> {r['widths_after']}; "
             f"parameters {r['params_before']:,} -> {r['params_after']:,}",
             f"  top-1 error dense / thin: {s['dense']['top1_error']:.2f} / {s['thin']['top1_error']:.2f} % "
             f"(1 crop), {t['dense']['top1_error']:.2f} / {t['thin']['top1_error']:.2f} % (10 crops); "
             f"same prediction on {100 * s['same_prediction']:.2f} % of {s['images']} images",
             f"  images/s (batch {sp['batch']}): dense {sp['images_per_s']['dense']:.0f}, thin "
             f"{sp['images_per_s']['thin']:.0f} ({sp['speedup']:.2f}x){_compact_line(r)}; file "
             f"{r['file_bytes']['dense']:,} -> {r['file_bytes']['thin']:,} bytes",
             f"  wrote thin.npz and thin-report.json in {folder}"]
    return "\n".join(lines)

"""The end-of-run report: accuracy and compactness before and after the threshold (sec. 5.2).

``write_report`` evaluates the model with a single centre crop and with ten crops (sec. 5.1),
computes the compactness metrics of sec. 5.2.2, zeroes every weight below the threshold
(sec. 5.2.1), does both again, and writes ``report.json``, ``model.npz`` (the thresholded
model) and the figures. ``format_report`` turns the report into the text ``run.py`` prints.
"""
import json
import os

import numpy as np

from ..backend import to_cpu
from ..graph_metrics import network_sparsity
from ..metrics import sparsity_report, threshold_
from ..model import CompactNet
from ..system.atomic import atomic_write
from .checkpoint import save_checkpoint
from .plots import plot_curves, plot_sparsity


LOSS_NAMES = {"cross_entropy": "cross-entropy", "hinge": "multiclass hinge"}


def crop_errors(trainer, center_loader, tencrop_loader=None):
    """Top-1/top-5 *errors* (in %) with a single centre crop and, if given, ten crops, and the
    images they were measured on: "images" scored, "skipped" unreadable (an error on 60 of 90
    images must not read like one on all 90)."""
    out = {}
    for name, loader in (("single_crop", center_loader), ("ten_crop", tencrop_loader)):
        if loader is not None:
            r = trainer.evaluate(loader)
            out[name] = {"top1_error": 100 * (1 - r["top1"]), "top5_error": 100 * (1 - r["top5"]),
                         "images": r["n"], "skipped": r["skipped"]}
    return out


def apply_threshold(model, threshold):
    """Zero, in place, every conv and classifier weight with |w| < threshold (sec. 5.2.1).

    Returns the number of weights zeroed. BN parameters and biases are left alone.
    """
    return threshold_(model.thetas() + [model.classifier.params["W"]], threshold)


def model_sparsity(model):
    """``metrics.sparsity_report`` of a CompactNet's dictionaries Θ^l and classifier W; for a
    VGG11 or ResNet18, ``graph_metrics.network_sparsity`` (dead channels followed through its
    residual streams, one row per conv named as ``named_layers`` names it)."""
    if not isinstance(model, CompactNet):
        return network_sparsity(model)
    W = model.classifier.params["W"]
    return sparsity_report(model.thetas(), W, model.classifier.params["b"].size)


def to_python(obj):
    """JSON-friendly copy: NumPy scalars and arrays become Python numbers and lists."""
    if isinstance(obj, dict):
        return {str(k): to_python(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_python(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        return to_python(to_cpu(obj).tolist())
    return obj


def write_report(trainer, tencrop_loader, out_dir, threshold=1e-5, header=None):
    """Evaluate, threshold the model in place, evaluate again; write the files; return the dict.

    trainer: a ``training.trainer.Trainer`` (its model, val loader and history are used);
    tencrop_loader: a ten-crop ``BatchLoader`` of the val split (None: centre crops only);
    threshold: sec. 5.2.1's (the paper's 1e-5); header: dict of fields put at the top of the
    report (run.py: arch, model, depth, rho); out_dir None: write nothing, only return the
    report (the other ranks of a data-parallel run, which evaluate their shards with rank 0).
    """
    model = trainer.model
    before = {"sparsity": model_sparsity(model),
              "accuracy": crop_errors(trainer, trainer.val_loader, tencrop_loader)}
    zeroed = apply_threshold(model, threshold)
    after = {"sparsity": model_sparsity(model),
             "accuracy": crop_errors(trainer, trainer.val_loader, tencrop_loader),
             "weights_zeroed_by_threshold": zeroed}
    report = to_python({**(header or {}), "threshold": threshold, "epochs": len(trainer.state["history"]),
                        "total_parameters": model.parameter_count(),
                        "before_threshold": before, "after_threshold": after,
                        "settings": trainer.settings})
    if out_dir is None:
        return report
    # The thresholded model, with what evaluating it again needs (settings, normalisation):
    # ``CompactNet.load`` reads it, and so does ``run.py --evaluate``.
    save_checkpoint(os.path.join(out_dir, "model.npz"), model, None,
                    dict(trainer._train_state(), final=True))
    with atomic_write(os.path.join(out_dir, "report.json")) as f:
        json.dump(report, f, indent=2)
    loss = LOSS_NAMES.get(trainer.settings.get("loss"), "loss")
    plot_curves(trainer.state["history"], os.path.join(out_dir, "curves.png"), loss)
    plot_sparsity(report["after_threshold"]["sparsity"]["layers"], os.path.join(out_dir, "sparsity.png"))
    return report


def dead_structure_line(sparsity, total):
    """In words, how much of the network is gone (one line, for ``format_report``).

    sparsity: ``metrics.sparsity_report``'s dict (after the threshold); total: all parameters.
    Names the share of parameters removed with the dead structure (total - structural
    effective parameters), the layers that lost whole filters (deepest first, at most four),
    how many input channels the filters of the most compact conv layer ignore, and how many
    of the last layer's feature maps a class reads on average.
    """
    eff, layers = sparsity["effective_parameters"], sparsity["layers"]
    gone = total - eff["structural"]
    names = [n for n in layers if n != "classifier"]   # conv1, ... or a ResNet's layer2.0.conv1, ...
    lost = [(n, k - a, k) for n, a, k in zip(names, eff["alive_channels"], eff["channels"]) if a < k][::-1]
    convs = [(n, m) for n, m in layers.items() if n != "classifier"]
    name, most = max(convs, key=lambda nm: nm[1]["average_compactness_alive"])
    maps = sparsity["feature_maps_per_class"]
    parts = []
    if lost:
        parts.append(", ".join(f"{d} of {k} filters in {n}" for n, d, k in lost[:4])
                     + (f" (and {len(lost) - 4} more layers)" if len(lost) > 4 else ""))
    if most["average_compactness_alive"] > 0:
        parts.append(f"the nonzero filters of {name} ignore {100 * most['average_compactness_alive']:.0f} % "
                     f"of their {most['channels']} input channels")
    k = layers["classifier"]["channels"]
    parts.append(f"a class reads {sum(maps) / max(len(maps), 1):.1f} of the {k} last feature maps on average")
    if gone <= 0:
        return f"no weight is structurally dead: every filter and connection is in use; {parts[-1]}"
    return (f"{100 * gone / total:.1f} % of the weights are structurally dead ({gone:,} of {total:,} "
            f"parameters): " + "; ".join(parts))


def scored_line(crop):
    """How many val images an error was measured on, and how many were skipped as unreadable."""
    n, skipped = crop["images"], crop.get("skipped", 0)  # reports before "skipped" have none
    if not skipped:
        return f"scored on all {n:,} val images"
    return f"scored on {n:,} of {n + skipped:,} val images: {skipped:,} skipped as unreadable (warned above)"


def format_report(report, out_dir=None):
    """The report as the few lines ``run.py`` prints: errors, parameters, per-layer metrics."""
    acc = report["after_threshold"]["accuracy"]
    sp = report["after_threshold"]["sparsity"]
    eff = sp["effective_parameters"]
    arch = report.get("arch", "compactnet")
    net = (f"{report['model']}net" if arch == "compactnet" else f"{arch} with {report['model']}net's regularizers")
    width = max([12] + [len(name) + 2 for name in sp["layers"]])
    lines = [
        f"\nresults ({net}, depth {report['depth']}, rho {report['rho']:g}, "
        f"after zeroing |w| < {report['threshold']:g}):",
        f"  top-1 error: {acc['single_crop']['top1_error']:.1f}% single crop, "
        f"{acc['ten_crop']['top1_error']:.1f}% ten crops;  top-5 error: "
        f"{acc['single_crop']['top5_error']:.1f}% / {acc['ten_crop']['top5_error']:.1f}%",
        f"  {scored_line(acc['single_crop'])}",
        f"  parameters: {report['total_parameters']:,} total, {eff['nonzero']:,} nonzero, "
        f"{eff['structural']:,} effective after removing dead structure; "
        f"overall sparsity {100 * sp['overall_sparsity']:.1f}%",
        f"  {dead_structure_line(sp, report['total_parameters'])}",
        f"  {'layer':<{width}}{'dict. sparsity':>16}{'avg. compactness':>18}{'layer sparsity':>16}"]
    for name, m in sp["layers"].items():
        lines.append(f"  {name:<{width}}{100 * m['dictionary_sparsity']:>15.1f}%"
                     f"{100 * m['average_compactness']:>17.1f}%{100 * m['layer_sparsity']:>15.1f}%")
    lines.append(f"  report: report.json, model.npz, curves.png, sparsity.png in {out_dir or 'the output folder'}")
    return "\n".join(lines)

"""``run.py --thin CKPT``: thin a run's model, measure both networks, write the thin one.

The maths is ``minicompact.thin`` (``thin_model``, ``measure_pair``); this module adds what
the command needs around it: the run's settings and dataset read from the checkpoint, the
output folder (RUN/thin, never over an earlier thinning: ``rundir``), the files, one-line
errors, and the lines it prints.
"""
import contextlib
import json
import os

from ..metrics import threshold_
from ..system.atomic import atomic_write
from ..thin import load_dense, measure_pair, thin_model
from ..training.checkpoint import save_checkpoint
from ..training.recipe import open_loaders
from ..training.report import to_python
from .rundir import OutputError, command_folder, finished_or_removed
from .inputs import checkpoint_data

THIN_FILES = ("thin.npz", "thin-report.json")


class NothingToRemove(ValueError):
    """The network has no dead structure: thinning would return the same network."""


def _output_folder(path, out, overwrite):
    """(folder, created): RUN/thin (or -2, -3, ...), or ``out`` (``rundir.command_folder``)."""
    try:
        return command_folder(out, os.path.join(os.path.dirname(os.path.abspath(path)), "thin"), THIN_FILES,
                              overwrite, "a thinning")
    except OutputError as exc:
        raise ValueError(str(exc)) from None


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
    dense, state, settings = load_dense(path)
    threshold = settings.get("threshold")
    zeroed = threshold_(dense.thetas() + [dense.classifier.params["W"]], threshold) if threshold else 0
    thin, record = thin_model(dense)
    if not record["changed"]:
        kept = sum(r.get("dead_kept", 0) for r in record["layers"])
        why = (f"; dead filters kept because they add into residual channels that other convs keep "
               f"alive: {kept}") if kept else ""
        raise NothingToRemove(f"{path}: nothing to remove: every channel of its {len(dense.convs)} "
                              f"convolutions is alive (widths {record['widths_before']}){why}; nothing written")
    train_set, val_set, resize, crop, mean, std = checkpoint_data(path, data, settings, state, dense.config.classes)
    seed = settings.get("seed", 0)
    folder, created = _output_folder(path, out, overwrite)

    # An error or Ctrl-C from here on leaves no empty or half-written thin/ behind.
    with finished_or_removed(folder, created, THIN_FILES):
        with contextlib.ExitStack() as stack:  # the training split is not read: no cache for it
            _, center, ten = open_loaders(stack, train_set, val_set, resize, crop,
                                          int(settings.get("batch_size", 32)), workers, seed, train_cache=False)
            measured = measure_pair(dense, thin, center, ten, mean, std, repeats)
        convs = measured["compact_convs"]
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
            "layers": record["layers"], **measured,
            "file_bytes": {"dense": os.path.getsize(path), "thin": os.path.getsize(thin_path)},
            "border_note": "dead filters' constants are folded exactly away from zero-padded borders; "
                           "max_abs_score_diff and same_prediction measure what the borders change"})
        with atomic_write(os.path.join(folder, "thin-report.json")) as f:
            json.dump(report, f, indent=2)
        log(format_thin_report(report, folder))
    return report, folder


def _compact_line(r):
    if not r["compact_convs"]:
        return ""                 # not tried: a VGG11 or ResNet18 (thin.measure_pair)
    chosen = [c["layer"] for c in r["compact_convs"] if c["choice"] == "compact"]
    if not chosen:
        return "; compact convs: no layer measured faster (not used)"
    return (f", with compact convs on {', '.join(chosen)} {r['speed']['images_per_s']['thin_compact']:.0f} "
            f"({r['speed']['speedup_with_compact_convs']:.2f}x)")


def format_thin_report(r, folder):
    """The few lines ``run.py --thin`` prints.

    r: the report ``thin_run`` writes; folder: where it wrote it.  Returns one string.
    """
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

"""``run.py --export CKPT``: a run's network (a CompactNet, VGG11 or ResNet18) as an ONNX model,
checked with ONNX Runtime.

Writes ``<name>.onnx`` and ``<name>-onnx.json`` (CKPT model.npz → model.onnx) into CKPT's
folder, or ``--out DIR``; never over an earlier export unless ``--overwrite``.  The graph is
``export.to_onnx``'s; before anything is kept, ONNX Runtime scores the run's val images (centre
crops) and minicompact scores them too: every image must get the same top-1 class and the
scores must agree to ``MAX_REL_DIFF`` (relative to each image's largest score), or nothing is
written.  The report holds that comparison, the file sizes, the normalisation and the opset.
"""
import contextlib
import json
import os

from ..architectures import arch_of
from ..export import OPSET, compare, to_onnx
from ..system.atomic import atomic_write
from ..thin import load_dense
from ..training.recipe import open_loaders
from ..training.report import to_python
from .inputs import checkpoint_data
from .rundir import OutputError, command_folder, finished_or_removed

# float32 arithmetic in another order (a folded batch-norm, another GEMM) moves scores by
# about 1e-6 of their size; a wrong graph moves them by far more than this.
MAX_REL_DIFF = 1e-4


def export_names(path):
    """(model file, report file) an export of the checkpoint ``path`` writes."""
    name = os.path.splitext(os.path.basename(path))[0]
    return f"{name}.onnx", f"{name}-onnx.json"


def export_run(path, out=None, overwrite=False, data=None, workers=0, log=print):
    """Export the checkpoint ``path`` (a run's model.npz, best.npz or last.npz of any --arch,
    or a thin.npz) to ONNX, check it on the run's val images, write the model and its report.

    out: the folder (default: the checkpoint's own); data: the dataset root when it moved.
    Returns (report dict, path of the .onnx file).  ``ValueError`` (one line) for a file that
    is not a model, no usable val images, an existing export without ``overwrite``, an
    unwritable folder or an export that does not agree; ``ImportError`` (one line) without
    onnx/onnxruntime.  In every such case nothing is left behind.
    """
    model, state, settings = load_dense(path)
    train_set, val_set, resize, crop, mean, std = checkpoint_data(path, data, settings, state, model.config.classes)
    proto = to_onnx(model, crop, mean, std)
    names = export_names(path)
    try:
        folder, created = command_folder(out or os.path.dirname(os.path.abspath(path)), None, names, overwrite,
                                         "an export")
    except OutputError as exc:
        raise ValueError(str(exc)) from None
    onnx_path = os.path.join(folder, names[0])
    with finished_or_removed(folder, created, names):
        with contextlib.ExitStack() as stack:  # the training split is not read: no cache for it
            _, center, _ = open_loaders(stack, train_set, val_set, resize, crop,
                                        int(settings.get("batch_size", 32)), workers, settings.get("seed", 0),
                                        train_cache=False)
            agreement = compare(model, proto, (images for images, _ in center.epoch(0)), mean, std)
        if agreement["same_top1"] != agreement["images"] or agreement["max_rel_diff"] > MAX_REL_DIFF:
            raise ValueError(f"the ONNX graph of {path} does not compute what minicompact computes "
                             f"({agreement['same_top1']} of {agreement['images']} val images get the same class, "
                             f"scores differ by up to {agreement['max_rel_diff']:.2g}); nothing written "
                             "(please report this as a bug)")
        with atomic_write(onnx_path, "wb") as f:
            f.write(proto.SerializeToString())
        report = to_python({
            "source": os.path.abspath(path), "onnx": os.path.abspath(onnx_path), "opset": OPSET,
            "network": arch_of(model.config),
            "crop": crop, "mean": list(mean), "std": list(std), "classes": list(model.config.classes),
            "input": "image: uint8 (N, 3, crop, crop) RGB centre crops; normalised inside the graph",
            "outputs": ["scores (N, classes)", "probabilities (N, classes), soft-max"],
            "checked_on": {"split": val_set.root, **agreement},
            "file_bytes": {"checkpoint": os.path.getsize(path), "onnx": os.path.getsize(onnx_path)},
            "parameters": model.parameter_count()})
        with atomic_write(os.path.join(folder, names[1]), "w") as f:
            json.dump(report, f, indent=2)
    log(f"exported {path} -> {onnx_path} ({report['file_bytes']['onnx']:,} bytes, opset {OPSET}, "
        f"{crop} px uint8 input)\n  ONNX Runtime on {agreement['images']} val images: the same top-1 class on "
        f"{agreement['same_top1']}, scores within {agreement['max_rel_diff']:.1e} (relative) of minicompact's")
    return report, onnx_path

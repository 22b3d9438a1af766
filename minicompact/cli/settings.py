"""A run's settings: the paper's and the demo's defaults, and how the flags resolve into them.

``resolve_settings`` fills every flag the user did not type — from the checkpoint being
resumed or evaluated, then from ``PAPER`` (with ``--data``) or ``PRESET`` (without) — and
returns the ``Settings`` (one attribute per flag, plus what the run adds) with a
``Resolution`` saying where they came from.  ``validate`` rejects bad values with one line
each before any data is read: each range is checked by the code that uses the value
(``ModelConfig``, ``regularizers.variant``, ``objective.check_weights``, ``StepLR``); only
limits of the command line itself (finite numbers, caps, relations between flags) live here.
``check_checkpoint`` says whether a checkpoint fits the data and the kind of run.
``--arch vgg11|resnet18`` (docs/architectures.md) builds those networks instead of a
CompactNet: their depth is their own, so ``--depth`` is ignored (noted when typed), and a
checkpoint's network, read from its model configuration, decides the arch of a resumed run.
``resolve_strength`` applies the run-length rule of ``group_scale.py`` to the settings and
builds the line run.py prints about it.
"""
import math
import os
from dataclasses import dataclass, field
from types import SimpleNamespace

from ..architectures import ArchConfig, arch_of, config_from_json
from ..backend import gpu_available
from ..data.sharding import steps_per_epoch
from ..data.transforms import scaled_sizes
from ..model import ModelConfig, dictionary_sizes
from ..objective import check_weights
from ..optim import StepLR
from ..regularizers import variant
from ..group_scale import for_run, paper_lr_sum
from ..system.npz import CheckpointError
from ..training.checkpoint_check import read_checkpoint
from .console import fail, note

# Settings of the paper (sec. 5.1, 5.2, 5.3.1), used with --data.
PAPER = dict(epochs=90, batch_size=256, lr=0.1, momentum=0.9, lr_step=30, warmup=0.0,
             image_size=224, width_mult=1.0, stem="auto", workers=None)
# The embedded default: a 2-core laptop CPU must finish `python run.py --depth 12 --rho 0.03`
# in a few minutes. Small images and widths (8/16/32 filters); batch 32 with the paper's rate
# scaled linearly to it (0.1 · 32/256 ≈ 0.01) and two epochs of warmup: on the demo data a
# larger rate or a shorter warmup left the net at chance (docs/running.md).
PRESET = dict(epochs=10, batch_size=32, lr=0.01, momentum=0.9, lr_step=8, warmup=2.0,
              image_size=32, width_mult=0.0625, stem="auto", workers=None)
# Settings that change the arithmetic: a resumed run takes them from its checkpoint.
MATH_KEYS = ("arch", "depth", "rho", "model", "batch_size", "lr", "momentum", "lr_step", "warmup", "cw",
             "ctheta", "image_size", "width_mult", "stem", "reg_update", "loss", "seed",
             "compressed_beta", "sync_bn", "layer_widths", "finetune", "head_lr_mult", "keep_reg", "freeze",
             "group_scale")
# What a checkpoint saved before a MATH_KEY existed was trained with (the run-length rule of
# group_scale.py came later): such a run resumes with these, whatever the flag says now.
BEFORE_THE_KEY = {"group_scale": None, "reg_update": "subgradient"}
# Settings a resumed run keeps unless they are given again (they change no number).
KEPT_KEYS = ("cache", "cache_dir")
FLOAT_FLAGS = ("rho", "lr", "momentum", "warmup", "cw", "ctheta", "compressed_beta", "threshold",
               "width_mult", "head_lr_mult")
# Flags that say what to do with this invocation, not how the model is trained: not saved.
NOT_SAVED = ("resume", "evaluate", "overwrite", "check")


class Settings(SimpleNamespace):
    """Every flag's resolved value as an attribute (``s.depth``, ``s.batch_size``, ...), plus
    what the run adds on the way: ``ranks``, ``global_batch`` (resolution), ``train_images``,
    ``train_key`` (the data) and ``out`` (the output folder).

    A namespace rather than a fixed dataclass so that a new flag of run.py is a setting
    without a second declaration; ``saved()`` is what a checkpoint keeps of them.
    """

    def saved(self):
        """The settings a checkpoint and report.json keep (dict, in the order they were set)."""
        return {k: v for k, v in vars(self).items() if k not in NOT_SAVED}


@dataclass
class Resolution:
    """Where the settings came from: what ``resolve_settings`` and ``rundir`` decided."""

    given: frozenset                 # flag names typed on the command line
    saved: dict = field(default_factory=dict)  # the checkpoint's settings ({} without one)
    data_from_checkpoint: bool = False         # --data was not given: the checkpoint's is used
    claimed: str = None              # a new default output folder this run created
    source: tuple = None             # --finetune's (model, state), read once by ``adjust``


def flag(name):
    return "--" + name.replace("_", "-")


def settings_for(args, given, ranks=1, ranks_per_node=1, adjust=None):
    """``(Settings, Resolution, checkpoint)``: the checkpoint of --resume/--evaluate (read
    once, here, and checked whole by ``checkpoint_check``; None without one), then every flag
    resolved and checked (one line if not).

    adjust: ``adjust(s, how)``, run between resolving and checking: what a kind of run
    derives from elsewhere (run.py's --finetune takes the architecture from its source)."""
    checkpoint = None
    if args.resume or args.evaluate:
        try:
            checkpoint = read_checkpoint(args.resume or args.evaluate)[1:]  # (arrays, opt, state)
        except CheckpointError as exc:
            fail(str(exc))
    s, how = resolve_settings(args, given, checkpoint, ranks, ranks_per_node)
    if adjust is not None:
        adjust(s, how)
    validate(s, how)
    return s, how, checkpoint


def resolve_settings(args, given, checkpoint=None, ranks=1, ranks_per_node=1):
    """``(Settings, Resolution)`` from the parsed ``args``.

    Unset flags come from the checkpoint, then the paper's settings (with --data) or the demo
    preset (without).  ``given``: names of the flags typed on the command line; ranks: the
    data-parallel processes of this run, ranks_per_node: those on this machine.
    """
    s = Settings(**vars(args))
    how = Resolution(given=frozenset(given))
    if checkpoint is not None:
        path = args.resume or args.evaluate
        saved = checkpoint[2].get("settings") or {}
        if not saved:
            fail(f"{path} holds a model without the run settings needed to "
                 f"{'resume' if args.resume else 'evaluate'} it (saved by CompactNet.save or an "
                 "older run.py?); use a file run.py wrote: last.npz, best.npz or model.npz")
        keep_arch(s, args, given, checkpoint[0], path)
        for k in MATH_KEYS:
            if k == "arch":
                continue  # the model configuration's (keep_arch)
            if k in saved or k in BEFORE_THE_KEY:
                value = saved.get(k, BEFORE_THE_KEY.get(k))
                if k in given and getattr(s, k) != value:
                    used = (f"the checkpoint's value {value} is used" if k in saved else
                            f"{path} was trained before the flag existed and resumes as it was trained")
                    note(f"{flag(k)} {getattr(s, k)} ignored; {used}")
                setattr(s, k, value)
        for k in KEPT_KEYS:
            if k in saved and k not in given:
                setattr(s, k, saved[k])
        if s.epochs is None:
            s.epochs = saved.get("epochs")
        if s.data is None:  # the run's own data unless --data says where it is now
            s.data, how.data_from_checkpoint = saved.get("data"), True
        how.saved = saved
        if args.resume:
            keep_global_batch(s, saved.get("ranks", 1), ranks, path)
    defaults = PAPER if s.data else PRESET
    for k, v in defaults.items():
        if getattr(s, k) is None:
            setattr(s, k, v)
    if s.workers is None:  # the ranks on a machine share its cores
        s.workers = max(0, min(8, (os.cpu_count() or 1) // ranks_per_node - 1))
    s.ranks, s.global_batch = ranks, ranks * s.batch_size
    if s.sync_bn and ranks == 1 and "sync_bn" in given:
        note("--sync-bn changes nothing with one process (its batch is the global batch)")
    s.stem = ModelConfig.stem_for(s.stem, s.image_size)
    if s.arch != "compactnet":  # VGG11 and ResNet18 have one depth each (L = 9, 18)
        depth = ArchConfig(arch=s.arch).depth
        if "depth" in given and s.depth != depth and checkpoint is None:
            note(f"--depth {s.depth} ignored: {s.arch} has its own depth (L = {depth})")
        s.depth = depth
    if s.data and not how.data_from_checkpoint:
        s.data = os.path.abspath(s.data)  # so a resume from another folder finds it
    return s, how


def keep_arch(s, args, given, arrays, path):
    """A checkpoint's run continues with the network it holds (its model configuration says
    which: ``architectures.arch_of``); an --arch typed for another is one line."""
    arch = arch_of(config_from_json(str(arrays["__config__"])))  # checked by read_checkpoint
    if "arch" in given and s.arch != arch:
        fail(f"{path} holds a {arch}; --arch {s.arch} cannot {'resume' if args.resume else 'evaluate'} it "
             "(leave --arch out: the checkpoint's network is used)")
    s.arch = arch


def keep_global_batch(s, was, ranks, path):
    """Resuming a run of ``was`` ranks with ``ranks``: keep its global batch (and so its steps,
    learning rates and data order) by giving each rank an equal share; one line if impossible."""
    if was == ranks:
        return
    total = was * s.batch_size
    who = {n: "1 process" if n == 1 else f"{n} ranks" for n in (was, ranks)}
    if total % ranks:
        able = [n for n in range(1, total + 1) if total % n == 0]
        fail(f"{path} was trained by {who[was]} x batch {s.batch_size} (global batch {total}), which "
             f"{ranks} ranks cannot share equally; resume it with "
             f"{f'mpiexec -n {was}' if was > 1 else 'one process (no mpiexec)'} or another number of "
             f"ranks that divides {total}: {', '.join(map(str, able[:12]))}{', ...' if len(able) > 12 else ''}")
    bn = "" if s.sync_bn else ", and batch-norm statistics come from each rank's part"
    note(f"{path} was trained by {who[was]} x batch {s.batch_size}; continuing with {who[ranks]} x "
         f"batch {total // ranks} keeps its global batch of {total}, its steps and learning rates (not "
         f"bit for bit: sums are grouped differently{bn})")
    s.batch_size = total // ranks


def model_config(s, classes):
    """The ``ModelConfig`` the settings ``s`` build for these class names (an ``ArchConfig``
    for --arch vgg11 or resnet18)."""
    widths = getattr(s, "layer_widths", None)  # a thinned network's (minicompact/thin.py)
    if s.arch != "compactnet":
        return ArchConfig(arch=s.arch, num_classes=len(classes), width_mult=s.width_mult, stem=s.stem,
                          classes=list(classes), layer_widths=None if widths is None else tuple(widths))
    return ModelConfig(depth=s.depth, num_classes=len(classes), width_mult=s.width_mult,
                       stem=s.stem, classes=list(classes),
                       layer_widths=None if widths is None else tuple(widths))


def network_arguments(s):
    """``recipe.build_network``'s arguments (all but the images and the device) from the
    resolved settings ``s`` (after ``resolve_strength``, or a checkpoint's)."""
    return dict(model=s.model, depth=s.depth, rho=s.rho, width_mult=s.width_mult, stem=s.stem, epochs=s.epochs,
                lr=s.lr, momentum=s.momentum, lr_step=s.lr_step, warmup=s.warmup, cw=s.cw, ctheta=s.ctheta,
                update=s.reg_update, group_scale=s.group_scale, compressed_beta=s.compressed_beta, loss=s.loss,
                seed=s.seed, layer_widths=getattr(s, "layer_widths", None), arch=getattr(s, "arch", "compactnet"))


def validate(s, how):
    """Reject bad values with one line each, before any data is touched."""
    for k in FLOAT_FLAGS:
        if not math.isfinite(getattr(s, k)):
            fail(f"{flag(k)} must be a finite number, got {getattr(s, k)}")
    # Each range is checked by the code that uses the value; its ValueError names the flag.
    owned = [("depth", lambda: dictionary_sizes(s.depth)),
             ("rho", lambda: variant(s.model, s.depth, s.rho)),
             ("width_mult", lambda: dictionary_sizes(s.depth, width_mult=s.width_mult)),
             ("compressed_beta", lambda: variant("compressed", s.depth, s.rho, compressed_beta=s.compressed_beta)),
             ("lr", lambda: StepLR(s.lr, s.lr_step, 0.1, s.warmup)),
             ("cw", lambda: check_weights(s.cw, s.ctheta))]
    labels = {"lr": "--lr, --lr-step, --warmup", "cw": "--cw, --ctheta"}
    for name, check in owned:
        try:
            check()
        except ValueError as exc:
            fail(f"{labels.get(name, flag(name))}: {exc}")
    checks = [  # limits of the command line itself
        (s.depth <= 30, f"--depth must be <= 30, got {s.depth}"),
        (s.epochs >= 1, f"--epochs must be >= 1, got {s.epochs}"),
        (s.batch_size >= 1, f"--batch-size must be >= 1, got {s.batch_size}"),
        (0.0 <= s.momentum < 1.0, f"--momentum must be in [0, 1), got {s.momentum}"),
        (s.threshold >= 0, f"--threshold must be >= 0, got {s.threshold}"),
        (s.width_mult <= 64, f"--width-mult must be in (0, 64], got {s.width_mult}"),
        (s.workers >= 0, f"--workers must be >= 0, got {s.workers}"),
        (0 <= s.seed < 2**63, f"--seed must be in [0, 2**63), got {s.seed}"),
        (s.image_size >= 8, f"--image-size must be >= 8, got {s.image_size}"),
        (s.group_scale is None or isinstance(s.group_scale, list) or  # a list: resolved, from a checkpoint
         (math.isfinite(s.group_scale) and s.group_scale > 0),
         f"--group-scale must be a finite number > 0, got {s.group_scale}"),
    ]
    for ok, message in checks:
        if not ok:
            fail(message)
    if s.cuda_graph == "on":  # it changes no number, so it is no MATH_KEY: only where it can run
        if s.device == "cpu" or (s.device == "auto" and not gpu_available()):
            why = "--device is cpu" if s.device == "cpu" else "none is usable"
            fail(f"--cuda-graph on needs a GPU, and {why}; use --cuda-graph auto (eager steps on the CPU)")
        if getattr(s, "ranks", 1) > 1:
            fail(f"--cuda-graph on runs one process; with {s.ranks} ranks the steps run eagerly (use auto)")
    if s.warmup > s.epochs and not s.evaluate:  # an evaluation trains nothing
        message = (f"--warmup {s.warmup:g} is longer than the run (--epochs {s.epochs}): the learning "
                   f"rate would never reach --lr {s.lr:g}")
        if s.resume:  # the checkpoint's warmup, which --warmup cannot change
            note(message)
        elif "warmup" in how.given:
            fail(message)
        else:
            note(message + " (the preset's warmup; set --warmup to change it)")
    try:  # the one bound on image sizes (data/transforms.py MAX_IMAGE_SIZE)
        scaled_sizes(s.image_size)
    except ValueError as exc:
        fail(f"--image-size: {exc}")
    try:
        model_config(s, []).check_image_size(s.image_size)
    except ValueError as exc:
        fail(f"--image-size: {exc}; use a larger --image-size{' or --stem small' if s.stem != 'small' else ''}")
    problem = missing_data_folder(s.data, how.data_from_checkpoint)
    if problem:
        fail(problem)


def missing_data_folder(data, from_checkpoint):
    """The one line for a data folder that is not there (None if it is, or if none is named):
    a checkpoint's data folder may have moved since its run (--evaluate, --resume, --thin)."""
    if not data or os.path.isdir(data):
        return None
    if from_checkpoint:
        return f"the checkpoint's data folder {data!r} is not a folder; point --data at where the data is now"
    return f"--data {data!r} is not a folder"


def check_checkpoint(s, how, checkpoint, train_set):
    """The checkpoint fits this data and this kind of run (one line otherwise)."""
    path = s.resume or s.evaluate
    arrays, opt_state, state = checkpoint
    try:
        saved = config_from_json(str(arrays["__config__"]))
    except (TypeError, ValueError) as exc:
        fail(f"{path} holds a model configuration run.py cannot read ({exc})")
    if saved.classes != list(train_set.classes) or saved.num_classes != len(train_set.classes):
        fail(f"{path} holds a model for {len(saved.classes)} classes "
             f"({', '.join(saved.classes[:3])}, ...); it does not match this data "
             f"({len(train_set.classes)} classes: {', '.join(train_set.classes[:3])}, ...)")
    built = model_config(s, train_set.classes)
    if saved != built and not s.finetune:  # a fine-tuned source need not be one run.py built
        differ = [k for k in vars(built) if getattr(saved, k, None) != getattr(built, k)]
        fail(f"{path} holds a model run.py would not build from its settings "
             f"({', '.join(f'{k} {getattr(saved, k, None)} vs {getattr(built, k)}' for k in differ)}); "
             "was it saved by another program?")
    if not s.resume:
        return
    if state.get("final"):
        fail(f"{path} is a run's final model, not a training checkpoint; resume from the "
             "run's last.npz (or evaluate this file with --evaluate)")
    was, now = how.saved.get("train_key"), s.train_key
    if was is not None and was != now:
        before = how.saved.get("train_images")
        if state.get("step", 0) > 0:
            fail(f"{path} stopped at step {state['step']} of epoch {state['epoch'] + 1} on a training "
                 f"set of {before} images; this one has {len(train_set)}"
                 f"{' (other files)' if before == len(train_set) else ''}: a run cannot continue "
                 "mid-epoch on other data; resume on the data it was trained on")
        note(f"the training set changed since {path} ({before} -> {len(train_set)} images); the run "
             "continues on this data, so it will differ from an uninterrupted run")
    steps = steps_per_epoch(len(train_set), s.batch_size, s.ranks)
    if state.get("step", 0) > steps:  # check_train_state saw an integer >= 0; this bounds it
        fail(f"{path} stopped at step {state['step']} of epoch {state.get('epoch', 0) + 1}, but an epoch of "
             f"{len(train_set)} images in global batches of {s.global_batch} has {steps} steps; was it edited?")


def resolve_strength(s, given):
    """Fill the group scale and the update mode of run.py's settings ``s`` from the run's length.

    s: resolved settings with train_images, global_batch, lr, lr_step, epochs, warmup, cw,
    ctheta, reg_update ("auto" unless given) and group_scale (None unless given); given: the
    flag names typed by the user.  Sets, in place, s.group_scale = [k_W, k_Θ] (the factors
    on the group-lasso parts of Ω and Γ/Ψ, ``scale_groups``) and s.reg_update; C_W and C_Θ
    stay eq. 1's constants.  k = S_paper / S_run, 1 on the paper's schedule; a term whose C
    was typed (--cw, --ctheta) keeps eq. 1 as written (k = 1), and a typed --group-scale is
    used for both terms.  Returns the line run.py prints: the constants and why.
    """
    k, update, run_s = for_run(s.train_images, s.global_batch, s.lr, s.lr_step, s.epochs, s.warmup)
    paper = paper_lr_sum()
    if "reg_update" not in given or s.reg_update == "auto":
        s.reg_update = update
    if "group_scale" in given:
        k, why = float(s.group_scale), "as given"
    elif k == 1:
        why = f"this run's Σ lr = {run_s:,.0f} is the paper's ({paper:,.0f})"
    else:
        why = (f"this run's Σ lr = {run_s:.4g} is {'1/' if k > 1 else ''}"
               f"{_times(max(k, 1 / k))} of the paper's {paper:,.0f}")
    typed = "group_scale" not in given
    ks = [1.0 if typed and "cw" in given else k, 1.0 if typed and "ctheta" in given else k]
    s.group_scale = ks
    same = s.cw == s.ctheta
    c = f"C_W = C_Θ = {s.cw:g}" if same else f"C_W = {s.cw:g}, C_Θ = {s.ctheta:g}"
    groups = (f"group-lasso parts ×{_times(ks[0])}" if ks[0] == ks[1] else
              f"group-lasso parts ×{_times(ks[0])} (Ω) and ×{_times(ks[1])} (Γ/Ψ)")
    kept = [f for f, kk in (("--cw", ks[0]), ("--ctheta", ks[1])) if kk == 1 and f[2:] in given]
    return (f"regularization: {c}, {groups}, {s.reg_update} updates ({why}"
            f"{'; ' + ' and '.join(kept) + ' as given' if kept else ''}; docs/compactness.md)")


def _times(k):
    """A factor for the printed line: 3,084 or 10,103 (no exponent), 1.5, 0.25."""
    return f"{k:,.0f}" if k >= 100 else f"{k:.3g}"

#!/usr/bin/env python3
"""Train and evaluate a CompactNet, CompressedNet or SimpleNet on ImageNet-style folders.

    python run.py --depth 12 --rho 0.03                      # the embedded default (no data needed)
    python run.py --data ~/imagenet --depth 12 --rho 0.03    # ROOT/train/<class>/*, ROOT/val/<class>/*
    python run.py --resume runs/x/last.npz                   # continue a run in its folder
    python run.py --evaluate runs/x/best.npz                 # evaluate a checkpoint into runs/x/eval-best
    mpiexec -n 4 python run.py --data ~/imagenet ...          # 4 data-parallel ranks (README)

Without ``--data`` a small procedurally drawn image-folder dataset is generated once (cached)
and a small preset trains on it in a few minutes on a laptop CPU. With ``--data`` the defaults
are the paper's (sec. 5.1). Every flag given explicitly overrides the defaults of either.

The flow: parse → resolve (a checkpoint is read once) → validate every flag → open the data and
check the checkpoint against it → choose and probe the output folder → build, check that every
class has a readable image → train → report.  Every failure a user can cause is one line and a
non-zero exit status: 2 before any training, 1 for a failure during it, 128 + the signal's
number after Ctrl-C (130) or SIGTERM (143).

Started by ``mpiexec``/``srun``, every rank runs this same flow (``minicompact.distributed``):
each step after the device is chosen is taken by all ranks together (``comm.agree``), so a
failure stops every rank at the same point with one message, printed by rank 0; only rank 0
prints, claims the output folder and writes files.  Without a launcher nothing of MPI is
imported.
"""
import argparse
import contextlib
import math
import os
import signal
import sys
import time
import warnings

from minicompact.distributed.launcher import is_first_process, launcher_rank, share_cores

# Settings of the paper (sec. 5.1, 5.2, 5.3.1), used with --data.
PAPER = dict(epochs=90, batch_size=256, lr=0.1, momentum=0.9, lr_step=30, warmup=0.0,
             image_size=224, width_mult=1.0, stem="auto", workers=None)
# The embedded default: a 2-core CPU must finish `python run.py --depth 12 --rho 0.03` in
# under 5 minutes. Small images and widths (8/16/32 filters); batch 32 with the paper's rate
# scaled linearly to it (0.1 · 32/256 ≈ 0.01) and two epochs of warmup. Measured on the demo
# data: lr 0.1 without warmup is still at chance after one epoch, and 0.02 with one warmup
# epoch stalled at chance on 3 of 4 seeds (see README).
PRESET = dict(epochs=10, batch_size=32, lr=0.01, momentum=0.9, lr_step=8, warmup=2.0,
              image_size=32, width_mult=0.0625, stem="auto", workers=None)
# Settings that change the arithmetic: a resumed run takes them from its checkpoint.
MATH_KEYS = ("depth", "rho", "model", "batch_size", "lr", "momentum", "lr_step", "warmup", "cw",
             "ctheta", "image_size", "width_mult", "stem", "reg_update", "loss", "seed",
             "compressed_beta", "sync_bn", "finetune", "head_lr_mult", "keep_reg", "freeze")
# Settings a resumed run keeps unless they are given again (they change no number).
KEPT_KEYS = ("cache",)
FLOAT_FLAGS = ("rho", "lr", "momentum", "warmup", "cw", "ctheta", "compressed_beta", "threshold",
               "width_mult", "head_lr_mult")


class RunError(Exception):
    """A failure the user can cause: printed as one line, exit status ``code``."""

    def __init__(self, message, code=2):
        super().__init__(message)
        self.code = code

    def __reduce__(self):  # sent from the rank that failed to the others (comm.agree)
        return type(self), (str(self), self.code)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" only where there is a default that the help does not already state."""

    def _get_help_string(self, action):
        if any(action.default is v for v in (None, False, argparse.SUPPRESS)) or "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse, with its errors in one line like every other error of run.py (no usage block)."""

    def error(self, message):
        self.exit(2, f"run.py: error: {message} (run.py --help lists the flags)\n")

    def _print_message(self, message, file=None):
        if is_first_process():  # every rank parses the same flags: rank 0 speaks for all
            super()._print_message(message, file)


def build_parser(given_only=False):
    """The command line.  ``given_only``: no defaults at all, so parsing yields only the flags
    the user typed (how ``main`` tells an explicit ``--rho 0.03`` from the default 0.03)."""
    p = Parser(
        prog="run.py", description="Train and evaluate CompactNets (Lobel, Vidal & Soto 2019) on "
        "ImageNet-style folders ROOT/train/<class>/*, ROOT/val/<class>/*.",
        formatter_class=HelpFormatter, argument_default=argparse.SUPPRESS if given_only else None)

    def a(*flags, **kw):
        if given_only:
            kw.pop("default", None)
        p.add_argument(*flags, **kw)
    a("--data", metavar="ROOT", help="dataset root with train/ and val/ class folders; "
      "omitted: a generated demo dataset and a small preset (see README)")
    a("--depth", type=int, default=12, help="number of layers L (L-1 feature layers + classifier); paper's best: 12")
    a("--rho", type=float, default=0.03, help="regularization strength ρ = α = β_{L-1}; paper's best: 0.03")
    a("--model", choices=("compact", "compressed", "simple"), default="compact",
      help="CompactNet (Ω+Γ), CompressedNet (Ψ, β=0.1) or SimpleNet (ℓ2 only)")
    a("--epochs", type=int, help=f"training epochs (paper: {PAPER['epochs']}; demo: {PRESET['epochs']})")
    a("--batch-size", type=int, help=f"images per SGD step (paper: {PAPER['batch_size']}; demo: {PRESET['batch_size']})")
    a("--lr", type=float, help=f"initial learning rate (paper: {PAPER['lr']}; demo: {PRESET['lr']})")
    a("--momentum", type=float, help="SGD momentum (paper: 0.9)")
    a("--lr-step", type=int, help=f"multiply the rate by 0.1 every this many epochs (paper: {PAPER['lr_step']}; demo: {PRESET['lr_step']})")
    a("--warmup", type=float, help="epochs of linear learning-rate warmup, at most --epochs (paper: 0; demo: 2)")
    a("--cw", type=float, default=1e-4, help="C_W, weight of Ω(W) in eq. 1 (paper: 1e-4)")
    a("--ctheta", type=float, default=1e-4, help="C_Θ, weight of Σ Γ_l(Θ^l) in eq. 1 (paper: 1e-4)")
    a("--compressed-beta", type=float, default=0.1, help="β of Ψ for --model compressed (paper: 0.1)")
    a("--threshold", type=float, default=1e-5, help="after training, zero weights with |w| below this (paper: 1e-5)")
    a("--image-size", type=int, help="crop size; images are resized to size·256/224 first (paper: 224; demo: 32)")
    a("--width-mult", type=float, help="scale every dictionary size 128/256/512 (paper: 1; demo: 1/16)")
    a("--stem", choices=("auto", "imagenet", "small"),
      help="first layer's strides: imagenet = conv and pool stride 2 (224→56), small = 1; auto: small below 96 px")
    a("--reg-update", choices=("subgradient", "proximal"), default="subgradient",
      help="subgradient (paper) or proximal group soft-thresholding after each step (exact zeros)")
    a("--loss", choices=("cross_entropy", "hinge"), default="cross_entropy", help="data loss L of eq. 1")
    a("--device", choices=("auto", "cpu", "gpu"), default="auto", help="gpu uses CuPy; auto picks the GPU when present")
    a("--precision", choices=("fp32", "tf32"), default="fp32",
      help="float32 matrix products on the GPU: fp32, or tf32 (TF32 tensor cores, as PyTorch's default "
           "convolutions; no effect on the CPU)")
    a("--workers", type=int, help="image-decoding processes (default: CPU cores - 1, at most 8)")
    a("--cache", action="store_true", help="decode and resize the dataset once into a uint8 memory-mapped "
      "cache in OUT/cache (refreshed when files change)")
    a("--seed", type=int, default=0, help="seed of the initial weights, data order and crops")
    a("--sync-bn", action="store_true", help="with several ranks (mpiexec -n N): batch-norm statistics "
      "over the global batch, not each rank's own")
    a("--out", metavar="DIR", help="output folder for log.jsonl, checkpoints, report.json and figures "
      "(default: runs/<model>-d<depth>-rho<rho>, or -2, -3, ... when that exists)")
    a("--overwrite", action="store_true", help="allow --out to replace the files of an earlier run there")
    a("--resume", metavar="CKPT", help="continue training from a checkpoint (e.g. OUT/last.npz), in its folder")
    a("--evaluate", metavar="CKPT", help="only evaluate a checkpoint (or a run's model.npz) on the val split; "
      "writes to CKPT's folder/eval-<name> unless --out is given")
    a("--no-progress", action="store_true", help="no progress bars (they are drawn only on a terminal anyway)")
    a("--finetune", metavar="CKPT", help="fine-tune the feature layers of CKPT (a run's model/best/last.npz) "
      "with a new classifier for --data's classes (docs/transfer.md)")
    a("--head-lr-mult", type=float, default=10.0, help="with --finetune: the new classifier's rate is this times --lr")
    a("--keep-reg", action="store_true", help="with --finetune: keep the regularizers (default: dropped, as the paper)")
    a("--freeze", type=int, default=0, help="with --finetune: freeze the first N feature layers (and their BN statistics)")
    a("--new-stats", action="store_true", help="with --finetune/--features: estimate the normalisation on --data "
      "instead of using CKPT's")
    a("--features", metavar="CKPT", help="extract CKPT's pyramid features of --data and train linear classifiers "
      "(SVM, soft-max) on them; writes features.json (docs/transfer.md)")
    return p


def fail(message):
    """One clear line and exit status 2, before any work starts (printed by ``main``)."""
    raise RunError(message, 2)


def say(message, file=None):
    """Print, on rank 0 only (every rank would say the same)."""
    if is_first_process():
        print(message, file=file or sys.stdout)


def note(message):
    say(f"run.py: note: {message}", sys.stderr)


def _one_line_warning(message, category, filename, lineno, line=None):
    rank = "" if is_first_process() else f" [rank {launcher_rank()}]"  # its own files' warnings
    return f"run.py{rank}: warning: {message}\n"


def resolve_settings(args, given, checkpoint=None, ranks=1, ranks_per_node=1):
    """Fill unset flags from the checkpoint, then the paper's settings (with --data) or the
    demo preset (without).  ``given``: names of the flags typed on the command line; ranks:
    the data-parallel processes of this run, ranks_per_node: those on this machine."""
    s = vars(args).copy()
    if checkpoint is not None:
        path = args.resume or args.evaluate
        saved = checkpoint[2].get("settings") or {}
        if not saved:
            fail(f"{path} holds a model without the run settings needed to "
                 f"{'resume' if args.resume else 'evaluate'} it (saved by CompactNet.save or an "
                 "older run.py?); use a file run.py wrote: last.npz, best.npz or model.npz")
        for k in MATH_KEYS:
            if k in saved:
                if k in given and s[k] != saved[k]:
                    note(f"--{k.replace('_', '-')} {s[k]} ignored; the checkpoint's value {saved[k]} is used")
                s[k] = saved[k]
        for k in KEPT_KEYS:
            if k in saved and k not in given:
                s[k] = saved[k]
        if s.get("epochs") is None:
            s["epochs"] = saved.get("epochs")
        if s.get("data") is None:  # the run's own data unless --data says where it is now
            s["data"] = saved.get("data")
            s["_data_from_checkpoint"] = True
        s["_saved"] = saved
        if args.resume:
            keep_global_batch(s, saved.get("ranks", 1), ranks, path)
    defaults = PAPER if s.get("data") else PRESET
    for k, v in defaults.items():
        if s.get(k) is None:
            s[k] = v
    if s["workers"] is None:  # the ranks on a machine share its cores
        s["workers"] = max(0, min(8, (os.cpu_count() or 1) // ranks_per_node - 1))
    s["ranks"], s["global_batch"] = ranks, ranks * s["batch_size"]
    if s["sync_bn"] and ranks == 1 and "sync_bn" in given:
        note("--sync-bn changes nothing with one process (its batch is the global batch)")
    if s["stem"] == "auto":
        s["stem"] = "small" if s["image_size"] < 96 else "imagenet"
    if s.get("data") and not s.get("_data_from_checkpoint"):
        s["data"] = os.path.abspath(s["data"])  # so a resume from another folder finds it
    s["_given"] = given
    return s


def keep_global_batch(s, was, ranks, path):
    """Resuming a run of ``was`` ranks with ``ranks``: keep its global batch (and so its steps,
    learning rates and data order) by giving each rank an equal share; one line if impossible."""
    if was == ranks:
        return
    total = was * s["batch_size"]
    who = {n: "1 process" if n == 1 else f"{n} ranks" for n in (was, ranks)}
    if total % ranks:
        able = [n for n in range(1, total + 1) if total % n == 0]
        fail(f"{path} was trained by {who[was]} x batch {s['batch_size']} (global batch {total}), which "
             f"{ranks} ranks cannot share equally; resume it with "
             f"{f'mpiexec -n {was}' if was > 1 else 'one process (no mpiexec)'} or another number of "
             f"ranks that divides {total}: {', '.join(map(str, able[:12]))}{', ...' if len(able) > 12 else ''}")
    bn = "" if s["sync_bn"] else ", and batch-norm statistics come from each rank's part"
    note(f"{path} was trained by {who[was]} x batch {s['batch_size']}; continuing with {who[ranks]} x "
         f"batch {total // ranks} keeps its global batch of {total}, its steps and learning rates (not "
         f"bit for bit: sums are grouped differently{bn})")
    s["batch_size"] = total // ranks


def validate(s):
    """Reject bad values with one line each, before any data is touched."""
    from minicompact.model import ModelConfig
    for k in FLOAT_FLAGS:
        if not math.isfinite(s[k]):
            fail(f"--{k.replace('_', '-')} must be a finite number, got {s[k]}")
    checks = [
        (s["depth"] >= 2, f"--depth must be >= 2 (an L-layer net has L-1 feature layers), got {s['depth']}"),
        (s["depth"] <= 30, f"--depth must be <= 30, got {s['depth']}"),
        (0.0 <= s["rho"] <= 1.0, f"--rho must be in [0, 1], got {s['rho']}"),
        (s["epochs"] >= 1, f"--epochs must be >= 1, got {s['epochs']}"),
        (s["batch_size"] >= 1, f"--batch-size must be >= 1, got {s['batch_size']}"),
        (s["lr"] > 0, f"--lr must be > 0, got {s['lr']}"),
        (0.0 <= s["momentum"] < 1.0, f"--momentum must be in [0, 1), got {s['momentum']}"),
        (s["lr_step"] >= 1, f"--lr-step must be >= 1, got {s['lr_step']}"),
        (s["warmup"] >= 0, f"--warmup must be >= 0, got {s['warmup']}"),
        (s["cw"] >= 0 and s["ctheta"] >= 0, f"--cw and --ctheta must be >= 0, got {s['cw']} and {s['ctheta']}"),
        (0.0 <= s["compressed_beta"] <= 1.0, f"--compressed-beta must be in [0, 1], got {s['compressed_beta']}"),
        (s["threshold"] >= 0, f"--threshold must be >= 0, got {s['threshold']}"),
        (0 < s["width_mult"] <= 64, f"--width-mult must be in (0, 64], got {s['width_mult']}"),
        (s["workers"] >= 0, f"--workers must be >= 0, got {s['workers']}"),
        (0 <= s["seed"] < 2**63, f"--seed must be in [0, 2**63), got {s['seed']}"),
        (s["image_size"] >= 8, f"--image-size must be >= 8, got {s['image_size']}"),
    ]
    for ok, message in checks:
        if not ok:
            fail(message)
    if s["warmup"] > s["epochs"] and not s["evaluate"]:  # an evaluation trains nothing
        message = (f"--warmup {s['warmup']:g} is longer than the run (--epochs {s['epochs']}): the learning "
                   f"rate would never reach --lr {s['lr']:g}")
        if s["resume"]:  # the checkpoint's warmup, which --warmup cannot change
            note(message)
        elif "warmup" in s["_given"]:
            fail(message)
        else:
            note(message + " (the preset's warmup; set --warmup to change it)")
    config = ModelConfig(depth=s["depth"], width_mult=s["width_mult"], stem=s["stem"])
    try:
        config.check_image_size(s["image_size"])
    except ValueError as exc:
        fail(f"--image-size: {exc}; use a larger --image-size or --stem small")
    if s.get("data") and not os.path.isdir(s["data"]):
        where = "the checkpoint's data folder" if s.get("_data_from_checkpoint") else "--data"
        hint = "; point --data at where the data is now" if s.get("_data_from_checkpoint") else ""
        fail(f"{where} {s['data']!r} is not a folder{hint}")


def model_config(s, classes):
    """The ``ModelConfig`` the settings ``s`` build for these class names."""
    from minicompact.model import ModelConfig
    return ModelConfig(depth=s["depth"], num_classes=len(classes), width_mult=s["width_mult"],
                       stem=s["stem"], classes=list(classes))


def check_checkpoint(s, checkpoint, train_set):
    """The checkpoint fits this data and this kind of run (one line otherwise)."""
    from minicompact.model import ModelConfig
    path = s["resume"] or s["evaluate"]
    arrays, opt_state, state = checkpoint
    try:
        saved = ModelConfig.from_json(str(arrays["__config__"]))
    except (TypeError, ValueError) as exc:
        fail(f"{path} holds a model configuration run.py cannot read ({exc})")
    if saved.classes != list(train_set.classes) or saved.num_classes != len(train_set.classes):
        fail(f"{path} holds a model for {len(saved.classes)} classes "
             f"({', '.join(saved.classes[:3])}, ...); it does not match this data "
             f"({len(train_set.classes)} classes: {', '.join(train_set.classes[:3])}, ...)")
    built = model_config(s, train_set.classes)
    if saved != built and not s.get("finetune"):  # a fine-tuned source may have been thinned
        differ = [k for k in vars(built) if getattr(saved, k) != getattr(built, k)]
        fail(f"{path} holds a model run.py would not build from its settings "
             f"({', '.join(f'{k} {getattr(saved, k)} vs {getattr(built, k)}' for k in differ)}); "
             "was it saved by another program?")
    if not s["resume"]:
        return
    if state.get("final"):
        fail(f"{path} is a run's final model, not a training checkpoint; resume from the "
             "run's last.npz (or evaluate this file with --evaluate)")
    was, now = s["_saved"].get("train_key"), s["train_key"]
    if was is not None and was != now:
        before = s["_saved"].get("train_images")
        if state.get("step", 0) > 0:
            fail(f"{path} stopped at step {state['step']} of epoch {state['epoch'] + 1} on a training "
                 f"set of {before} images; this one has {len(train_set)}"
                 f"{' (other files)' if before == len(train_set) else ''}: a run cannot continue "
                 "mid-epoch on other data; resume on the data it was trained on")
        note(f"the training set changed since {path} ({before} -> {len(train_set)} images); the run "
             "continues on this data, so it will differ from an uninterrupted run")


def choose_output(s, checkpoint):
    """Decide the output folder (see ``minicompact.rundir``), refuse to overwrite, probe it."""
    from minicompact.checkpoint import CheckpointError, read_train_state
    from minicompact.rundir import (EVAL_FILES, RUN_FILES, OutputError, check_writable, claim_new_folder,
                                    held_files, remove_files)
    path = s["resume"] or s["evaluate"]
    explicit = s["out"] is not None
    names = EVAL_FILES if s["evaluate"] else RUN_FILES
    run_dir = os.path.dirname(os.path.abspath(path)) if path else None
    if explicit:
        out = s["out"]
    elif s["resume"]:
        out = run_dir
    else:
        base = (os.path.join(run_dir, "eval-" + os.path.splitext(os.path.basename(path))[0]) if s["evaluate"]
                else os.path.join("runs", f"{'finetune-' if s.get('finetune') else ''}{s['model']}-d{s['depth']}-rho{s['rho']:g}"))
        try:
            out = claim_new_folder(base)
        except OSError as exc:
            fail(f"cannot create the output folder {base} ({exc.strerror or exc}); give --out DIR")
        s["_claimed"] = out
        if out != base:
            note(f"{base} exists; {'this evaluation' if s['evaluate'] else 'this run'} goes to {out}")
    out = os.path.abspath(out)
    # The checkpoint's folder is its run's folder when it is the run's last/best.npz or holds
    # a last.npz; a checkpoint kept anywhere else is treated like any --out.
    same_run = (s["resume"] and os.path.isdir(out) and os.path.samefile(out, run_dir)
                and (os.path.basename(path) in ("last.npz", "best.npz")
                     or os.path.exists(os.path.join(run_dir, "last.npz"))))
    held = held_files(out, names) if os.path.isdir(out) else []
    if same_run:  # continuing a run in its own folder: its files are this run's
        state = checkpoint[2]
        last = os.path.join(out, "last.npz")
        branch = os.path.exists(last) and not os.path.samefile(last, path)
        if branch and not s["overwrite"]:
            try:
                later = read_train_state(last)
            except CheckpointError:
                later = {}
            here, there = (state.get("epoch", 0), state.get("step", 0)), (later.get("epoch", 0), later.get("step", 0))
            if there > here:
                fail(f"{last} is further along (epoch {there[0]}, step {there[1]}) than {path} "
                     f"(epoch {here[0]}, step {here[1]}); resuming here would overwrite it: give "
                     "another --out to branch off, or add --overwrite")
        finished = state.get("epoch", 0) >= s["epochs"] and not state.get("partial")
        if finished and held_files(out, ("report.json", "model.npz")) and not s["overwrite"]:
            fail(f"{path} has already trained {state.get('epoch', 0)} epochs (--epochs {s['epochs']}) "
                 f"and {out} holds its report; raise --epochs to train longer, or use --evaluate")
        if branch and s["overwrite"]:
            remove_files(out, names, keep=path)  # the branch replaces the later state
    elif held:
        if not s["overwrite"]:
            hint = (f"continue it with --resume {os.path.join(out, 'last.npz')}, "
                    if "last.npz" in held and not s["evaluate"] else "")
            what = "a run" if held_files(out, ("last.npz",)) else "an evaluation"  # whatever wrote them
            fail(f"--out {out} already holds {what} ({', '.join(held[:3])}"
                 f"{', ...' if len(held) > 3 else ''}): {hint}choose another --out, or add "
                 "--overwrite to replace it")
        remove_files(out, names, keep=path)
    try:
        check_writable(out)
    except OutputError as exc:
        fail(f"{exc}{'' if explicit else '; give --out DIR to write elsewhere'}")
    return out


def main(argv=None):
    share_cores()  # before NumPy starts its BLAS threads: the ranks of a machine share its cores
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    given = set(vars(build_parser(given_only=True).parse_args(argv)))
    from minicompact.training import StopSignals
    old_format = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    try:
        with StopSignals(graceful=False) as stop:
            try:
                return _main(args, given)
            except KeyboardInterrupt:  # a signal outside training, or a second one inside it
                signum = stop.signum or StopSignals.last_signum or signal.SIGINT
                say(f"\nrun.py: stopped by {signal.Signals(signum).name}; any checkpoint already "
                    "written is kept", sys.stderr)
                return 128 + signum
    except RunError as exc:  # before training (every rank stops here together)
        say(f"run.py: error: {exc}", sys.stderr)
        raise SystemExit(exc.code) from None
    finally:
        warnings.formatwarning = old_format


def _main(args, given):
    if args.resume and args.evaluate:
        fail("use either --resume or --evaluate, not both")
    from minicompact import backend
    from minicompact.distributed import init
    try:
        with warnings.catch_warnings(record=True) as device_notes:
            warnings.simplefilter("always")
            device = backend.resolve_device(args.device)
        backend.set_precision(args.precision)
        comm = init(device)  # one process without a launcher; mpiexec/srun: MPI (NCCL on GPUs)
    except backend.BackendError as exc:
        fail(str(exc))
    # From here on every rank takes each step with the others: a failure the user can cause
    # stops them all at the same point (comm.agree); any other failure of one rank ends them
    # all (abort_on_failure) rather than leaving them waiting for it.
    with comm.abort_on_failure():
        try:
            return _on_every_rank(args, given, comm, device, device_notes)
        except RunError as exc:
            agreed = exc
        except KeyboardInterrupt:
            if comm.size == 1:
                raise
            from minicompact.training import StopSignals
            signum = StopSignals.last_signum or signal.SIGINT
            comm.abort(f"run.py: stopped by {signal.Signals(signum).name}; ending all {comm.size} "
                       "ranks; any checkpoint already written is kept", 128 + signum)
    raise agreed


def _on_every_rank(args, given, comm, device, device_notes):
    from minicompact.checkpoint import CheckpointError, load_checkpoint
    from minicompact.data.cache import cache_key
    from minicompact.data.folders import DatasetError, open_dataset
    if args.features:
        return features(args, comm, device)
    if args.finetune and (args.resume or args.evaluate):
        fail("--finetune starts a new run: to continue one, give only --resume OUT/last.npz")
    if not (args.finetune or args.resume) and given & {"freeze", "head_lr_mult", "keep_reg"}:
        fail("--freeze, --head-lr-mult and --keep-reg go with --finetune CKPT")

    def settings():
        checkpoint = None
        if args.resume or args.evaluate:
            try:  # the only time the checkpoint is read
                checkpoint = load_checkpoint(args.resume or args.evaluate)
            except CheckpointError as exc:
                fail(str(exc))
        s = resolve_settings(args, given, checkpoint, comm.size, comm.local_size)
        if s.get("finetune") and not args.resume:
            from minicompact.transfer import TransferError, finetune_settings, read_source
            try:
                s["_source"] = read_source(s["finetune"])
                finetune_settings(s, given, s["_source"][1], s["_source"][0].config)
            except TransferError as exc:
                fail(str(exc))
        validate(s)
        return s, checkpoint

    def dataset(root):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                return open_dataset(root), caught
        except DatasetError as exc:
            fail(str(exc))

    s, checkpoint = comm.agree(settings, errors=RunError)
    # Everything below may be slow; every cheap check has passed.
    for w in device_notes:  # "auto" fell back to the CPU: say so once, in one line
        note(str(w.message))
    if args.precision == "tf32" and device == "cpu":
        note("--precision tf32 changes nothing on the CPU (NumPy has no TF32)")
    if s["data"] is None:
        from minicompact.data.synthetic import ensure_synthetic_dataset
        say("run.py: no --data given: using the generated demo dataset (see README)")
        s["data"] = str(comm.agree(ensure_synthetic_dataset, root_first=True))
    (train_set, val_set), caught = comm.agree(dataset, s["data"], errors=RunError)
    for w in caught:
        say(f"run.py: warning: {w.message}", sys.stderr)
    if len(train_set.classes) < 2:
        fail(f"{s['data']} has {len(train_set.classes)} class; a classifier needs at least 2")
    s["train_images"] = len(train_set)
    s["train_key"] = cache_key(train_set.samples, 0, train_set.root)
    seen = comm.gather_object((s["train_key"], cache_key(val_set.samples, 0, val_set.root)))
    comm.agree(same_files_on_every_rank, seen, s["data"], root_only=True, errors=RunError)
    if checkpoint is not None:
        comm.agree(check_checkpoint, s, checkpoint, train_set, root_only=True, errors=RunError)
    s["out"] = comm.agree(choose_output, s, checkpoint, root_only=True, errors=RunError)
    code = None
    try:
        code = run(s, device, train_set, val_set, checkpoint, comm)
    except RunError as exc:  # every rank raised it (see run)
        say(f"run.py: error: {exc}", sys.stderr)
        code = exc.code
    finally:
        if code != 0 and s.get("_claimed"):  # a new default folder left empty is not left behind
            with contextlib.suppress(OSError):
                os.rmdir(s["_claimed"])
    return code


def same_files_on_every_rank(seen, root):
    """One line unless every rank (``seen``: each rank's train and val listing keys) lists the
    same files: ranks on machines that see different data would train on different images."""
    for rank, keys in enumerate(seen):
        if keys != seen[0]:
            fail(f"rank {rank} lists other files under {root} than rank 0; every rank must read the "
                 "same dataset (a folder on a file system all machines share)")


def require_readable_classes(loader):
    """``RunError`` naming the classes of ``loader``'s split none of whose images can be read.

    Training without a class, or reporting an error measured on no image, would be silently
    wrong; so the run stops before training (one decode per class when the data is healthy).
    """
    from minicompact.data.images import BadImageError, load_rgb
    dataset = loader.dataset
    missing = loader.classes_without_images()
    if not missing:
        return
    names = [dataset.classes[c] for c in missing]
    first = next(p for p, label in dataset.samples if label == missing[0])
    try:
        load_rgb(first, loader.resize)
        why = ""
    except BadImageError as exc:
        why = f"; e.g. {os.path.relpath(first, dataset.root)}: {exc.reason}"
    raise RunError(f"{dataset.root}: none of the images of {len(names)} of {len(dataset.classes)} classes can "
                   f"be read ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}){why}; fix or remove "
                   "those class folders in train/ and val/")


def run(s, device, train_set, val_set, checkpoint=None, comm=None):
    """Build everything from the resolved settings ``s`` and train and/or evaluate.

    comm: this rank's communicator (None: one process).  Returns the exit status; raises
    ``RunError`` for a failure the user can cause — on every rank together (a failure on one
    rank alone, such as a dead decoding worker or a full disk on rank 0, ends all ranks).
    """
    from minicompact.data.loader import BatchLoader, WorkerError
    from minicompact.data.transforms import estimate_mean_std, scaled_sizes
    from minicompact.distributed import Communicator
    from minicompact.losses import multiclass_hinge_loss, softmax_cross_entropy
    from minicompact.model import CompactNet
    from minicompact.objective import Regularizer
    from minicompact.optim import SGD, StepLR
    from minicompact.regularizers import variant
    from minicompact.report import format_report, write_report
    from minicompact.training import Interrupted, NoImages, NonFiniteLoss, ReplicasDiffer, Trainer

    comm = comm or Communicator()
    resize, crop = scaled_sizes(s["image_size"])
    state = checkpoint[2] if checkpoint else None
    source_stats = None
    if s.get("finetune"):  # the source's feature layers, a new classifier (docs/transfer.md)
        from minicompact.transfer import finetune_parts
        model, optimizer, regularizer, source_stats = finetune_parts(s, train_set.classes, device, checkpoint,
                                                                     s.get("_source"))
    else:
        config = model_config(s, train_set.classes)
        model = CompactNet(config, seed=s["seed"]).to(device)
        reg_config = variant(s["model"], s["depth"], s["rho"], compressed_beta=s["compressed_beta"])
        optimizer = SGD(model.param_layers, lr=s["lr"], momentum=s["momentum"])
        regularizer = Regularizer(model, reg_config, s["cw"], s["ctheta"], s["reg_update"])
    schedule = StepLR(s["lr"], step_size=s["lr_step"], gamma=0.1, warmup_epochs=s["warmup"])
    ranks = (f", {comm.size} ranks x batch {s['batch_size']} = global batch {s['global_batch']}"
             f"{' (sync-BN)' if s['sync_bn'] else ''}" if comm.size > 1 else "")
    say(f"run.py: {s['model']}net depth {s['depth']} rho {s['rho']:g} on {device}{ranks}; "
        f"{len(train_set)} train / {len(val_set)} val images, {len(train_set.classes)} classes; "
        f"{resize}px resized, {crop}px crops; {model.parameter_count():,} parameters; out: {s['out']}")
    out = s["out"] if comm.is_root else None  # the other ranks write nothing
    cache_dir = os.path.join(s["out"], "cache") if s["cache"] else None  # one .npy per split
    progress = comm.is_root and not s["no_progress"] and sys.stderr.isatty()  # no \r into pipes and logs
    common = dict(resize=resize, crop=crop, workers=s["workers"], seed=s["seed"], rank=comm.rank,
                  ranks=comm.size)
    settings = {k: v for k, v in s.items()
                if not k.startswith("_") and k not in ("resume", "evaluate", "overwrite")}
    loss_fn = softmax_cross_entropy if s["loss"] == "cross_entropy" else multiclass_hinge_loss
    try:
        with contextlib.ExitStack() as loaders:  # every worker pool stops on the way out
            def open_loaders():
                try:
                    # An evaluation reads no training image: its loader stays idle and uncached.
                    train = loaders.enter_context(BatchLoader(
                        train_set, s["batch_size"], mode="train", drop_last=False,
                        cache=None if s["evaluate"] else cache_dir, **common))
                    val = loaders.enter_context(BatchLoader(val_set, s["batch_size"], mode="center",
                                                            cache=cache_dir, **common))
                    ten = loaders.enter_context(BatchLoader(val_set, max(1, s["batch_size"] // 10),
                                                            mode="tencrop", cache=val.cache, **common))
                except OSError as exc:
                    raise RunError(f"cannot build the image cache in {cache_dir}: {exc.strerror or exc}",
                                   1) from None
                return train, val, ten

            def normalisation():
                try:
                    return estimate_mean_std(train_set, resize, seed=s["seed"], cache=train_loader.cache)
                except ValueError as exc:  # every sampled image failed to decode
                    raise RunError(str(exc)) from None

            # Rank 0 first: with --cache it builds (or refreshes) the cache the others then read.
            train_loader, val_loader, ten_loader = comm.agree(open_loaders, root_first=True, errors=RunError)
            checked = [val_loader] + ([] if s["evaluate"] else [train_loader])
            comm.agree(lambda: [require_readable_classes(loader) for loader in checked], root_only=True,
                       errors=RunError)
            if state and "mean" in state:
                mean, std = state["mean"], state["std"]
            elif source_stats is not None:
                mean, std = source_stats
            else:
                mean, std = comm.agree(normalisation, root_only=True, errors=RunError)
            trainer = Trainer(model, optimizer, schedule, regularizer, loss_fn, train_loader, val_loader,
                              mean, std, epochs=s["epochs"], out_dir=out, settings=settings,
                              progress=progress, log=say, comm=comm, sync_bn=s["sync_bn"])
            if checkpoint is not None:
                trainer.load_state(*checkpoint)
            if not s["evaluate"]:
                t0, first = time.time(), trainer.state["epoch"] + 1
                trainer.fit()
                last = s["epochs"]  # a resumed run names the epochs it trained now, not all of them
                if first == 1:
                    say(f"run.py: trained {last} epoch{'s' if last > 1 else ''} in {time.time() - t0:.0f} s")
                elif first <= last:
                    which = f"epoch {last}" if first == last else f"epochs {first}-{last}"
                    say(f"run.py: trained {which} in {time.time() - t0:.0f} s")
            report = write_report(trainer, ten_loader, out, s["threshold"],
                                  {k: s[k] for k in ("model", "depth", "rho")})
    # Interrupted, NonFiniteLoss, NoImages and ReplicasDiffer are raised by every rank at once.
    except Interrupted as exc:
        say(f"\nrun.py: {exc} by {signal.Signals(exc.signum).name}; checkpoint written: "
            f"{os.path.join(s['out'], 'last.npz')} (continue with --resume)", sys.stderr)
        return 128 + exc.signum
    except NonFiniteLoss as exc:
        say(f"\nrun.py: stopped: {exc}", sys.stderr)
        return 1
    except (NoImages, ReplicasDiffer) as exc:
        raise RunError(f"stopped: {exc}", 1) from None
    except WorkerError as exc:
        alone(comm, f"stopped: {exc}")
    except OSError as exc:  # a full disk, a folder made read-only during the run
        where = f" {exc.filename}" if exc.filename else ""
        alone(comm, f"cannot write{where}: {exc.strerror or exc}; the last checkpoint written is kept")
    say(format_report(report, s["out"]))
    return 0


def features(args, comm, device):
    """``--features CKPT --data ROOT``: extract features, fit linear classifiers (transfer.py)."""
    from minicompact.transfer import TransferError, run_features
    if args.resume or args.evaluate or args.finetune:
        fail("--features runs alone: not with --resume, --evaluate or --finetune")
    if not args.data:
        fail("--features needs --data ROOT (the target dataset)")
    if comm.size > 1:
        fail("--features runs in one process (no mpiexec)")
    workers = args.workers if args.workers is not None else max(0, min(8, (os.cpu_count() or 1) - 1))
    try:
        run_features(args.features, args.data, args.out, args.overwrite, args.image_size,
                     args.batch_size or 64, workers, args.seed, args.cache, device,
                     new_stats=args.new_stats, log=say)
    except TransferError as exc:
        fail(str(exc))
    return 0


def alone(comm, message):
    """A failure of this rank alone: ``RunError`` with one process; with several, end them all
    now with the message (the others cannot be told: they may be waiting in a collective)."""
    if comm.size > 1:
        comm.abort(f"run.py: error: {message}", 1)
    raise RunError(message, 1) from None


if __name__ == "__main__":
    sys.exit(main())

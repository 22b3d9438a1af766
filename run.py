#!/usr/bin/env python3
"""Train and evaluate a CompactNet, CompressedNet or SimpleNet on ImageNet-style folders.

    python run.py --depth 12 --rho 0.03                      # the embedded default (no data needed)
    python run.py --data ~/imagenet --depth 12 --rho 0.03    # ROOT/train/<class>/*, ROOT/val/<class>/*
    python run.py --resume runs/x/last.npz                   # continue a run in its folder
    python run.py --evaluate runs/x/best.npz                 # evaluate a checkpoint into runs/x/eval-best
    python run.py --finetune runs/x/model.npz --data ROOT    # transfer: fine-tune on other classes
    python run.py --features runs/x/model.npz --data ROOT    # transfer: features + linear classifiers
    mpiexec -n 4 python run.py --data ~/imagenet ...          # 4 data-parallel ranks (docs/data-parallel.md)

Without ``--data`` a small generated image-folder dataset and a small preset are used; with
it the paper's settings (sec. 5.1).  Every flag given explicitly overrides either.

The flow, top to bottom: parse → settings (a checkpoint is read once, every flag checked) →
data and output folder → build → fit → report.  Every failure a user can cause is one line
and a non-zero exit status: 2 before any training, 1 for a failure during it, 128 + the
signal's number after Ctrl-C (130) or SIGTERM (143).  Under ``mpiexec``/``srun`` every rank
runs this same flow and takes each step with the others (``comm.agree``): one rank's failure
stops all at the same point with one message; only rank 0 prints and writes files.
"""
import contextlib
import os
import signal
import sys
import time
import warnings

from minicompact.distributed.launcher import share_cores  # imports no NumPy

share_cores()  # before NumPy is imported below: the ranks of a machine share its cores for BLAS

from minicompact import backend, losses  # noqa: E402 (after share_cores on purpose, as all below)
from minicompact.data.loader import WorkerError
from minicompact.data.transforms import scaled_sizes
from minicompact.distributed import init
from minicompact.harness import commands, flags, inputs
from minicompact.harness.console import RunError, fail, fail_alone, note, one_line_warning, say
from minicompact.harness.report import format_report, write_report
from minicompact.harness.rundir import choose_output
from minicompact.harness.settings import check_checkpoint, model_config, resolve_strength, settings_for
from minicompact.harness.stopping import Interrupted, StopSignals
from minicompact.harness.trainer import NoImages, NonFiniteLoss, ReplicasDiffer, Trainer
from minicompact.layers.conv_algo import set_conv_algo
from minicompact.model import CompactNet
from minicompact.objective import Regularizer
from minicompact.optim import SGD, StepLR
from minicompact.regularizers import variant
from minicompact.transfer import finetune_parts


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args, given = flags.parse(argv)
    old_format, warnings.formatwarning = warnings.formatwarning, one_line_warning
    try:
        with StopSignals(graceful=False) as stop:
            try:
                return start(args, given)
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


def start(args, given):
    """Choose the device and the communicator, then run ``every_rank`` on all ranks together."""
    if args.resume and args.evaluate:
        fail("use either --resume or --evaluate, not both")
    if args.thin:
        return commands.thin_command(args)
    if args.features:
        return commands.features_command(args)
    if args.finetune and (args.resume or args.evaluate):
        fail("--finetune starts a new run: to continue one, give only --resume OUT/last.npz")
    if not (args.finetune or args.resume or args.evaluate) and given & {"freeze", "head_lr_mult", "keep_reg"}:
        fail("--freeze, --head-lr-mult and --keep-reg go with --finetune CKPT")
    try:
        with warnings.catch_warnings(record=True) as device_notes:
            warnings.simplefilter("always")
            device = backend.resolve_device(args.device)
        backend.set_precision(args.precision)
        comm = init(device)  # one process without a launcher; mpiexec/srun: MPI (NCCL on GPUs)
    except backend.BackendError as exc:
        fail(str(exc))
    # From here every rank takes each step with the others; any other failure of one rank
    # ends them all (abort_on_failure) rather than leaving them waiting for it.
    with comm.abort_on_failure():
        try:
            return every_rank(args, given, comm, device, device_notes)
        except RunError as exc:
            agreed = exc
        except KeyboardInterrupt:
            if comm.size == 1:
                raise
            signum = StopSignals.last_signum or signal.SIGINT
            comm.abort(f"run.py: stopped by {signal.Signals(signum).name}; ending all {comm.size} "
                       "ranks; any checkpoint already written is kept", 128 + signum)
    raise agreed



def every_rank(args, given, comm, device, device_notes):
    s, how, checkpoint = comm.agree(settings_for, args, given, comm.size, comm.local_size, commands.from_source,
                                    errors=RunError)
    if s.check:  # every flag passed the checks that run before any data is opened
        return 0
    # Everything below may be slow; every cheap check has passed.
    for w in device_notes:  # "auto" fell back to the CPU: say so once, in one line
        note(str(w.message))
    if args.precision == "tf32" and device == "cpu":
        note("--precision tf32 changes nothing on the CPU (NumPy has no TF32)")
    train_set, val_set = inputs.open_data(s, comm)  # also sets s.data, s.train_images, s.train_key
    if checkpoint is None:  # C's scale and the update rule follow the run's length (strength.py)
        line = resolve_strength(s, how.given)
        if not s.finetune or s.keep_reg:  # a fine-tune without --keep-reg has no regularizer
            say(f"run.py: {line}")
    if checkpoint is not None:
        comm.agree(check_checkpoint, s, how, checkpoint, train_set, root_only=True, errors=RunError)
    s.out = comm.agree(choose_output, s, how, checkpoint, root_only=True, errors=RunError)
    code = None
    try:
        code = run(s, device, train_set, val_set, checkpoint, comm, how.source)
    except RunError as exc:  # every rank raised it (see run)
        say(f"run.py: error: {exc}", sys.stderr)
        code = exc.code
    finally:
        if code != 0 and how.claimed:  # a new default folder left empty is not left behind
            with contextlib.suppress(OSError):
                os.rmdir(how.claimed)
    return code


def run(s, device, train_set, val_set, checkpoint, comm, source=None):
    """Build everything from the settings ``s``, train and/or evaluate, report; the exit status.

    source: a new --finetune run's ``(model, state)`` (``transfer.read_source``).

    Raises ``RunError`` for a failure the user can cause, on every rank together (a failure
    of one rank alone, such as a dead decoding worker or a full disk, ends all ranks).
    """
    resize, crop = scaled_sizes(s.image_size)
    source_stats = None
    if s.finetune:  # the source's feature layers, a new classifier (docs/transfer.md)
        model, optimizer, regularizer, source_stats = finetune_parts(s, train_set.classes, device, checkpoint,
                                                                     source)
    else:
        model = CompactNet(model_config(s, train_set.classes), seed=s.seed).to(device)
        optimizer = SGD(model.param_layers, lr=s.lr, momentum=s.momentum)
        regularizer = Regularizer(model, variant(s.model, s.depth, s.rho, compressed_beta=s.compressed_beta),
                                  s.cw, s.ctheta, s.reg_update, s.momentum, s.group_scale)
    set_conv_algo(model, s.conv_algo)  # how 3x3 convs compute; the same maths either way
    schedule = StepLR(s.lr, step_size=s.lr_step, gamma=0.1, warmup_epochs=s.warmup)
    loss_fn = losses.softmax_cross_entropy if s.loss == "cross_entropy" else losses.multiclass_hinge_loss
    ranks = (f", {comm.size} ranks x batch {s.batch_size} = global batch {s.global_batch}"
             f"{' (sync-BN)' if s.sync_bn else ''}" if comm.size > 1 else "")
    say(f"run.py: {s.model}net depth {s.depth} rho {s.rho:g} on {device}{ranks}; "
        f"{len(train_set)} train / {len(val_set)} val images, {len(train_set.classes)} classes; "
        f"{resize}px resized, {crop}px crops; {model.parameter_count():,} parameters; out: {s.out}")
    out = s.out if comm.is_root else None  # the other ranks write nothing
    try:
        with contextlib.ExitStack() as stack:  # every worker pool stops on the way out
            # Rank 0 first: with --cache it builds (or refreshes) the cache the others then read.
            train_loader, val_loader, ten_loader = comm.agree(
                inputs.open_loaders, stack, s, train_set, val_set, resize, crop, comm.rank, comm.size,
                root_first=True, errors=RunError)
            checked = [val_loader] + ([] if s.evaluate else [train_loader])
            comm.agree(lambda: [inputs.require_readable_classes(loader) for loader in checked],
                       root_only=True, errors=RunError)
            state = checkpoint[2] if checkpoint else {}
            mean, std = ((state["mean"], state["std"]) if "mean" in state else source_stats or
                         comm.agree(inputs.normalisation, train_loader, s.seed, root_only=True, errors=RunError))
            trainer = Trainer(model, optimizer, schedule, regularizer, loss_fn, train_loader, val_loader,
                              mean, std, epochs=s.epochs, out_dir=out, settings=s.saved(),
                              progress=comm.is_root and not s.no_progress and sys.stderr.isatty(),
                              log=say, comm=comm, sync_bn=s.sync_bn,  # no \r into pipes and logs
                              cuda_graph=s.cuda_graph)
            if checkpoint is not None:
                trainer.load_state(*checkpoint)
            if not s.evaluate:
                fit(trainer, s.epochs)
            report = write_report(trainer, ten_loader, out, s.threshold,
                                  {"model": s.model, "depth": s.depth, "rho": s.rho})
    # Interrupted, NonFiniteLoss, NoImages and ReplicasDiffer are raised by every rank at once.
    except Interrupted as exc:
        say(f"\nrun.py: {exc} by {signal.Signals(exc.signum).name}; checkpoint written: "
            f"{os.path.join(s.out, 'last.npz')} (continue with --resume)", sys.stderr)
        return 128 + exc.signum
    except NonFiniteLoss as exc:
        say(f"\nrun.py: stopped: {exc}", sys.stderr)
        return 1
    except (NoImages, ReplicasDiffer) as exc:
        raise RunError(f"stopped: {exc}", 1) from None
    except WorkerError as exc:
        fail_alone(comm, f"stopped: {exc}")
    except OSError as exc:  # a full disk, a folder made read-only during the run
        where = f" {exc.filename}" if exc.filename else ""
        fail_alone(comm, f"cannot write{where}: {exc.strerror or exc}; the last checkpoint written is kept")
    say(format_report(report, s.out))
    return 0


def fit(trainer, epochs):
    """``trainer.fit()``, then say how long it took (a resumed run names the epochs it trained now)."""
    t0, first = time.time(), trainer.state["epoch"] + 1
    trainer.fit()
    if first == 1:
        say(f"run.py: trained {epochs} epoch{'s' if epochs > 1 else ''} in {time.time() - t0:.0f} s")
    elif first <= epochs:
        which = f"epoch {epochs}" if first == epochs else f"epochs {first}-{epochs}"
        say(f"run.py: trained {which} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    sys.exit(main())

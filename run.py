#!/usr/bin/env python3
"""Train and evaluate a CompactNet, CompressedNet or SimpleNet on ImageNet-style folders.

    python run.py --depth 12 --rho 0.03                      # the embedded default (no data needed)
    python run.py --arch resnet18 --rho 0.03                 # ResNet18_CC (docs/architectures.md)
    python run.py --data ~/imagenet --depth 12 --rho 0.03    # ROOT/train/<class>/*, ROOT/val/<class>/*
    python run.py --resume runs/x/last.npz                   # continue a run in its folder
    python run.py --evaluate runs/x/best.npz                 # evaluate a checkpoint into runs/x/eval-best
    python run.py --finetune runs/x/model.npz --data ROOT    # transfer: fine-tune on other classes
    python run.py --features runs/x/model.npz --data ROOT    # transfer: features + linear classifiers
    python run.py --export runs/x/model.npz                  # an ONNX model, checked with ONNX Runtime
    mpiexec -n 4 python run.py --data ~/imagenet ...          # 4 data-parallel ranks (docs/data-parallel.md)

Without ``--data`` a small generated image-folder dataset and a small preset are used; with
it the paper's settings (sec. 5.1).  Every flag given explicitly overrides either.

The flow, top to bottom: parse → settings (a checkpoint is read once, every flag checked) →
images and output folder → build → fit → report: the calls a notebook makes
(``minicompact/training/recipe.py``).  Every failure a user can cause is one line and an exit
status: 2 before any training, 1 for a failure during it, 128 + the signal's number after
Ctrl-C (130) or SIGTERM (143).  Under ``mpiexec``/``srun`` every rank runs this same flow and
takes each step with the others (``ranks.each``, ``ranks.root``): one rank's failure stops all
at the same point with one message; only rank 0 prints and writes files
(``minicompact/cli/outcome.py`` holds both rules).
"""

import contextlib
import sys
import time

from minicompact.distributed.launcher import share_cores  # imports no NumPy

share_cores()  # before NumPy is imported below: the ranks of a machine share its cores for BLAS

from minicompact.cli import commands, flags, inputs  # noqa: E402 (after share_cores on purpose, as all below)
from minicompact.cli.console import fail, note, say
from minicompact.cli.outcome import Ranks, exit_status, removing_unused, training_status
from minicompact.cli.rundir import choose_output
from minicompact.cli.settings import check_checkpoint, network_arguments, resolve_strength, settings_for
from minicompact.cli.transfer_commands import finetune_parts
from minicompact.layers.conv_choice import set_conv_algo
from minicompact.objective import loss_function
from minicompact.optim import StepLR
from minicompact.training import Network, Trainer, build_network, format_report, write_report


def main(argv=None):
    args, given = flags.parse(sys.argv[1:] if argv is None else [str(a) for a in argv])
    return exit_status(lambda: start(args, given))


def start(args, given):
    """The commands that do not train, or the training flow on every rank (``Ranks.run``)."""
    if args.resume and args.evaluate:
        fail("use either --resume or --evaluate, not both")
    if args.thin:
        return commands.thin_command(args)
    if args.export:
        return commands.export_command(args)
    if args.features:
        return commands.features_command(args)
    if args.finetune and (args.resume or args.evaluate):
        fail("--finetune starts a new run: to continue one, give only --resume OUT/last.npz")
    if not (args.finetune or args.resume or args.evaluate) and given & {"freeze", "head_lr_mult", "keep_reg"}:
        fail("--freeze, --head-lr-mult and --keep-reg go with --finetune CKPT")
    return Ranks(args.device, args.precision).run(settings_and_data, args, given)


def settings_and_data(ranks, args, given):
    """parse → settings → images and output folder; then ``run`` (the exit status)."""
    comm = ranks.comm
    s, how, checkpoint = ranks.each(settings_for, args, given, comm.size, comm.local_size, commands.from_source)
    if s.check:  # every flag passed the checks that run before any data is opened
        return 0
    for line in ranks.notes:  # "auto" fell back to the CPU: say so once, now that the flags are good
        note(line)
    if args.precision == "tf32" and ranks.device == "cpu":
        note("--precision tf32 changes nothing on the CPU (NumPy has no TF32)")
    train_set, val_set = inputs.open_data(s, comm)  # also sets s.data, s.train_images, s.train_key
    if checkpoint is None:  # C's scale and the update rule follow the run's length (group_scale.py)
        line = resolve_strength(s, how.given)
        if not s.finetune or s.keep_reg:  # a fine-tune without --keep-reg has no regularizer
            say(f"run.py: {line}")
    else:
        ranks.root(check_checkpoint, s, how, checkpoint, train_set)
    s.out = ranks.root(choose_output, s, how, checkpoint)
    return removing_unused(how.claimed, lambda: run(s, ranks, train_set, val_set, checkpoint, how.source))


def run(s, ranks, train_set, val_set, checkpoint, source=None):
    """build → fit → report from the settings ``s``; the exit status.

    checkpoint: ``(arrays, optimizer state, train state)`` to resume or evaluate, or
    None; source: a new --finetune run's ``(model, state)`` (``transfer.read_source``).
    """
    comm, device = ranks.comm, ranks.device
    state = checkpoint[2] if checkpoint else {}
    with contextlib.ExitStack() as stack:  # every worker pool stops on the way out
        def build_fit_report():
            known = (state["mean"], state["std"]) if "mean" in state else None
            if s.finetune:  # the source's feature layers, a new classifier (docs/transfer.md)
                model, optimizer, penalty, known_source = finetune_parts(s, train_set.classes, device, checkpoint,
                                                                         source)
                net = Network(model, optimizer, StepLR(s.lr, s.lr_step, warmup_epochs=s.warmup), penalty,
                              loss_function(s.loss))
                known = known or known_source
            images = inputs.images_for(stack, s, train_set, val_set, known, ranks)
            if not s.finetune:
                net = build_network(images, device=device, **network_arguments(s))
            set_conv_algo(net.model, s.conv_algo)  # how 3x3 convs compute; the same maths either way
            net_name = f"{s.model}net" if s.arch == "compactnet" else f"{s.arch} with {s.model}net's regularizers,"
            say(f"run.py: {net_name} depth {s.depth} rho {s.rho:g} on {device}{ranks.summary(s)}; "
                f"{len(train_set)} train / {len(val_set)} val images, {len(train_set.classes)} classes; "
                f"{images.resize}px resized, {images.crop}px crops; {net.model.parameter_count():,} "
                f"parameters; out: {s.out}")
            out = s.out if comm.is_root else None  # the other ranks write nothing
            trainer = Trainer(net, images, s.epochs, out_dir=out, settings=s.saved(), log=say, comm=comm,
                              sync_bn=s.sync_bn, cuda_graph=s.cuda_graph,
                              progress=comm.is_root and not s.no_progress and sys.stderr.isatty())  # no \r into logs
            if checkpoint is not None:
                trainer.load_state(*checkpoint)
            if not s.evaluate:
                fit(trainer, s.epochs)
            return write_report(trainer, images.ten_crop, out, s.threshold,
                                {"arch": s.arch, "model": s.model, "depth": s.depth, "rho": s.rho})

        report = training_status(comm, s.out, build_fit_report)
    if not isinstance(report, dict):
        return report  # the exit status of how training stopped
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

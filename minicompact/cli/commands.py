"""The runs of run.py that are not a training run: ``--thin``, ``--export`` and ``--features``,
which run alone in one process, and the source of a ``--finetune`` run, read while the
settings resolve.

Each turns the errors of the command's module (``thin_command``, ``export_command``,
``transfer_commands``) into run.py's one-line message.
"""
import os

from .. import backend
from ..distributed.launcher import launched_by_mpi
from ..transfer import TransferError, read_source
from .console import fail, say
from .export_command import export_run
from .thin_command import NothingToRemove, thin_run
from .transfer_commands import finetune_settings, run_features


def thin_command(args):
    """--thin CKPT: all the work is ``thin_command.thin_run``; its ValueErrors are one line."""
    if args.resume or args.evaluate:
        fail("--thin runs alone: not with --resume or --evaluate")
    if launched_by_mpi()[0]:  # every rank would thin and write its own thin/, thin-2/, ...
        fail("--thin runs in one process (no mpiexec)")
    try:
        thin_run(args.thin, out=args.out, overwrite=args.overwrite, data=args.data,
                 workers=args.workers or 0, log=say)
    except NothingToRemove as exc:  # thinning a thin model again: nothing to do, not an error
        say(f"run.py: {exc}")
    except ValueError as exc:
        fail(str(exc))
    return 0


def export_command(args):
    """--export CKPT: all the work is ``export_command.export_run``; its errors are one line."""
    if args.resume or args.evaluate or args.thin or args.finetune or args.features:
        fail("--export runs alone: not with --resume, --evaluate, --thin, --finetune or --features")
    if launched_by_mpi()[0]:
        fail("--export runs in one process (no mpiexec)")
    try:
        export_run(args.export, out=args.out, overwrite=args.overwrite, data=args.data,
                   workers=args.workers or 0, log=say)
    except (ValueError, ImportError) as exc:
        fail(str(exc))
    return 0


def features_command(args):
    """--features CKPT --data ROOT: all the work is ``transfer_commands.run_features``."""
    if args.resume or args.evaluate or args.finetune:
        fail("--features runs alone: not with --resume, --evaluate or --finetune")
    if not args.data:
        fail("--features needs --data ROOT (the target dataset)")
    if launched_by_mpi()[0]:
        fail("--features runs in one process (no mpiexec)")
    workers = args.workers if args.workers is not None else max(0, min(8, (os.cpu_count() or 1) - 1))
    try:
        device = backend.resolve_device(args.device)
        run_features(args.features, args.data, args.out, args.overwrite, args.image_size,
                     args.batch_size or 64, workers, args.seed, args.cache, device,
                     new_stats=args.new_stats, log=say)
    except (TransferError, backend.BackendError) as exc:
        fail(str(exc))
    return 0


def from_source(s, how):
    """A new --finetune run: depth, widths and stem are its source's (``transfer_commands.finetune_settings``)."""
    if s.finetune and not s.resume and not s.evaluate:
        try:
            how.source = read_source(s.finetune)
            finetune_settings(s, how.given, how.source[1], how.source[0].config)
        except TransferError as exc:
            fail(str(exc))

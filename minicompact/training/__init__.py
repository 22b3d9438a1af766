"""The training loop, usable without the command line.

    from minicompact.training import open_images, build_network, Trainer, write_report

(the ten lines that train a CompactNet on a folder are in ``recipe.py`` and the README).

* ``recipe.py``            images → network: ``open_images``, ``build_network`` (the paper's recipe)
* ``checkpoint.py``        the training checkpoint: weights, momentum, the run's state
* ``checkpoint_check.py``  a whole checkpoint checked before a model is built from it
* ``device_sums.py``       a step's statistics summed on the device, read once per interval
* ``stopping.py``          Ctrl-C / SIGTERM as one request, agreed by every rank
* ``progress.py``          the progress bar of an epoch
* ``graph_step.py``        a training step captured once as a CUDA graph and replayed
* ``trainer.py``           ``Trainer``: epochs of ``objective.train_step``, evaluation, resume
* ``plots.py``             training curves and sparsity figures (matplotlib, no pyplot)
* ``report.py``            the final report: thresholding, sparsity, report.json, figures
"""
from .recipe import Images, Network, build_network, open_images
from .report import format_report, write_report
from .trainer import Trainer

__all__ = ["Images", "Network", "Trainer", "build_network", "format_report", "open_images", "write_report"]

"""The run harness: everything around the maths that a long training run needs.

Read in this order (each module imports only those above it, and the maths core):

* ``atomic.py``       write a file so that a crash leaves the old one or the new one, whole
* ``processes.py``    child processes that never outlive their parent; is a pid alive
* ``checkpoint.py``   the ``.npz`` checkpoint format: weights, momentum, the run's state
* ``checkpoint_check.py`` a whole checkpoint checked before a model is built from it
* ``console.py``      what run.py prints: one line per message, ``RunError``, argparse's shape
* ``rundir.py``       the output-folder rule: claim a fresh folder, never overwrite a run
* ``device_sums.py``  a step's statistics summed on the device, read once per interval
* ``stopping.py``     Ctrl-C / SIGTERM as one request, agreed by every rank
* ``progress.py``     the progress bar of an epoch
* ``settings.py``     the paper's and the demo's settings, how a run's resolve, their checks
* ``inputs.py``       the run's images: folders, loaders, normalisation, their one-line errors
* ``trainer.py``      ``Trainer``: epochs of ``objective.train_step``, evaluation, resume
* ``plots.py``        training curves and sparsity figures (matplotlib, no pyplot)
* ``report.py``       the final report: thresholding, sparsity, report.json, figures
* ``flags.py``        run.py's command line: every flag, its default, which ones were typed
* ``commands.py``     the runs that do not train: --thin, --features; a --finetune's source
* ``sweep_points.py`` a sweep's grid, its points' folders and locks, one results row per point
* ``sweep_plots.py``  a sweep's figures (Figs. 6–9) and summary, from its results

Nothing here is imported by ``import minicompact.harness``; import the module you need.
"""

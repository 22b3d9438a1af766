"""run.py's command line: flags, settings, one-line errors, run folders, the commands that do not train.

Only run.py (and the sweep, which starts run.py) imports this package; a notebook trains
through ``minicompact.training`` instead.  Read in this order (each imports only those above
it and the floors below the package):

* ``console.py``   what run.py prints: one line per message, ``RunError``, argparse's shape
* ``outcome.py``   exit statuses and signals, and every rank taking each step together (``Ranks``)
* ``rundir.py``    the output-folder rule: claim a fresh folder, never overwrite a run
* ``settings.py``  the paper's and the demo's settings, how a run's resolve, their checks
* ``flags.py``     every flag, its default, which ones were typed
* ``inputs.py``    the run's images on every rank: folders, loaders, their one-line errors
* ``thin_command.py``       --thin: ``thin.thin_model`` with the run's data, folder and report
* ``export_command.py``     --export: ``export.to_onnx``, checked with ONNX Runtime on the val images
* ``transfer_commands.py``  --features, and a --finetune's model and settings (``transfer``)
* ``commands.py``  the runs that do not train: --thin, --features; a --finetune's source

Nothing here is imported by ``import minicompact.cli``; import the module you need.
"""

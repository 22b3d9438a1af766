"""``python -m minicompact.sweep``: a grid of run.py runs and the paper's Figs. 6-9.

* ``points.py``   the grid, each point's folder, lock and state, one results row per point
* ``plots.py``    the figures (Figs. 6-9) and summary, from the points' results
* ``command.py``  the command line: train the points (``--jobs``, ``--shard``), then ``--collect``
"""

"""``python -m minicompact.sweep``: train a grid of run.py runs (``command.py``)."""
import sys

from .command import main

sys.exit(main())

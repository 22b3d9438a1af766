"""minicompact: CompactNets (Lobel, Vidal & Soto, 2019) from scratch on NumPy and CuPy.

The house, from the bottom up; each floor imports only itself and the floors below it
(``tests/test_package.py`` checks every import's direction):

    backend, system → kernels (cuda/, im2col, winograd, separable_maxpool) → layers
    → model, regularizers, objective, optim → data, distributed → training (recipe, Trainer),
    thin, transfer → cli (run.py's command line) → sweep → run.py

Every layer has a hand-written forward and backward; ``gradcheck`` proves them.  To train
from Python without the command line: ``minicompact.training`` (``training/recipe.py``).
"""
__version__ = "0.1.0"

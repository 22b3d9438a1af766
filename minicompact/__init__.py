"""minicompact: CompactNets (Lobel, Vidal & Soto, 2019) from scratch on NumPy and CuPy.

The house, from the bottom up (each a small module):

    backend → kernels (im2col, separable_maxpool) → layers → model, regularizers, objective
    → optim → data, distributed → harness (the run machinery, the Trainer) → run.py

Every layer has a hand-written forward and backward; ``gradcheck`` proves them.
"""
__version__ = "0.1.0"

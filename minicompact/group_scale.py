"""How strong the group-sparse terms must be for a run of a given length (eq. 1, sec. 5.1).

The paper sets C_W = C_Θ = 1e-4 for its schedule: ILSVRC12 (1,281,167 training images),
batch 256, learning rate 0.1 ×0.1 every 30 epochs, 90 epochs, momentum 0.9.  Those constants
only mean something together with that schedule: a short run has far less time to move a
group of weights to zero.

Derivation.  Each term of eqs. 2, 6, 7 is C·[(1-β)·½‖Θ‖² + β·Σ_g ‖Θ_g‖].  Take one group g
(a Θ[k, t, :, :], a W[y, k, :]) that the data term does not need.  With subgradient steps it
receives the group part's gradient C·β·g/‖g‖, of norm C·β, at every step; momentum μ turns a
constant push into a velocity 1/(1-μ) times larger, so over the run the group's norm shrinks by

    Δ‖g‖ ≈ C·β/(1-μ) · S,      S = Σ_t lr_t over every step of the run.

The paper's schedule has S_paper ≈ 16,670 (5,005 steps per epoch × 30 × (0.1 + 0.01 +
0.001)); the demo preset (2,400 images, batch 32, lr 0.01, 2 warmup epochs, ×0.1 after epoch
8, 10 epochs) has S ≈ 5.4, some 3,100 times less: its groups move 3,100 times less far, and
none reaches zero.  A run reaches the paper's shrinkage when its group part is multiplied by

    k = S_paper / S_run       (``group_scale``; run.py's ``cli.settings.resolve_strength``)

and the paper's own schedule gets k = 1.  Only the group part is scaled: the ℓ2 part is a
weight decay, and scaling it 3,000 times as well (C = 0.3) left the demo network at chance
for seven epochs (measured, docs/compactness.md) — under batch-norm a strong weight decay
shrinks every filter and makes each step a large random rotation.  ``scale_groups`` writes
the scaled term again in eq. 1's form, C'·[(1-β')·½‖Θ‖² + β'·Σ‖g‖] with C' = C·(1-β+kβ) and
β' = kβ/(1-β+kβ) (one C' per layer), so the regularizers and proximal operators of
regularizers.py compute it exactly.

What C means in each mode.  C is eq. 1's constant in both.  The proximal path
(``--reg-update proximal``) sends only the smooth ℓ2 part through momentum and applies the
group part after the step as group soft-thresholding.  A threshold of lr·C·β would make the
prox 1/(1-μ) = 10 times weaker than the subgradient's push at the same C: its fixed points
solve ∇L + (1-μ)·C·∂Ω = 0, not eq. 1.  ``objective.Penalty`` therefore thresholds with
τ = lr·C·β/(1-μ); then both modes have eq. 1's stationary points and the same Δ‖g‖ above,
and this one rule serves both.

Why proximal updates for short runs: a subgradient step never lands on zero; a group the
regularizer wins keeps oscillating around zero with a norm of about lr·C·β/(1-μ).  With the
paper's C that is far below the 1e-5 threshold of sec. 5.2.1, so thresholding finds the
zeros; with the group part scaled 3,000 times it is not, and dead groups survive the
threshold.  The proximal step puts them exactly at zero.  So ``--reg-update auto`` (the
default) is subgradient on the paper's schedule and proximal otherwise.

Explicit ``--cw``/``--ctheta`` are eq. 1's constants as written (k = 1 for that term);
``--group-scale K`` sets k; ``--reg-update`` picks the mode.
"""
import dataclasses
import math

import numpy as np

# The schedule the paper chose C_W = C_Θ = 1e-4 for (sec. 5.1): ILSVRC12's training set,
# batch 256, lr 0.1 ×0.1 every 30 epochs, 90 epochs.
PAPER_SCHEDULE = dict(train_images=1_281_167, batch_size=256, lr=0.1, lr_step=30, epochs=90,
                      warmup=0.0)
# Runs whose S is within this factor of the paper's are the paper's schedule: keep C_paper
# and subgradient steps, as the paper does.
SAME_SCHEDULE = 1.5


def lr_sum(train_images, batch_size, lr, lr_step, epochs, warmup=0.0, gamma=0.1):
    """S = Σ_t lr_t over every SGD step of a run, as ``optim.StepLR.lr_at`` schedules it.

    train_images: images per epoch (all ranks); batch_size: the global batch (a partial last
    batch is a step); lr, lr_step, gamma, warmup: StepLR's base rate, epochs per ×gamma, the
    factor and the warmup epochs; epochs: the run's length.  Returns a float.
    """
    steps = math.ceil(train_images / batch_size)
    # Epochs at one rate each, then the warmup's deficit: step s of the first W steps uses
    # lr·(s+1)/W of its epoch's rate instead of the whole rate.
    rates = lr * gamma ** (np.arange(epochs) // lr_step)
    total = float(steps * rates.sum())
    w = warmup * steps
    if w > 1:
        # The steps with (s+1) < W that the run takes: a warmup longer than the run (a
        # one-epoch run of a two-epoch-warmup preset) ends with the run.
        s = np.arange(min(int(math.ceil(w - 1)), steps * epochs))
        s = s[s + 1 < w]
        total -= float((rates[s // steps] * (1 - (s + 1) / w)).sum())
    return total


def paper_lr_sum():
    """S of the paper's schedule (``PAPER_SCHEDULE``)."""
    return lr_sum(**PAPER_SCHEDULE)


def group_scale(run_lr_sum):
    """k = S_paper / S_run for a run with Σ lr = ``run_lr_sum``: the factor on the group-lasso
    parts that gives it the paper's shrinkage (module docstring)."""
    if run_lr_sum <= 0:
        raise ValueError(f"the run's learning-rate sum must be > 0, got {run_lr_sum}")
    return paper_lr_sum() / run_lr_sum



def for_run(train_images, batch_size, lr, lr_step, epochs, warmup=0.0):
    """(k, update, S_run): the group scale and the update rule a run of this length gets.

    The paper's own schedule (S within ``SAME_SCHEDULE`` of S_paper) keeps k = 1 and
    subgradient steps; any other gets k = S_paper / S_run and proximal steps (module
    docstring).  Arguments as ``lr_sum`` (batch_size: the global batch).
    """
    run_sum = lr_sum(train_images, batch_size, lr, lr_step, epochs, warmup)
    k = group_scale(run_sum)
    if 1 / SAME_SCHEDULE <= k <= SAME_SCHEDULE:
        return 1.0, "subgradient", run_sum
    return k, "proximal", run_sum

def _mix(c, mix, k):
    """C·[(1-mix)·½‖·‖² + k·mix·Σ‖g‖] written as C'·[(1-mix')·½‖·‖² + mix'·Σ‖g‖]: (C', mix')."""
    if k == 1:
        return c, mix
    c2 = c * (1 - mix + k * mix)
    return c2, (k * c * mix / c2 if c2 > 0 else mix)


def scale_groups(config, cw, ctheta, group_scale_w=1.0, group_scale_theta=1.0):
    """Eq. 1 with the group-lasso terms' weight multiplied, the ℓ2 weight decay kept.

    Each term of eqs. 2, 6, 7 is C·[(1-β)·½‖Θ‖² + β·Σ‖g‖]; with the group part ×k it is the
    same kind of term with C' = C·(1-β+kβ) and β' = kβ/(1-β+kβ), so the existing
    regularizers and proximal operators compute it exactly, with one C' per layer.
    config: a ``regularizers.RegConfig``; cw, ctheta: eq. 1's C_W, C_Θ; group_scale_w,
    group_scale_theta: k for Ω and for every Γ_l (or Ψ_l).
    Returns (config', cw', [ctheta'_1 .. ctheta'_{L-1}]).
    """
    cw2, alpha = _mix(cw, config.alpha, group_scale_w)
    per_layer = [_mix(ctheta, b, group_scale_theta) for b in config.betas]
    config2 = dataclasses.replace(config, alpha=alpha, betas=tuple(b for _, b in per_layer))
    return config2, cw2, [c for c, _ in per_layer]

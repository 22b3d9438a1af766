"""The regularization-strength rule (minicompact/group_scale.py; run.py's use of it,
cli/settings.resolve_strength) on numbers worked out by hand."""
import math

import numpy as np
import pytest

from minicompact import group_scale
from minicompact.cli.settings import Settings, resolve_strength
from minicompact.optim import StepLR


def brute_lr_sum(images, batch, lr, lr_step, epochs, warmup):
    """Σ lr_t by asking the schedule the trainer uses for every step's rate."""
    schedule, steps = StepLR(lr, lr_step, 0.1, warmup), math.ceil(images / batch)
    return sum(schedule.lr_at(e, i, steps) for e in range(epochs) for i in range(steps))


def test_paper_lr_sum_is_the_hand_count():
    # 5,005 steps per epoch, 30 epochs at each of 0.1, 0.01, 0.001, no warmup.
    assert group_scale.paper_lr_sum() == pytest.approx(5005 * 30 * 0.111)
    assert group_scale.group_scale(group_scale.paper_lr_sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("args", [(2400, 32, 0.01, 8, 10, 2.0),   # the demo preset
                                  (1000, 64, 0.1, 3, 5, 0.7),      # fractional warmup, decays
                                  (100, 7, 0.05, 1, 3, 3.0),       # warmup = the whole run
                                  (50, 50, 0.1, 30, 2, 0.0),       # one step per epoch
                                  (2400, 32, 0.01, 8, 1, 2.0),     # run shorter than its warmup
                                  (100, 7, 0.05, 1, 2, 3.5)])      # ... with a decay inside it
def test_lr_sum_matches_the_schedule_step_by_step(args):
    assert group_scale.lr_sum(*args) == pytest.approx(brute_lr_sum(*args), rel=1e-12)


def test_demo_preset_scales_the_groups_by_about_3000():
    s_run = group_scale.lr_sum(2400, 32, 0.01, 8, 10, 2.0)
    # warmup: 150 steps averaging 0.01·151/300; 450 at 0.01; 150 at 0.001.
    assert s_run == pytest.approx(0.01 * 151 / 2 + 450 * 0.01 + 150 * 0.001)
    assert group_scale.group_scale(s_run) == pytest.approx(16666.65 / s_run)
    assert 3000 < group_scale.group_scale(s_run) < 3200
    with pytest.raises(ValueError):
        group_scale.group_scale(0.0)


def settings(**kw):
    base = dict(train_images=2400, global_batch=32, lr=0.01, lr_step=8, epochs=10, warmup=2.0,
                cw=1e-4, ctheta=1e-4, reg_update="auto", group_scale=None)
    return Settings(**{**base, **kw})


DEMO_K = 16666.65 / (0.01 * 151 / 2 + 450 * 0.01 + 150 * 0.001)


def test_resolve_scales_the_groups_of_a_short_run_and_goes_proximal():
    s = settings()
    line = resolve_strength(s, set())
    assert s.reg_update == "proximal"
    assert s.group_scale == [pytest.approx(DEMO_K)] * 2
    assert (s.cw, s.ctheta) == (1e-4, 1e-4)             # the ℓ2 parts keep eq. 1's C
    assert line.startswith("regularization: C_W = C_Θ = 0.0001, group-lasso parts ×3,084, proximal updates")


def test_resolve_keeps_explicit_flags():
    s = settings(cw=0.05, reg_update="subgradient")
    line = resolve_strength(s, {"cw", "reg_update"})
    assert (s.cw, s.reg_update) == (0.05, "subgradient")
    assert s.group_scale == [1.0, pytest.approx(DEMO_K)]   # a typed C: eq. 1 as written
    assert "--cw as given" in line
    s = settings(cw=0.05, ctheta=0.02, group_scale=7.0)
    resolve_strength(s, {"cw", "ctheta", "group_scale"})
    assert (s.cw, s.ctheta, s.group_scale, s.reg_update) == (0.05, 0.02, [7.0, 7.0], "proximal")


def test_resolve_keeps_the_paper_values_on_the_paper_schedule():
    for images in (1_281_167, 1_200_000):        # ILSVRC12, and as the paper counts it
        s = settings(train_images=images, global_batch=256, lr=0.1, lr_step=30, epochs=90, warmup=0.0)
        resolve_strength(s, set())
        assert (s.cw, s.ctheta, s.group_scale, s.reg_update) == (1e-4, 1e-4, [1.0, 1.0], "subgradient")


def test_scale_groups_rewrites_eq1_exactly():
    """C·[(1-β)·½‖x‖² + kβ·Σ‖g‖] computed through the rewritten (C', β') equals the hand sum."""
    from minicompact.regularizers import group_lasso, regularization, variant
    rng = np.random.default_rng(0)
    config = variant("compact", 4, 0.3)                       # β = 0, 0.15, 0.3; α = 0.3
    W = rng.standard_normal((3, 4, 5))
    thetas = [rng.standard_normal((4, 3, 3, 3)), rng.standard_normal((4, 4, 3, 3)),
              rng.standard_normal((4, 4, 3, 3))]
    cw, ct, kw, kt = 0.2, 0.1, 3.0, 50.0
    config2, cw2, ct2 = group_scale.scale_groups(config, cw, ct, kw, kt)
    value, dW, dthetas = regularization(config2, W, thetas, cw2, ct2)
    want = cw * ((1 - 0.3) * 0.5 * (W ** 2).sum() + kw * 0.3 * float(group_lasso(W, (2,))[0]))
    want_dW = cw * ((1 - 0.3) * W + kw * 0.3 * group_lasso(W, (2,))[1])
    for theta, beta, d in zip(thetas, config.betas, dthetas):
        want += ct * ((1 - beta) * 0.5 * (theta ** 2).sum() + kt * beta * float(group_lasso(theta, (2, 3))[0]))
        np.testing.assert_allclose(d, ct * ((1 - beta) * theta + kt * beta * group_lasso(theta, (2, 3))[1]),
                                   rtol=1e-12)
    assert float(value) == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(dW, want_dW, rtol=1e-12)
    assert ct2[0] == ct and config2.betas[0] == 0.0           # β^1 = 0: nothing to scale
    same = group_scale.scale_groups(config, cw, ct)              # k = 1 is eq. 1 exactly
    assert same == (config, cw, [ct] * 3)


def test_proximal_threshold_includes_the_momentum_factor():
    """Penalty(momentum=μ) thresholds a group by lr·C·β/(1-μ), 10x lr·C·β at μ = 0.9."""
    from minicompact.model import CompactNet, ModelConfig
    from minicompact.objective import Penalty
    from minicompact.regularizers import variant
    model = CompactNet(ModelConfig(depth=3, num_classes=2, width_mult=1 / 32, stem="small"), seed=0)
    W = model.classifier.params["W"]
    W[...] = 0
    W[0, 0, :] = 1.0                       # a group of norm √R
    norm = math.sqrt(W.shape[2])
    config = variant("compact", 3, 0.5)   # α = 0.5
    for mu, expect in ((0.0, norm - 0.1 * 0.2 * 0.5), (0.9, norm - 0.1 * 0.2 * 0.5 / 0.1)):
        W[0, 0, :] = 1.0
        Penalty(model, config, cw=0.2, ctheta=0.0, update="proximal", momentum=mu).after_step(0.1)
        assert float(np.linalg.norm(W[0, 0])) == pytest.approx(expect, rel=1e-5)
    with pytest.raises(ValueError):
        Penalty(model, config, momentum=1.0)
    with pytest.raises(ValueError, match="a pair"):
        Penalty(model, config, group_scale=5.0)          # a bare k: say so, not a TypeError


def test_a_short_compact_run_ends_with_zero_groups(tmp_path, capsys):
    """The default rule on a run of a few steps: CompactNet ends with whole zero groups and
    dead structure; SimpleNet, trained alike, has none."""
    import json
    import run
    from test_run import TINY, write_folder
    data = write_folder(tmp_path / "data", train=8, val=4)
    found = {}
    for model in ("compact", "simple"):
        out = tmp_path / model
        assert run.main(["--data", str(data), "--epochs", "3", "--out", str(out), "--model", model,
                         "--rho", "0.5", *TINY]) == 0
        said = capsys.readouterr().out
        assert "regularization: C_W = C_Θ = 0.0001, group-lasso parts ×" in said and "proximal updates" in said
        report = json.loads((out / "report.json").read_text())["after_threshold"]["sparsity"]
        found[model] = (sum(m["zero_groups"] for m in report["layers"].values()),
                        report["effective_parameters"]["structural"], report["effective_parameters"]["total"])
    zero_groups, structural, total = found["compact"]
    assert zero_groups > 0 and structural < total
    assert found["simple"][0] == 0 and found["simple"][1] == found["simple"][2]


def test_a_run_shorter_than_the_preset_warmup_resolves():
    """`python run.py --epochs 1`: the demo preset's two warmup epochs outlast the run; the
    rule sums only the steps the run takes (it used to index past its last epoch)."""
    s = settings(epochs=1)
    line = resolve_strength(s, set())
    s_run = brute_lr_sum(2400, 32, 0.01, 8, 1, 2.0)
    assert s_run == pytest.approx(0.01 * 76 / 4)            # 75 steps at 0.01·(s+1)/150
    assert s.group_scale == [pytest.approx(group_scale.paper_lr_sum() / s_run)] * 2
    assert "proximal updates" in line

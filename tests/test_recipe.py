"""The training API a notebook calls (minicompact/training/recipe.py and the README's ten lines):
it trains and reports without argparse or a settings object, and builds what run.py builds."""
import json
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest

from minicompact.cli.settings import network_arguments, resolve_strength
from minicompact.data.synthetic import make_synthetic_dataset
from minicompact.group_scale import for_run, lr_sum, paper_lr_sum
from minicompact.training import Trainer, build_network, open_images, write_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return str(make_synthetic_dataset(tmp_path_factory.mktemp("photos"), num_classes=3, train_per_class=8,
                                      val_per_class=4, size=24))


def readme_snippet():
    """The README's "Train from Python" code block."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    code = [b for b in blocks if "build_network" in b]
    assert len(code) == 1, "the README has one Train-from-Python block"
    return code[0]


def test_the_readme_snippet_trains_and_reports(photos, tmp_path, monkeypatch):
    """The README's lines, run as written on a tiny folder (two epochs, a narrow network)."""
    code = readme_snippet()
    assert len(code.strip().splitlines()) <= 10
    code = (code.replace('"my_photos"', repr(photos)).replace("epochs=10", "epochs=2")
            .replace("depth=8", "depth=3").replace("width_mult=0.25", "width_mult=0.05"))
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    report = scope["report"]
    out = tmp_path / "runs" / "photos"
    assert {"last.npz", "best.npz", "log.jsonl", "report.json", "model.npz"} <= set(os.listdir(out))
    assert json.loads((out / "report.json").read_text())["epochs"] == 2
    error = report["after_threshold"]["accuracy"]["single_crop"]["top1_error"]
    assert 0 <= error <= 100 and report["after_threshold"]["accuracy"]["ten_crop"]["images"] == 12
    assert scope["images"].train._executor is None  # the with block stopped the loaders


def test_open_images_normalises_from_the_training_split(photos):
    with open_images(photos, image_size=16, batch_size=5) as images:
        assert len(images.classes) == 3
        assert (images.resize, images.crop) == (18, 16)
        assert len(images.train_set) == 24 and len(images.val_set) == 12
        assert images.ten_crop.mode == "tencrop" and images.val.mode == "center"
        assert all(0 < m < 1 for m in images.mean) and all(0 < s < 1 for s in images.std)
        known = open_images(photos, image_size=16, mean_std=((0.5,) * 3, (0.25,) * 3))
        assert known.mean == (0.5,) * 3
        known.close()


def test_build_network_follows_the_run_length_rule_as_run_py_does(photos):
    """The API's automatic strength is run.py's (``resolve_strength``) for the same schedule."""
    with open_images(photos, image_size=16, batch_size=8) as images:
        net = build_network(images, depth=3, rho=0.3, width_mult=0.05, epochs=2, lr_step=8, warmup=1.0)
        k, rule, _ = for_run(24, 8, 0.01, 8, 2, 1.0)
        assert rule == "proximal" and k == pytest.approx(paper_lr_sum() / lr_sum(24, 8, 0.01, 8, 2, 1.0))
        assert net.penalty.update == "proximal"
        s = SimpleNamespace(train_images=24, global_batch=8, lr=0.01, lr_step=8, epochs=2, warmup=1.0, cw=1e-4,
                            ctheta=1e-4, reg_update="auto", group_scale=None, model="compact", depth=3, rho=0.3,
                            width_mult=0.05, stem="small", momentum=0.9, compressed_beta=0.1,
                            loss="cross_entropy", seed=0)
        resolve_strength(s, set())
        same = build_network(images, **network_arguments(s))
        assert same.penalty.update == net.penalty.update
        assert same.penalty._cw == pytest.approx(net.penalty._cw)
        assert same.penalty._ctheta == pytest.approx(net.penalty._ctheta)
        for a, b in zip(same.model.param_layers, net.model.param_layers):
            for key in a.params:
                assert np.array_equal(a.params[key], b.params[key])  # same seed, same network
        simple = build_network(images, model="simple", depth=3, width_mult=0.05, update="subgradient",
                               group_scale=None)
        assert simple.penalty.update == "subgradient"


def test_a_trainer_is_two_objects_not_sixteen_arguments(photos):
    with open_images(photos, image_size=16, batch_size=8) as images:
        net = build_network(images, depth=3, width_mult=0.05, epochs=1)
        trainer = Trainer(net, images, epochs=1, progress=False, log=lambda line: None)
        history = trainer.fit()
        assert len(history) == 1 and np.isfinite(history[0]["loss"])
        report = write_report(trainer, None, None)
        assert "ten_crop" not in report["before_threshold"]["accuracy"]

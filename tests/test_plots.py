"""The run's figures: PNG files for run.py, bars drawn into any Axes for the lessons."""
import subprocess
import sys

from matplotlib.figure import Figure

from minicompact.training.plots import draw_sparsity, plot_curves, plot_sparsity

LAYERS = {
    "conv1": {"dictionary_sparsity": 0.0, "average_compactness": 0.0, "layer_sparsity": 0.05},
    "conv2": {"dictionary_sparsity": 0.25, "average_compactness": 0.5, "layer_sparsity": 0.8},
    "classifier": {"dictionary_sparsity": 0.0, "average_compactness": 0.3, "layer_sparsity": 0.3},
}


def test_draw_sparsity_draws_three_bars_per_layer_in_percent():
    ax = Figure().subplots()
    assert draw_sparsity(ax, LAYERS) is ax
    heights = [[bar.get_height() for bar in bars] for bars in ax.containers]
    assert heights == [[0.0, 25.0, 0.0], [0.0, 50.0, 30.0], [5.0, 80.0, 30.0]]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(LAYERS)


def test_plot_functions_write_pngs(tmp_path):
    path = plot_sparsity(LAYERS, str(tmp_path / "s" / "sparsity.png"))
    history = [{"epoch": e, "loss": 2.0 - e, "train_top1": 0.3 * e, "val_top1": 0.2 * e} for e in (1, 2)]
    curves = plot_curves(history, str(tmp_path / "curves.png"))
    for p in (path, curves):
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(q.name for q in tmp_path.rglob("*")) == ["curves.png", "s", "sparsity.png"]  # no temp files left
    assert plot_sparsity({}, str(tmp_path / "none.png")) is None and plot_curves([], "x.png") is None


def test_importing_plots_leaves_the_matplotlib_backend_alone():
    """A notebook (inline backend) that imports minicompact.training.plots must keep its inline figures."""
    code = ("import matplotlib; matplotlib.use('svg'); import minicompact.training.plots; "
            "print(matplotlib.get_backend())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "svg"

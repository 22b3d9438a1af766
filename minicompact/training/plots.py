"""PNG figures of a run: training curves, and per-layer sparsity bars as in the paper's Fig. 5.

Figures are ``matplotlib.figure.Figure`` objects, not pyplot ones: PNGs are written on
machines with no display (servers, CI), and importing this module neither picks a global
backend nor registers figures with pyplot, so a notebook that imports it keeps its inline
figures.  ``draw_sparsity`` draws into any Axes (a notebook's, say); ``plot_*`` write files.
"""

from matplotlib.figure import Figure

from ..system.atomic import atomic_write


def plot_curves(history, path, loss_name="cross-entropy"):
    """Loss and top-1 accuracy (train and val) per epoch.

    history: list of per-epoch dicts; loss_name: the data loss L of eq. 1, for the axis label.
    """
    if not history:
        return None
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 3.8))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(epochs, [h["loss"] for h in history], "o-", label="train loss")
    if all("val_loss" in h for h in history):
        ax1.plot(epochs, [h["val_loss"] for h in history], "s-", label="val loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel(f"{loss_name} loss")
    ax1.legend()
    ax2.plot(epochs, [100 * h["train_top1"] for h in history], "o-", label="train top-1")
    ax2.plot(epochs, [100 * h["val_top1"] for h in history], "s-", label="val top-1")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy (%)")
    ax2.legend()
    fig.tight_layout()
    return save_png(fig, path)


def draw_sparsity(ax, layers, title="Per-layer sparsity (paper Fig. 5)"):
    """Bars of dictionary sparsity, average compactness and layer sparsity for each layer.

    ax: a matplotlib Axes to draw into. layers: dict name -> {"dictionary_sparsity",
    "average_compactness", "layer_sparsity"} (fractions in [0, 1]), in network order (e.g.
    ``metrics.sparsity_report(...)["layers"]``). Returns ``ax``.
    """
    names = list(layers)
    keys = [("dictionary_sparsity", "dictionary sparsity"),
            ("average_compactness", "average compactness"),
            ("layer_sparsity", "layer sparsity")]
    width = 0.27
    for i, (key, label) in enumerate(keys):
        xs = [j + (i - 1) * width for j in range(len(names))]
        ax.bar(xs, [100 * layers[n][key] for n in names], width, label=label)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_ylabel("% of the layer")
    ax.set_ylim(0, 100)
    ax.set_title(title, pad=28)   # the legend sits above the axes, where no bar can be
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False, fontsize="small")
    return ax


def plot_sparsity(layers, path, title="Per-layer sparsity (paper Fig. 5)"):
    """Write ``draw_sparsity``'s bars to the PNG ``path``; returns the path (None: no layers)."""
    if not layers:
        return None
    fig = Figure(figsize=(max(6, 0.6 * len(layers) + 2), 3.8))
    draw_sparsity(fig.subplots(), layers, title)
    fig.tight_layout()
    return save_png(fig, path)


def save_png(fig, path):
    """Write the Figure ``fig`` to the PNG ``path`` atomically (110 dpi); returns ``path``."""
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    return path

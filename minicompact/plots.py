"""PNG figures of a run: training curves, and per-layer sparsity bars as in the paper's Fig. 5.

matplotlib with the non-interactive Agg backend, so figures are written on machines with no
display (servers, CI).
"""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(history, path, loss_name="cross-entropy"):
    """Loss and top-1 accuracy (train and val) per epoch.

    history: list of per-epoch dicts; loss_name: the data loss L of eq. 1, for the axis label.
    """
    if not history:
        return None
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
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
    return _save(fig, path)


def plot_sparsity(layers, path, title="Per-layer sparsity (paper Fig. 5)"):
    """Bars of dictionary sparsity, average compactness and layer sparsity for each layer.

    layers: dict name -> {"dictionary_sparsity", "average_compactness", "layer_sparsity"}
    (fractions in [0, 1]), in network order.
    """
    if not layers:
        return None
    return _save(sparsity_figure(layers, title), path)


def sparsity_figure(layers, title="Per-layer sparsity (paper Fig. 5)"):
    """The figure of ``plot_sparsity``; its legend sits above the axes, where no bar can be."""
    names = list(layers)
    keys = [("dictionary_sparsity", "dictionary sparsity"),
            ("average_compactness", "average compactness"),
            ("layer_sparsity", "layer sparsity")]
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names) + 2), 3.8))
    for i, (key, label) in enumerate(keys):
        xs = [j + (i - 1) * width for j in range(len(names))]
        ax.bar(xs, [100 * layers[n][key] for n in names], width, label=label)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_ylabel("% of the layer")
    ax.set_ylim(0, 100)
    ax.set_title(title, pad=28)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False, fontsize="small")
    fig.tight_layout()
    return fig


def _save(fig, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path

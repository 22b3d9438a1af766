"""The end-of-run report says in words how much of the network is structurally dead."""
import numpy as np

from minicompact.metrics import sparsity_report
from minicompact.training.report import dead_structure_line


def network():
    """conv1 (4 filters on pixels), conv2 (4 filters), classifier over 4 maps, 2 classes, R = 5."""
    rng = np.random.default_rng(0)
    t1 = rng.standard_normal((4, 3, 3, 3)) + 3.0
    t2 = rng.standard_normal((4, 4, 3, 3)) + 3.0
    W = rng.standard_normal((2, 4, 5)) + 3.0
    return t1, t2, W


def test_sentence_names_dead_filters_ignored_channels_and_maps():
    t1, t2, W = network()
    t2[0] = 0                       # conv2's filter 0 is zero
    t2[1, 1:] = 0                   # filter 1 reads only channel 0
    W[:, 3] = 0                     # no class reads map 3: conv2's filter 3 is dead too
    W[0, 2] = 0                     # class 0 reads maps 0, 1; class 1 reads 0, 1, 2
    sp = sparsity_report([t1, t2], W, 2)
    total = t1.size + t2.size + W.size + 2 * 8 + 2
    line = dead_structure_line(sp, total)
    gone = total - sp["effective_parameters"]["structural"]
    assert line.startswith(f"{100 * gone / total:.1f} % of the weights are structurally dead ({gone:,} of {total:,}")
    assert "2 of 4 filters in conv2" in line and "conv1" not in line.split(";")[0]
    # The nonzero filters of conv2 (1, 2, 3) ignore (3 + 0 + 0) / (3 · 4) of their inputs.
    assert "the nonzero filters of conv2 ignore 25 % of their 4 input channels" in line
    assert "a class reads 2.5 of the 4 last feature maps on average" in line


def test_sentence_for_a_dense_network():
    t1, t2, W = network()
    sp = sparsity_report([t1, t2], W, 2)
    line = dead_structure_line(sp, t1.size + t2.size + W.size + 18)
    assert line.startswith("no weight is structurally dead") and "4.0 of the 4" in line

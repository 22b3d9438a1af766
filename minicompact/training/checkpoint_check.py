"""One check of a whole checkpoint before any model is built from it: ``check_contents``.

Every command that reads a run's checkpoint (--resume, --evaluate, --thin, --finetune,
--features) reads it with ``read_checkpoint``, so a damaged or hand-edited file is refused
in one line naming what is wrong, before a model is built or an array allocated:

* the model configuration (``architectures.config_from_json``: a CompactNet's
  ``ModelConfig``, or a VGG11's or ResNet18's ``ArchConfig`` when it names an "arch"): each
  field's type and range, class names that number ``num_classes``, and a size bound counted
  from the declared widths;
* every array that configuration implies (``model.check_state_arrays``): present,
  floating-point, of its shape, finite, batch-norm running variances >= 0;
* the optimizer's momentum buffers ``opt.<index>.<name>``: each belongs to a parameter the
  run trains (a fine-tune's frozen layers have none) and is a finite array of its shape;
* the training state (``checkpoint.check_train_state``, applied as the file is read):
  epoch and step integers >= 0, best accuracy a number, and so on.

The loaders below it check again what they load (``CompactNet.load_state_arrays``,
``SGD.load_state_dict``), so a state passed in by other code is never loaded unchecked.
"""
from ..architectures import config_from_json, conv_count
from ..model import check_state_arrays
from ..system.npz import CheckpointError, check_array
from .checkpoint import load_checkpoint


def optimizer_shapes(config, freeze=0):
    """dict ``"<index>.<name>"`` -> shape of each momentum buffer an ``SGD`` over the model's
    parameterised layers keeps (its ``state_dict`` keys), the first ``freeze`` feature layers
    (conv and batch norm: ``transfer.freeze``) left out of its list.  config: a
    ``ModelConfig`` or an ``ArchConfig`` (both list their layers with ``layer_shapes``)."""
    layers = config.layer_shapes()[2 * freeze:]
    return {f"{i}.{k}": shape for i, (_, params, _) in enumerate(layers) for k, shape in params.items()}


def check_contents(path, arrays, opt_state, train_state):
    """The ``ModelConfig`` (or ``ArchConfig``) of a checkpoint read by
    ``checkpoint.load_checkpoint``, every part checked (see the module doc); nothing is built
    or allocated on the way.

    arrays: dict key -> array, with ``"__config__"``; opt_state: dict ``"<index>.<name>"``
    -> array (the ``opt.`` prefix removed); train_state: the checked JSON dict.  Raises
    ``CheckpointError`` with one line that starts with ``path`` and names the part.
    """
    try:
        config = config_from_json(str(arrays["__config__"]))
    except ValueError as exc:
        raise CheckpointError(f"{path} holds a model configuration minicompact cannot use: {exc}") from None
    settings = train_state.get("settings") or {}
    freeze = (settings.get("freeze") or 0) if settings.get("finetune") else 0  # what run.py freezes
    if not (isinstance(freeze, int) and 0 <= freeze <= conv_count(config)):
        raise CheckpointError(f"{path}: its settings' freeze must be an integer in [0, {conv_count(config)}], "
                              f"got {freeze!r}")
    try:
        check_state_arrays(config.state_shapes(), arrays)
        trained = optimizer_shapes(config, freeze)
        for key, v in opt_state.items():
            if key not in trained:
                names = list(trained)
                raise CheckpointError(f"opt.{key} is a momentum buffer of no parameter the run trains "
                                      f"(those are {', '.join(names[:4])}{', ...' if len(names) > 4 else ''})")
            check_array(f"opt.{key}", v, trained[key])
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return config


def read_checkpoint(path):
    """``checkpoint.load_checkpoint(path)`` checked whole by ``check_contents``.

    Returns ``(config, arrays, optimizer_state, train_state)``; ``CheckpointError`` (one line).
    """
    arrays, opt_state, train_state = load_checkpoint(path)
    return check_contents(path, arrays, opt_state, train_state), arrays, opt_state, train_state

"""Reading weight files and loading them so that every key is accounted for.

A file is read by its suffix: ``.params`` with the MXNet reader, ``.pth``/``.pt`` with
``torch.load(weights_only=True)``. Loading first compares names and shapes with the module and
reports everything that does not fit in one ``InputError``; then it loads with ``strict=True``.
"""

from __future__ import annotations

import pickle
from collections.abc import Collection, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from pipeline.core.errors import InputError
from pipeline.core.io import atomic_open
from pipeline.models.mxnet import read_ndarray_file

BACKBONE = "backbone"
"""The child that holds the backbone in our networks; everything beside it is a head."""

CHECKPOINT_HINT = (
    "give a checkpoint written by this pipeline's training, PSA's res38_cls.pth or RRM's final weights"
)
SHOWN_KEYS = 4
"""How many keys of each kind an error message names before it only counts them."""


def _read_torch(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(path, f"cannot read PyTorch weights ({reason})") from None
    if not isinstance(state, Mapping) or not all(
        isinstance(name, str) and isinstance(value, Tensor) for name, value in state.items()
    ):
        raise InputError(path, "not a state dict (a mapping of parameter names to tensors)")
    return dict(state)


def read_weights(path: str | Path, hint: str) -> dict[str, Tensor]:
    """The tensors of a weights file; ``hint`` says what belongs there if the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, f"weights file not found; {hint}")
    suffix = path.suffix.lower()
    if suffix == ".params":
        return {name: torch.from_numpy(array) for name, array in read_ndarray_file(path).items()}
    if suffix in (".pth", ".pt"):
        return _read_torch(path)
    raise InputError(
        path, f"unknown weights format {suffix!r}: expected .params (MXNet) or .pth/.pt (PyTorch)"
    )


def _listing(what: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS]) + (", ..." if len(keys) > SHOWN_KEYS else "")
    return f"{len(keys)} {what} ({shown})"


def _may_lack(key: str, allow_missing: Collection[str]) -> bool:
    """Keys a file may lack: batch-norm step counters and the modules in ``allow_missing``.

    Checkpoints from PyTorch before 0.4.1 (PSA's among them) have no ``num_batches_tracked``;
    it only matters for batch norm with ``momentum=None``, which no network here uses.
    """
    return key.endswith(".num_batches_tracked") or key.split(".", 1)[0] in allow_missing


def load_state(
    module: nn.Module,
    state: Mapping[str, Tensor],
    where: str | Path,
    target: str,
    allow_missing: Collection[str] = (),
) -> None:
    """Load ``state`` into ``module`` with ``strict=True`` once every name and shape fits.

    ``where`` names the file and ``target`` the module in the error. Keys a file may lack (see
    ``_may_lack``; ``allow_missing`` names top-level modules, e.g. a new head) keep the module's
    current values.
    """
    own = module.state_dict()
    absent = [key for key in own if key not in state]
    missing = [key for key in absent if not _may_lack(key, allow_missing)]
    unexpected = [key for key in state if key not in own]
    reshaped = [
        f"{key} {tuple(state[key].shape)} in the file, {tuple(own[key].shape)} in the network"
        for key in state
        if key in own and state[key].shape != own[key].shape
    ]
    if missing or unexpected or reshaped:
        kinds = {"missing": missing, "unexpected": unexpected, "of another shape": reshaped}
        problems = [_listing(what, keys) for what, keys in kinds.items() if keys]
        raise InputError(where, f"weights do not fit {target}: " + "; ".join(problems))
    module.load_state_dict({**{key: own[key] for key in absent}, **state}, strict=True)


def nest_backbone_keys(state: Mapping[str, Tensor], heads: Collection[str]) -> dict[str, Tensor]:
    """A checkpoint's keys in our networks' layout.

    PSA's and RRM's networks subclass the backbone, so their checkpoints are flat: the backbone's
    modules (``conv1a, b2, ..., bn7``) sit beside the heads (``fc8``, ``fc8_seg_conv1``,
    ``fc8_seg_conv2``). Our networks hold the backbone as the child ``backbone`` and give the
    heads PSA's and RRM's names. So this is the one mapping: a key whose first component is
    neither ``backbone`` nor one of ``heads`` gets ``backbone.`` in front. Our own checkpoints
    pass through unchanged.
    """
    return {
        key if key.split(".", 1)[0] in {BACKBONE, *heads} else f"{BACKBONE}.{key}": value
        for key, value in state.items()
    }


def load_checkpoint(
    net: nn.Module, path: str | Path, allow_missing: Collection[str] = (), hint: str = CHECKPOINT_HINT,
    set_aside: Collection[str] = (),
) -> None:
    """Load a whole network (backbone and heads), ours or PSA's/RRM's, with every key matched.

    ``allow_missing`` names heads the file may lack, e.g. ``SegNet.seg_head`` to start a
    segmentation network from a classifier checkpoint; ``set_aside`` names heads the file may
    have and the network has no use for, e.g. ``SegNet.seg_head`` to take the classifier of a
    segmentation network (RRM's trains one jointly).
    """
    heads = [name for name, _ in net.named_children() if name != BACKBONE]
    weights = read_weights(path, hint)
    state = nest_backbone_keys({key: value for key, value in weights.items()
                                if key.split(".", 1)[0] not in set_aside}, heads)
    target = f"{type(net).__name__} with a {type(getattr(net, BACKBONE)).__name__} backbone"
    load_state(net, state, path, target, allow_missing)


def save_checkpoint(net: nn.Module, path: str | Path) -> None:
    """Write ``net``'s state dict atomically, so a kill never leaves a half-written checkpoint."""
    with atomic_open(path, "wb") as handle:
        torch.save(net.state_dict(), handle)

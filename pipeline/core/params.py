"""Stage parameters: dataclass defaults, overridden by a section of ``params.yaml``.

Each stage's parameters are one frozen dataclass in the module that uses them; its field
defaults are the single source of the defaults. A key ``params.yaml`` lacks takes the dataclass
default, and a key the dataclass lacks, a value of the wrong type or a value out of range is an
error naming ``params.yaml`` and the key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pipeline.core.errors import InputError

P = TypeVar("P")

PARAMS_FILE = Path("params.yaml")

SECTIONS = ("dataset", "storage", "run", "data", "classifier", "cams", "prune", "refine", "segment", "deeplab",
            "supervised", "overlays")
"""The sections a params file may hold; any other name (a misspelling such as ``cam:``) is an
error, not a section silently ignored while its stage runs on defaults."""


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (line {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_params_file(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """The params file as a mapping of sections; missing, empty, not YAML, a key given twice or an
    unknown section are each one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "parameters file not found (run from the project root)")
    try:
        data = yaml.load(path.read_text(), Loader=_StrictLoader)  # noqa: S506 (a safe loader)
    except yaml.constructor.ConstructorError as error:
        raise InputError(path, str(error.problem)) from None
    except yaml.YAMLError as error:
        raise InputError(path, f"not valid YAML ({str(error).splitlines()[0]})") from None
    if data is None:
        raise InputError(path, "empty parameters file (a stage would run on defaults alone)")
    if not isinstance(data, dict):
        raise InputError(path, "must be a mapping of stage names to parameters")
    unknown = sorted(str(name) for name in data if name not in SECTIONS)
    if unknown:
        raise InputError(path, f"unknown section {unknown[0]!r} (known: {', '.join(SECTIONS)})")
    return data


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a type hint; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _coerce(value, option, where)
            except TypeError:
                continue
        raise TypeError(f"{where}: expected {hint}, got {value!r}")
    if hint is type(None):
        if value is None:
            return None
        raise TypeError(f"{where}: expected null, got {value!r}")
    if origin in (tuple, list):
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where}: expected a list, got {value!r}")
        item_hint = args[0] if args else Any
        return tuple(_coerce(v, item_hint, where) for v in value)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise TypeError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def build_params(cls: type[P], values: dict[str, Any] | None, where: str) -> P:
    """Make a ``cls`` instance from ``values`` over its defaults, checking names and types.

    Range checks live in each dataclass's ``__post_init__`` and raise ``ValueError``.
    """
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise InputError(where, f"unknown parameter {unknown[0]!r} (known: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        try:
            kwargs[name] = _coerce(value, hints[name], f"{name}")
        except TypeError as error:
            raise InputError(where, f"parameter {error}") from None
    try:
        return cls(**kwargs)
    except ValueError as error:
        raise InputError(where, f"parameter {error}") from None


def load_params(cls: type[P], section: str, path: str | Path = PARAMS_FILE) -> P:
    """The ``section`` of the params file as a ``cls`` instance."""
    data = read_params_file(path)
    values = data.get(section) or {}
    if not isinstance(values, dict):
        raise InputError(path, f"section {section!r} must be a mapping")
    return build_params(cls, values, f"{path} [{section}]")


def check_scales(name: str, values: tuple[float, ...]) -> None:
    """Raise ValueError unless ``values`` holds one or more positive scale factors."""
    if not values or min(values) <= 0:
        raise ValueError(f"{name}={tuple(values)!r} must be one or more positive factors")


def check_scale_range(name: str, values: tuple[float, ...]) -> None:
    """Raise ValueError unless ``values`` is a (low, high) pair of factors with 0 < low <= high."""
    if len(values) != 2 or not 0 < values[0] <= values[1]:
        raise ValueError(f"{name}={tuple(values)!r} must be (low, high) with 0 < low <= high")


def check_long_range(name: str, values: Sequence[int]) -> None:
    """Raise ValueError unless ``values`` is a (low, high) pair of lengths in pixels with 1 <= low <= high."""
    if len(values) != 2 or any(int(value) != value for value in values) or not 1 <= values[0] <= values[1]:
        raise ValueError(f"{name}={tuple(values)!r} must be (low, high) pixels with 1 <= low <= high")


def check_colour_jitter(name: str, strengths: Sequence[float]) -> None:
    """Raise ValueError unless ``strengths`` is (brightness, contrast, saturation, hue), the first
    three at least 0 and hue in [0, 0.5]."""
    if len(strengths) != 4:
        raise ValueError(f"{name}={tuple(strengths)!r} must be [brightness, contrast, saturation, hue]")
    for what, value in zip(("brightness", "contrast", "saturation"), strengths[:3], strict=True):
        check_range(f"{name} {what}", value, 0)
    check_range(f"{name} hue", strengths[3], 0, 0.5)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(str, choices))}")


def check_range(name: str, value: float, low: float | None = None, high: float | None = None) -> None:
    """Raise ValueError unless ``low <= value <= high`` (either bound may be open); NaN never is.

    YAML reads ``.nan`` as a float, and NaN compares false with every bound.
    """
    if math.isnan(value) or (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ValueError(f"{name}={value!r} is outside {bounds}")

from dataclasses import dataclass

import pytest
import torch

from pipeline.core.errors import InputError
from pipeline.core.params import build_params, check_range, load_params
from pipeline.core.run import RunParams


@dataclass(frozen=True)
class Example:
    alpha: float = 4.0
    steps: int = 10
    scales: tuple[float, ...] = (1.0, 0.5)
    weights: str | None = None
    flip: bool = True

    def __post_init__(self) -> None:
        check_range("alpha", self.alpha, low=0.0)


def test_defaults_and_overrides():
    params = build_params(Example, {"alpha": 32, "scales": [1, 2]}, "params.yaml [x]")
    assert params == Example(alpha=32.0, steps=10, scales=(1.0, 2.0))
    assert isinstance(params.alpha, float)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"alpah": 1}, "unknown parameter 'alpah'"),
        ({"steps": 1.5}, "parameter steps: expected int, got 1.5"),
        ({"steps": True}, "expected int, got True"),
        ({"flip": "yes"}, "expected bool"),
        ({"scales": 1.0}, "expected a list"),
        ({"alpha": -1}, r"alpha=-1.0 is outside \[0.0, inf\]"),
    ],
)
def test_bad_values_name_the_file_section_and_key(values, message):
    with pytest.raises(InputError, match=message) as error:
        build_params(Example, values, "params.yaml [x]")
    assert str(error.value).startswith("params.yaml [x]: ")


def test_optional_values(tmp_path):
    (tmp_path / "params.yaml").write_text("classifier:\n  weights: null\ndeeplab:\n  weights: w.pth\n")
    assert load_params(Example, "classifier", tmp_path / "params.yaml").weights is None
    assert load_params(Example, "deeplab", tmp_path / "params.yaml").weights == "w.pth"
    assert load_params(Example, "segment", tmp_path / "params.yaml") == Example()  # a section left out: defaults


def test_missing_and_broken_params_file(tmp_path):
    with pytest.raises(InputError, match="parameters file not found"):
        load_params(Example, "x", tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("classifier: [\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_params(Example, "x", tmp_path / "bad.yaml")


def test_loader_processes_are_set_by_hand_or_else_chosen_by_device(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert RunParams().loader_processes(torch.device("cpu")) == 0  # reading between the steps
    assert RunParams().loader_processes(torch.device("cuda")) == 8
    assert RunParams(loader_workers=3).loader_processes(torch.device("cpu")) == 3
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert RunParams().loader_processes(torch.device("cuda")) == 2

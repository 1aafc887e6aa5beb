"""The registry of stages and stores is the one table of names and paths; dvc.yaml, which DVC reads,
says the same, and the spec's public paths import."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main as rrm
from pipeline.core.errors import InputError
from pipeline.core.registry import CLASSIFIER, CRF_MAPS, DVC_ARTIFACTS, MASKS, REFINED, SEGMENT, STAGES, STORES
from pipeline.core.stage import open_context

ROOT = Path(__file__).resolve().parents[1]


def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def names(entries: list) -> set[str]:
    """The paths of a dvc.yaml list of outs or metrics (an entry with options is a one-key mapping)."""
    return {next(iter(entry)) if isinstance(entry, dict) else entry for entry in entries}


def test_dvc_yaml_runs_the_registry_s_stages_in_its_order():
    assert list(dvc_stages()) == list(STAGES)
    assert all(stage["cmd"] == f"python -m {STAGES[name].module}" for name, stage in dvc_stages().items())


def test_every_stage_s_outputs_in_dvc_yaml_are_the_registry_s():
    for name, stage in STAGES.items():
        declared = dvc_stages()[name]
        outs = names(declared.get("outs", []))
        assert {(DVC_ARTIFACTS / store.name).as_posix() for store in stage.stores} <= outs, name
        if stage.weights is not None:
            weights = stage.weights.as_posix()
            assert weights in outs or stage.weights.parent.as_posix() in outs, name
        if stage.metrics:
            assert names(declared["metrics"]) == {stage.metrics_file.as_posix()}, name
            assert stage.scores_file.as_posix() in outs, name


def test_each_store_is_written_by_one_stage_which_lists_it():
    for store in STORES:
        assert [stage.name for stage in STAGES.values() if store in stage.stores] == [store.stage]


def test_the_spec_s_interfaces_import_at_the_spec_s_paths():
    from pipeline.losses import bilateral_filter
    from pipeline.method.losses import bilateral_filter as filter_in_method
    from pipeline.method.prune import reliable_regions as rule_in_method
    from pipeline.prune import reliable_regions

    assert reliable_regions is rule_in_method and bilateral_filter is filter_in_method


def test_every_registered_record_function_exists():
    for produced in (*STORES, CLASSIFIER):
        if produced.record is not None:
            module, function = produced.record.split(":")
            assert callable(getattr(importlib.import_module(module), function)), produced.record


def test_a_stage_body_gets_only_the_inputs_and_outputs_its_declaration_names(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"storage": {"root": str(tmp_path)}}))
    ctx = open_context(STAGES["prune"], params)
    assert ctx.output(MASKS).path == tmp_path / "artifacts" / "masks.zarr"
    with pytest.raises(LookupError, match="does not declare refined.zarr among its stores"):
        ctx.output(REFINED)
    with pytest.raises(LookupError, match="does not declare"):
        ctx.input(SEGMENT)
    with pytest.raises(InputError, match="crfmaps.zarr"):  # declared, but not run: refused in one line naming it
        ctx.input(CRF_MAPS)


def test_rrm_dvc_yaml_check_passes_on_the_committed_file():
    assert CliRunner().invoke(rrm, ["dvc-yaml", "--check"]).exit_code == 0

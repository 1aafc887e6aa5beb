"""The registry of stages and stores is the one table of names and paths; dvc.yaml, which DVC reads,
says the same, and the spec's public paths import."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.core.registry import DVC_ARTIFACTS, STAGES, STORES

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


def test_each_store_is_written_by_one_stage_which_lists_it():
    for store in STORES:
        assert [stage.name for stage in STAGES.values() if store in stage.stores] == [store.stage]


def test_the_spec_s_interfaces_import_at_the_spec_s_paths():
    from pipeline.losses import bilateral_filter
    from pipeline.method.losses import bilateral_filter as filter_in_method
    from pipeline.method.prune import reliable_regions as rule_in_method
    from pipeline.prune import reliable_regions

    assert reliable_regions is rule_in_method and bilateral_filter is filter_in_method

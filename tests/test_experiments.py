"""`rrm experiments`: DVC's experiments as one short table of what changed and what it scored."""

from __future__ import annotations

from pipeline.inspection.experiments import changed_params, experiment_rows, experiments, format_table


def rev(name: str | None, params: dict, metrics: dict) -> dict:
    """One revision as ``dvc exp show --json`` prints it."""
    return {"rev": name or "0123456789abcdef", "name": name, "error": None,
            "data": {"params": {"params.yaml": {"data": params}},
                     "metrics": {path: {"data": data} for path, data in metrics.items()}}}


def metrics(quantile_precision: float, coverage: float, seconds: float) -> dict:
    return {"metrics/cams.json": {"miou": 0.5, "train": {"miou": 0.55}, "seconds": 10.0},
            "metrics/prune.json": {"precision": quantile_precision, "coverage": coverage, "seconds": seconds},
            "metrics/segment.json": {"miou": 0.7, "pseudo": {"miou": 0.8}, "seconds": 100.0},
            "metrics/deeplab.json": {"enabled": False}}


def shown() -> list[dict]:
    base = {"prune": {"cam_quantile": 0.6, "bg_threshold": 0.99}, "segment": {"steps": 100}}
    quantile = {**base, "prune": {"cam_quantile": 0.8, "bg_threshold": 0.99}}
    return [rev("workspace", base, metrics(0.97, 0.47, 3.0)),
            {**rev("main", base, metrics(0.97, 0.47, 3.0)),
             "experiments": [{"name": "armed-wean", "executor": {"state": "success"},
                              "revs": [rev("armed-wean", quantile, metrics(0.98, 0.40, 2.0))]},
                             {"name": "diazo-flit", "executor": {"state": "queued"},
                              "revs": [{"rev": "fedcba9876543210", "name": "diazo-flit", "data": None}]}]}]


def test_only_the_parameters_that_differ_are_columns():
    rows = experiments(shown())
    assert [row.name for row in rows] == ["workspace", "main", "└ armed-wean", "└ diazo-flit"]
    assert changed_params(rows[:3]) == ["prune.cam_quantile"]


def test_each_row_shows_its_headline_scores_in_percent_and_its_total_seconds():
    table = experiment_rows(experiments(shown()))
    assert table[2] == {"Experiment": "└ armed-wean", "cam_quantile": "0.8", "CAM": "50.0", "prec": "98.0",
                        "cov": "40.0", "refined": "-", "pseudo": "80.0", "one-step": "70.0", "two-step": "-",
                        "seconds": "112"}
    assert table[3]["Experiment"] == "└ diazo-flit (queued)" and table[3]["CAM"] == "-"


def test_parameters_that_do_not_fit_are_named_under_the_table():
    table = experiment_rows(experiments(shown()))
    wide = format_table(table, 120).splitlines()
    assert wide[0].split() == ["Experiment", "cam_quantile", "CAM", "prec", "cov", "refined", "pseudo", "one-step",
                               "two-step", "seconds"]
    assert max(map(len, wide)) <= 120
    narrow = format_table(table, 70).splitlines()
    assert "cam_quantile" not in narrow[0]
    assert narrow[-1].startswith("changed too, not shown at 70 columns: cam_quantile")

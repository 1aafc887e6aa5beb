"""`rrm report`: the stages' scores as the paper's ablation rows."""

from __future__ import annotations

import json
import re
from pathlib import Path

from click.testing import CliRunner

from pipeline.cli import main
from pipeline.core.registry import STAGES
from pipeline.inspection.report import format_rows, read_scores, report_rows

METRICS = {
    "data": {"images": {"train": 400, "val": 100}, "seconds": 5.34},
    "classifier": {"map": 0.96268, "seconds": 67.09},
    "cams": {"miou": 0.514669, "threshold": 0.4, "train": {"miou": 0.487204, "threshold": 0.35}, "seconds": 14.19},
    "crf": {"crf": {"precision": 0.874102, "coverage": 0.581937}, "images": 400, "seconds": 60.0},
    "prune": {"precision": 0.911319, "coverage": 0.200842, "cam_argmax": {"miou": 0.24783}, "seconds": 8.34},
    "refine": {"miou": 0.61234, "iou": {}, "scored_images": 400, "seconds": 21.2},
    "segment": {"miou": 0.823666, "miou_no_crf": 0.728428, "mode": "staged",
                "pseudo": {"miou": 0.848356, "miou_no_crf": 0.752051}, "seconds": 88.6},
    "deeplab": {"miou": 0.66349, "seconds": 120.0},
    "supervised": {"enabled": True, "miou": 0.80125, "seconds": 130.5},
}

TIMED = [name for name, stage in STAGES.items() if stage.metrics]
"""The stages that write scores, each with its seconds."""


def write_scores_dir(folder: Path, metrics: dict[str, dict]) -> Path:
    folder.mkdir()
    for stage, data in metrics.items():
        (folder / f"{stage}.json").write_text(json.dumps(data))
    return folder


def table(text: str) -> dict[str, str]:
    """Each row's label and what it shows: the two columns of a line are two or more spaces apart."""
    return dict(re.split(r" {2,}", line.strip(), maxsplit=1) for line in text.splitlines())


def values(folder: Path) -> dict[str, float | None]:
    """Each row's label and its rounded value."""
    return {row.label: row.value for row in report_rows(read_scores(folder))}


def test_the_ablation_rows_are_percentages_with_one_decimal(tmp_path):
    rows = values(write_scores_dir(tmp_path / "m", METRICS))
    assert rows["Classifier mAP (val)"] == 96.3
    assert rows["CAM mIoU (val)"] == 51.5
    assert rows["CAM mIoU (train)"] == 48.7
    assert rows["Reliable-region precision (train)"] == 91.1
    assert rows["Reliable-region coverage (train)"] == 20.1
    assert rows["One-step mIoU without CRF (val)"] == 72.8
    assert rows["One-step mIoU (val)"] == 82.4
    assert rows["Pseudo-label mIoU (train)"] == 84.8
    assert rows["Refined-label mIoU (train)"] == 61.2
    assert rows["Two-step mIoU, DeepLab (val)"] == 66.3
    assert rows["Supervised reference mIoU (val)"] == 80.1
    assert rows["Two-step / supervised"] == 82.8  # 0.66349 / 0.80125, not the ratio of the rounded rows


def test_the_ratio_says_which_side_is_missing(tmp_path):
    metrics = {**METRICS, "supervised": {"enabled": False}}
    shown = table(format_rows(report_rows(read_scores(write_scores_dir(tmp_path / "m", metrics)))))
    assert shown["Supervised reference mIoU (val)"] == "disabled"
    assert shown["Two-step / supervised"] == "disabled"
    del metrics["deeplab"]
    shown = table(format_rows(report_rows(read_scores(write_scores_dir(tmp_path / "n", metrics)))))
    assert shown["Two-step / supervised"] == "not run"


def test_stage_seconds_and_their_total_from_the_unrounded_times(tmp_path):
    rows = values(write_scores_dir(tmp_path / "m", METRICS))
    assert [rows[f"Time: {stage}"] for stage in TIMED] == [5.3, 67.1, 14.2, 60.0, 8.3, 21.2, 88.6, 120.0, 130.5]
    assert rows["Time: total"] == 515.3  # the sum of the rows as shown would be 515.2


def test_a_stage_not_run_disabled_or_unscored_says_so(tmp_path):
    metrics = {stage: data for stage, data in METRICS.items() if stage != "prune"}
    metrics["deeplab"] = metrics["supervised"] = {"enabled": False}
    metrics["segment"] = {**METRICS["segment"], "pseudo": {"miou": None}}
    shown = table(format_rows(report_rows(read_scores(write_scores_dir(tmp_path / "m", metrics)))))
    assert shown["Reliable-region precision (train)"] == "not run"
    assert shown["Time: prune"] == "not run"
    assert shown["Two-step mIoU, DeepLab (val)"] == "disabled"
    assert shown["Time: deeplab"] == "disabled"
    assert shown["Pseudo-label mIoU (train)"] == "n/a"
    assert shown["One-step mIoU (val)"] == "82.4 %"
    assert shown["Time: data"] == "5.3 s"
    assert shown["Time: total"] == "256.4 s"


def test_nothing_run_gives_a_table_of_not_run(tmp_path):
    rows = report_rows(read_scores(tmp_path))
    assert {row.status for row in rows} == {"not run"}
    assert all(row.value is None for row in rows)


def test_report_json_holds_the_table_values(tmp_path):
    folder = write_scores_dir(tmp_path / "m", {k: v for k, v in METRICS.items() if k not in ("deeplab", "supervised")})
    result = CliRunner().invoke(main, ["report", "--scores", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["label"]: row for row in json.loads(result.output)}
    assert rows["One-step mIoU (val)"] == {"label": "One-step mIoU (val)", "stage": "segment", "value": 82.4,
                                           "unit": "%", "status": "ok", "settings": ""}
    assert rows["Two-step mIoU, DeepLab (val)"]["status"] == "not run"
    assert rows["Time: total"]["value"] == 264.8


def test_rows_name_the_settings_that_made_them_and_the_other_restriction_beside(tmp_path):
    metrics = {**METRICS, "segment": {**METRICS["segment"], "test_tags": "predicted", "labels": "refined",
                                      "miou_all_classes_no_crf": 0.70111},
               "deeplab": {**METRICS["deeplab"], "test_tags": "predicted", "labels": "refined"}}
    folder = write_scores_dir(tmp_path / "m", metrics)
    rows = {row.label: row for row in report_rows(read_scores(folder))}
    assert (rows["One-step mIoU (val)"].value, rows["One-step mIoU (val)"].settings) == (
        82.4, "test_tags: predicted, labels: refined")
    assert rows["One-step mIoU without CRF, every class (val)"].value == 70.1
    assert "One-step mIoU without CRF, predicted tags (val)" not in rows  # a diagnostic of the other setting
    shown = table(format_rows(list(rows.values())))
    assert shown["Two-step mIoU, DeepLab (val) [test_tags: predicted, labels: refined]"] == "66.3 %"


def test_report_prints_the_table(tmp_path):
    folder = write_scores_dir(tmp_path / "m", METRICS)
    result = CliRunner().invoke(main, ["report", "--scores", str(folder)])
    assert result.exit_code == 0, result.output
    assert table(result.output)["CAM mIoU (val)"] == "51.5 %"
    assert list(table(result.output))[-1] == "Time: total"


def test_a_broken_scores_file_is_one_line_naming_it(tmp_path):
    folder = write_scores_dir(tmp_path / "m", {})
    (folder / "cams.json").write_text("{not json")
    result = CliRunner().invoke(main, ["report", "--scores", str(folder)])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith(f"error: {folder / 'cams.json'}: ")

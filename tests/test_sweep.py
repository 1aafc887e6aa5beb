"""`rrm sweep`: the rule's precision and coverage at each threshold, from the kept CRFs, the same
figures as running the prune stage's rule at each value, and nothing of the run written."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main as rrm
from pipeline.core.errors import InputError
from pipeline.core.run import RunParams
from pipeline.core.store import ImageStore
from pipeline.inspection.sweep import grid, parse_axes, sample, sweep
from pipeline.method.mining import mine_split, prune_split
from pipeline.method.prune import PruneParams
from tests.test_mining import write_cams

PARAMS = PruneParams()


@pytest.fixture
def kept(tiny_manifest, tmp_path) -> ImageStore:
    """The CRF maps the crf stage keeps of the tiny manifest's fake CAMs, in ``tmp_path/artifacts``."""
    cams, crf, maps = (ImageStore(tmp_path / "artifacts" / f"{name}.zarr", stage)
                       for name, stage in (("cams", "cams"), ("crf", "crf"), ("crfmaps", "crf")))
    write_cams(cams, tiny_manifest, "train")
    mine_split(tiny_manifest, "train", cams, crf, maps, PARAMS, RunParams(workers=1), progress=False)
    return maps


def test_the_sweep_gives_the_rule_s_figures_at_each_value(tiny_manifest, kept, tmp_path):
    axes = parse_axes(["prune.cam_quantile", "0.3", "0.6", "crf_confidence", "0.5", "0.9"])
    points = sweep(tiny_manifest, tiny_manifest.split("train"), kept, grid(PARAMS, axes), progress=False)

    assert [(point.params.cam_quantile, point.params.crf_confidence) for point in points] == [
        (0.3, 0.5), (0.3, 0.9), (0.6, 0.5), (0.6, 0.9)]
    for index, point in enumerate(points):
        masks = ImageStore(tmp_path / f"masks{index}.zarr", "prune")
        score = prune_split(tiny_manifest, "train", kept, masks, point.params, progress=False)
        assert point.score.counts.tolist() == score.masks.counts.tolist()
    rows = [point.row(axes, tiny_manifest.label_names, PARAMS) for point in points]
    assert [row["current"] for row in rows] == [False, False, False, False]  # 0.6 with 0.8 is not on the grid
    assert rows[0]["coverage"] > rows[3]["coverage"] and set(rows[0]["per_class"]) == {"background", "red",
                                                                                        "green", "yellow"}


def test_without_ground_truth_a_point_gives_its_coverage_and_each_class_s_share(tiny_manifest, kept):
    unscored = replace(tiny_manifest, mask_dir=None)
    axes = parse_axes(["prune.cam_quantile", "0.6"])
    [point] = sweep(unscored, unscored.split("train"), kept, grid(PARAMS, axes), progress=False)
    row = point.row(axes, unscored.label_names, PARAMS)

    assert row["precision"] is None and row["current"] and 0 < row["coverage"] < 1
    assert sum(share["share"] for share in row["per_class"].values()) == pytest.approx(1)


@pytest.mark.parametrize(("tokens", "message"), [
    (["prune.cam_quantile", "1.5"], "prune.cam_quantile=1.5 is outside [0, 1]"),
    (["prune.la_alpha", "2", "4"], "'prune.la_alpha' changes the CRFs, which are kept as made: rerun the crf stage"),
    (["prune.cam_quantlie", "0.5"], "'prune.cam_quantlie' is no setting of the prune section"),
    (["0.5", "prune.cam_quantile"], "value 0.5 comes before any setting"),
    (["prune.cam_quantile"], "give one or two settings, each followed by its values"),
    (["cam_floor", "0.1", "cam_quantile", "0.5", "bg_threshold", "0.8"], "give one or two settings"),
])
def test_a_bad_setting_or_value_is_one_line(tokens, message):
    with pytest.raises(InputError, match="rrm sweep") as error:
        grid(PARAMS, parse_axes(tokens))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_large_split_is_sampled_evenly(tiny_manifest):
    items = tiny_manifest.split("train") * 5
    assert sample(items, 100) == list(items)
    assert sample(items, 4) == [items[0], items[5], items[10], items[15]]


def test_rrm_sweep_prints_the_table_and_writes_the_plot_and_chart_only(tiny_manifest, kept, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump({"dataset": {"manifest": str(tiny_manifest.source)},
                                                   "prune": {"cam_quantile": 0.6}}))
    before = {path: path.read_bytes() for path in Path("artifacts").rglob("*") if path.is_file()}
    result = CliRunner().invoke(rrm, ["sweep", "prune.cam_quantile", "0.4", "0.6", "0.8"])

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()  # the progress bar goes to stderr
    assert lines[0] == "4 of 4 training images"
    assert lines[1].split() == ["prune.cam_quantile", "precision", "coverage"]
    assert [line.split()[-1] for line in lines[2:5]] == ["%", "*", "%"]  # 0.6, the params file's, marked
    rows = json.loads(Path("plots/sweep.json").read_text())
    assert [row["prune.cam_quantile"] for row in rows] == [0.4, 0.6, 0.8]
    assert json.loads(Path("plots/sweep_current.json").read_text()) == [
        {key: value for key, value in rows[1].items() if key != "per_class"}]
    assert Path("inspection/sweep.png").is_file()
    assert {path: path.read_bytes() for path in Path("artifacts").rglob("*") if path.is_file()} == before
    bad = CliRunner().invoke(rrm, ["sweep", "prune.crf_confidence", "2"])
    assert bad.exit_code == 2 and bad.output.startswith("error: rrm sweep: prune.crf_confidence=2")

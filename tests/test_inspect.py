"""Looking at the masks: `rrm show`, `rrm gallery`, `rrm stats`, `rrm diff` and the overlays stage,
on stores written by hand for the six 20x24 images of the ``tiny_manifest`` fixture."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.core.io import IGNORE, read_mask
from pipeline.core.registry import CAMS, OVERLAYS, STATS_PER_CLASS, TRAINING_LABELS
from pipeline.core.stage import DatasetParams
from pipeline.core.store import ImageStore, StorageParams
from pipeline.data.manifest import Manifest
from pipeline.inspection.figures import image_figure
from pipeline.inspection.panels import GAP, UNLABELLED, mask_panel
from pipeline.inspection.project import Project
from pipeline.inspection.stats import MaskStats, all_stats
from pipeline.method.metrics import PartialLabelScore
from stages import overlays

SCALE = 10
"""The default enlargement of a 20x24 image: the least that makes its shorter side 192 pixels or more."""


def _truth(manifest: Manifest, image_id: str) -> np.ndarray:
    return read_mask(manifest.mask_path(image_id), manifest.num_classes)


def _reliable(truth: np.ndarray) -> np.ndarray:
    """The ground truth with its outer rows and columns unreliable: a partial mask of precision 1."""
    mask = truth.copy()
    mask[:3], mask[:, :3] = IGNORE, IGNORE
    return mask


def _write(store: ImageStore, masks: dict[str, np.ndarray]) -> None:
    store.reset_unless("test")
    for image_id, mask in masks.items():
        store.write(image_id, mask)
    store.mark_complete(masks)


def write_artifacts(manifest: Manifest, folder: Path) -> None:
    """CAMs of every image; reliable masks, refined labels and pseudo-labels of train (im1's
    pseudo-label all background, its worst image; im2's refined label too); segment predictions of
    val; no deeplab store."""
    truths = {item.id: manifest.read_mask(item) for items in manifest.splits.values() for item in items}
    train, val = ([item.id for item in manifest.split(name)] for name in ("train", "val"))
    cams = ImageStore(folder / CAMS.name)
    cams.reset_unless("test")
    for items in manifest.splits.values():
        for item in items:
            cams.write(item.id, (truths[item.id] > 0)[None].astype(np.float16), classes=list(item.labels))
    cams.mark_complete(truths)
    _write(ImageStore(folder / "masks.zarr"), {i: _reliable(truths[i]) for i in train})
    pseudo = {i: truths[i] for i in train} | {"im1": np.zeros_like(truths["im1"])}
    _write(ImageStore(folder / "pseudo.zarr"), pseudo)
    refined = {i: truths[i] for i in train} | {"im2": np.zeros_like(truths["im2"])}
    _write(ImageStore(folder / "refined.zarr"), refined)
    _write(ImageStore(folder / "segment.zarr"), {i: truths[i] for i in val})


@pytest.fixture
def artifacts(tiny_manifest: Manifest, tmp_path: Path) -> Path:
    write_artifacts(tiny_manifest, tmp_path / "artifacts")
    return tmp_path / "artifacts"


@pytest.fixture
def project(tiny_manifest: Manifest, artifacts: Path) -> Project:
    return Project(tiny_manifest, DatasetParams(), StorageParams(artifacts=str(artifacts)))


@pytest.fixture
def cli(project: Project, artifacts: Path, tmp_path: Path):
    """``rrm`` with the project's params and stores; returns the result."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"dataset": {"manifest": str(project.manifest.source)}}))

    def invoke(*args: str):
        return CliRunner().invoke(main, [*args, "--params", str(params), "--artifacts", str(artifacts)])

    return invoke


def test_show_draws_one_panel_per_map_and_mask_with_a_legend_of_the_image_classes(project, cli, tmp_path):
    figure, notes = image_figure(project, "im0")
    assert figure.titles == ("image", "CAM red", "reliable", "refined", "segment", "ground truth")
    assert figure.panel_size == (20 * SCALE, 24 * SCALE)
    assert figure.legend == ("background", "red", UNLABELLED)
    assert figure.pixels.shape[1] == GAP + 6 * (24 * SCALE + GAP)
    assert notes == []

    result = cli("show", "im0", "--out", str(tmp_path / "im0.png"))
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "im0.png").size == (figure.pixels.shape[1], figure.pixels.shape[0])


def test_show_of_a_val_image_says_which_stage_has_not_run(project):
    figure, notes = image_figure(project, "im4", scale=2)
    assert figure.titles == ("image", "CAM green", "segment", "ground truth")
    assert figure.panel_size == (40, 48)
    assert [note.split(":")[0] for note in notes] == ["deeplab", "supervised"]
    assert "has the deeplab stage run?" in notes[0] and "has the supervised stage run?" in notes[1]


def test_show_says_when_an_image_s_data_is_gone(project, artifacts):
    for chunk in [path for path in (artifacts / "segment.zarr" / "im4" / "c").rglob("*") if path.is_file()]:
        chunk.unlink()
    figure, notes = image_figure(project, "im4", scale=2)
    assert "segment" not in figure.titles
    chunk = artifacts / "segment.zarr" / "im4" / "c" / "0" / "0"
    assert notes[0] == f"segment: {artifacts / 'segment.zarr'}: its chunk file {chunk} is gone (rerun the segment " \
                       "stage to write it again)"


def cut_short(store: Path, image_id: str) -> Path:
    """Cut the chunk file of ``image_id`` in ``store`` to 10 bytes, as a full disk leaves it; the file."""
    chunk = store / image_id / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:10])
    return chunk


def test_show_stats_and_gallery_name_a_damaged_image_and_go_on(project, artifacts, cli, tmp_path):
    chunk = cut_short(artifacts / "masks.zarr", "im1")

    shown = cli("show", "im1", "--out", str(tmp_path / "im1.png"))
    assert shown.exit_code == 0 and "reliable" not in shown.output.splitlines()[-1]
    assert f"not shown: reliable: {artifacts / 'masks.zarr'}: its chunk file {chunk} is damaged: cut short " \
           "(10 bytes) (rerun the prune stage to write it again)" in shown.output
    stats = cli("stats")
    assert stats.exit_code == 0
    assert "left out 1 image(s) that cannot be read (`rrm verify`, then rerun the prune stage):" in stats.output
    assert f"  im1: its chunk file {chunk} is damaged: cut short (10 bytes)" in stats.output
    gallery = cli("gallery", "--out", str(tmp_path / "gallery.html"))
    assert gallery.exit_code == 0 and f"not scored: {artifacts / 'masks.zarr'}: image 'im1': its chunk file" in \
        gallery.output


def test_verify_lists_the_damaged_and_missing_images_of_each_store_and_repair_deletes_the_damaged(artifacts, cli):
    assert cli("verify").exit_code == 0
    damaged = cut_short(artifacts / "masks.zarr", "im1")
    (artifacts / "segment.zarr" / "im4" / "c" / "0" / "0").unlink()

    found = cli("verify")
    assert found.exit_code == 1
    lines = found.stdout.splitlines()  # the progress bars are on stderr
    assert f"masks.zarr: 3 of 4 images whole, 1 damaged, 0 missing ({artifacts / 'masks.zarr'})" in lines
    assert f"  damaged im1: its chunk file {damaged} is damaged: cut short (10 bytes)" in lines
    assert "  to mend: `rrm verify --repair`, then rerun the prune stage (`dvc repro prune`)" in lines
    assert f"segment.zarr: 1 of 2 images whole, 0 damaged, 1 missing ({artifacts / 'segment.zarr'})" in lines
    assert "deeplab.zarr: not run (has the deeplab stage run?)" in lines
    only = cli("verify", "--store", "masks")
    assert only.exit_code == 1 and only.stdout.startswith("masks.zarr: 3 of 4") and "segment" not in only.stdout

    repaired = cli("verify", "--store", "masks", "--repair")
    assert repaired.stdout.splitlines()[-1].startswith("deleted 1 damaged chunk file(s)")
    assert not damaged.exists()
    after = cli("verify", "--store", "masks.zarr")
    assert after.exit_code == 1 and "1 damaged" not in after.stdout and "  missing im1: its chunk file" in after.stdout
    unknown = cli("verify", "--store", "nope")
    assert unknown.exit_code == 2 and "no store 'nope'" in unknown.output


def test_unreliable_pixels_are_hatched_grey_not_background_black():
    image = np.full((12, 12, 3), 200, dtype=np.uint8)
    palette = np.array([[0, 0, 0], [255, 0, 0]], dtype=np.uint8)
    unlabelled = mask_panel(image, np.full((12, 12), IGNORE, dtype=np.uint8), palette)
    background = mask_panel(image, np.zeros((12, 12), dtype=np.uint8), palette)
    assert len(np.unique(unlabelled.reshape(-1, 3), axis=0)) == 2  # light grey crossed by dark lines
    assert unlabelled.mean() > 2 * background.mean()


def test_stats_of_a_hand_made_mask():
    stats = MaskStats(num_labels=2)
    stats.update(np.array([[1, IGNORE], [0, 1]], dtype=np.uint8), [0], np.array([[1, 1], [0, 0]], dtype=np.uint8))
    figures = stats.as_dict(["background", "cat"])
    assert figures["precision"] == round(2 / 3, 6) and figures["coverage"] == 0.75
    assert figures["per_class"]["cat"] == {"labelled_pixels": 2, "unreliable": 0.25, "precision": 0.5,
                                           "coverage": 0.5, "iou": round(1 / 3, 6)}
    assert figures["per_class"]["background"]["iou"] == 0.5  # the gt background pixel labelled cat is a miss
    assert figures["miou"] == round((0.5 + 1 / 3) / 2, 6)


def test_stats_table_and_json_agree_with_the_metrics(project, artifacts, cli):
    by_json = json.loads(cli("stats", "--json").output)
    score = PartialLabelScore(4)
    for item in project.manifest.split("train"):
        score.update(project.manifest.read_mask(item), ImageStore(artifacts / "masks.zarr").read(item.id)[0])
    reliable = by_json["reliable"]
    assert reliable["precision"] == 1.0 and reliable["coverage"] == round(score.coverage(), 6) < 1
    assert reliable["per_class"]["red"]["coverage"] == round(score.class_coverage()[1], 6)
    assert by_json["deeplab"]["status"] == "not run (has the deeplab stage run?)"
    assert by_json["segment"]["miou"] == 1.0

    table = cli("stats").output
    red = next(line for line in table.splitlines() if line.startswith("red"))
    assert red.split()[-3:] == ["100.0%", f"{100 * score.class_coverage()[1]:.1f}%",
                                f"{100 * reliable['per_class']['red']['iou']:.1f}%"]
    assert "deeplab: deeplab stage" in table and "not run" in table


def test_reliable_stats_equal_what_the_prune_stage_reports(tiny_manifest, tmp_path):
    from pipeline.method.mining import MiningJob, RuleJob, mine_chunk, prune_chunk
    from pipeline.method.prune import PruneParams

    write_artifacts(tiny_manifest, tmp_path / "artifacts")
    crf, maps, masks = (ImageStore(tmp_path / "artifacts" / name) for name in ("crf.zarr", "crfmaps.zarr",
                                                                                "masks.zarr"))
    masks.reset_unless("rule")  # empty: prune_chunk applies the rule to every image itself
    items = tiny_manifest.split("train")
    cams = ImageStore(tmp_path / "artifacts" / CAMS.name)
    mine_chunk(MiningJob.create(tiny_manifest, cams, crf, maps, PruneParams()), items)
    reported = prune_chunk(RuleJob(tiny_manifest, maps, masks, PruneParams()), items).as_dict(tiny_manifest.label_names)
    masks.mark_complete(item.id for item in items)
    project = Project(tiny_manifest, DatasetParams(), StorageParams(artifacts=str(tmp_path / "artifacts")))
    ours = all_stats(project)["reliable"]
    assert (ours["precision"], ours["coverage"]) == (round(reported["precision"], 6), round(reported["coverage"], 6))


def _rows(page: str) -> list[dict[str, str]]:
    """Each table row's id and its numeric cells, from the gallery's HTML."""
    rows = re.findall(r'<tr data-id="([^"]+)">(.*?)</tr>', page)
    return [{"id": image_id, **dict(re.findall(r'<td class="(\w+)" data-v="([^"]*)"', cells))}
            for image_id, cells in rows]


def test_gallery_lists_the_worst_images_first_with_the_figures_of_stats(project, cli, tmp_path):
    result = cli("gallery", "--n", "3", "--out", str(tmp_path / "gallery.html"))
    assert result.exit_code == 0, result.output
    page = (tmp_path / "gallery.html").read_text()
    rows = _rows(page)
    assert len(rows) == 3 and rows[0]["id"] == "im1"  # its pseudo-label is all background
    assert float(rows[0]["iou"]) < 1 and [float(r["iou"]) for r in rows[1:]] == [1.0, 1.0]
    assert page.count("data:image/png;base64,") == 3 * 5 and "http" not in page
    for row in rows:
        alone = all_stats(project, ids=[row["id"]])
        assert float(row["precision"]) == alone["reliable"]["precision"]
        assert float(row["coverage"]) == alone["reliable"]["coverage"]
        assert float(row["iou"]) == alone["pseudo"]["miou"]
        assert float(row["iou_refined"]) == alone["refined"]["miou"]


def test_gallery_of_one_class(project, cli, tmp_path):
    result = cli("gallery", "--class", "red", "--sort", "best", "--out", str(tmp_path / "red.html"))
    assert result.exit_code == 0, result.output
    rows = _rows((tmp_path / "red.html").read_text())
    assert {row["id"] for row in rows} == {"im0", "im3"} and all(row["classes"] == "red" for row in rows)
    unknown = cli("gallery", "--class", "dog", "--out", str(tmp_path / "dog.html"))
    assert unknown.exit_code == 2 and "--class: unknown class 'dog'" in unknown.output


def test_gallery_of_the_val_split_scores_its_predictions_only(cli, tmp_path):
    assert cli("gallery", "--split", "val", "--out", str(tmp_path / "val.html")).exit_code == 0
    rows = _rows((tmp_path / "val.html").read_text())
    assert [(row["id"], row["precision"], row["iou"]) for row in rows] == [("im4", "", "1.0"), ("im5", "", "1.0")]


@pytest.mark.parametrize("command", ["show", "gallery", "stats", "diff"])
def test_every_inspection_command_explains_itself(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0 and "--artifacts" in result.output and "--params" in result.output


def test_diff_finds_the_changed_image_and_draws_both_versions(project, artifacts, cli, tmp_path):
    before = tmp_path / "before"
    shutil.copytree(artifacts, before)
    changed = _reliable(_truth(project.manifest, "im2"))
    changed[changed == 3] = IGNORE
    ImageStore(artifacts / "masks.zarr").write("im2", changed)

    result = cli("diff", "--against", str(before), "--n", "1", "--out", str(tmp_path / "diff"), "--json")
    assert result.exit_code == 0, result.output
    compared = json.loads(result.output)
    assert compared["most_changed"][0]["id"] == "im2" and len(compared["most_changed"]) == 1
    assert compared["stages"]["reliable"]["changed_images"] == 1
    assert compared["stages"]["pseudo"]["changed_images"] == 0
    assert compared["stages"]["reliable"]["difference"]["coverage"] < 0
    drawn = Image.open(tmp_path / "diff" / "im2.png")
    figure, _ = image_figure(project, "im2", against=project.with_artifacts(before))
    assert "reliable (before)" in figure.titles and drawn.size == figure.pixels.shape[1::-1]

    one_store = cli("diff", "--against", str(before / "masks.zarr"), "--n", "0", "--out", str(tmp_path / "d2"))
    assert one_store.exit_code == 0, one_store.output
    assert "reliable: 1 of 4 images changed" in one_store.output
    assert "pseudo: not in the other version" in one_store.output


def test_diff_against_a_git_revision_reads_the_masks_dvc_cached_there(project, tmp_path, monkeypatch):
    from dvc.repo import Repo

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"dataset": {"manifest": str(project.manifest.source)}}))
    subprocess.run(["git", "init", "--quiet"], check=True)
    Repo.init().add("artifacts/masks.zarr")
    subprocess.run(["git", "add", "."], check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "masks"], check=True)
    ImageStore("artifacts/masks.zarr").write("im3", np.full((20, 24), IGNORE, dtype=np.uint8))

    result = CliRunner().invoke(main, ["diff", "--against", "HEAD", "--n", "1", "--json"])
    assert result.exit_code == 0, result.output
    share = np.mean(_reliable(_truth(project.manifest, "im3")) != IGNORE)  # the pixels that were labelled
    assert json.loads(result.output)["most_changed"] == [{"id": "im3", "stage": "reliable", "changed": round(share, 6)}]
    unknown = CliRunner().invoke(main, ["diff", "--against", "no-such-experiment"])
    assert unknown.output == "error: no-such-experiment: not a git revision or DVC experiment of this repository\n"
    shutil.rmtree(".dvc/cache")
    uncached = CliRunner().invoke(main, ["diff", "--against", "HEAD"])
    assert uncached.exit_code == 2 and uncached.output.startswith("error: HEAD: no DVC-cached masks at this revision")


def test_an_unknown_image_and_a_missing_store_are_one_line_errors(project, artifacts, cli):
    unknown = cli("show", "nope")
    assert unknown.exit_code == 2 and unknown.output.count("\n") == 1
    assert unknown.output == f"error: {project.manifest.source}: no image id 'nope' in split 'train' or 'val'\n"
    shutil.rmtree(artifacts / CAMS.name)
    missing = cli("show", "im0")
    assert missing.exit_code == 2
    assert missing.output == f"error: {artifacts / CAMS.name}: store not found (has the cams stage run?)\n"
    shutil.rmtree(artifacts / "masks.zarr")
    shutil.rmtree(artifacts / "pseudo.zarr")
    shutil.rmtree(artifacts / "refined.zarr")
    gallery = cli("gallery")
    assert gallery.exit_code == 2 and "masks.zarr: not run (has the prune stage run?)" in gallery.output


def test_overlays_stage_draws_samples_and_per_class_figures(project, artifacts, monkeypatch):
    root = artifacts.parent
    (root / "params.yaml").write_text(yaml.safe_dump({"dataset": {"manifest": str(project.manifest.source)},
                                                      "overlays": {"samples": 1}}))
    monkeypatch.chdir(root)
    overlays.main(Path("params.yaml"))
    assert sorted(p.name for p in OVERLAYS.path.iterdir()) == ["im0.png", "im4.png"]
    rows = json.loads(STATS_PER_CLASS.path.read_text())
    assert [row["bar"] for row in rows[:4]] == ["background / reliable", "background / refined", "background / pseudo",
                                                "background / segment"]
    assert len(rows) == 4 * 4  # no deeplab rows: that stage has not run
    labels = json.loads(TRAINING_LABELS.path.read_text())
    assert [row["bar"] for row in labels[:3]] == ["background / reliable", "background / refined",
                                                  "background / pseudo"]  # no CAM rows: the cams stage wrote no metrics
    assert {row["iou"] for row in labels if row["labels"] == "pseudo" and row["class"] == "red"} == {1.0}
    assert {row["precision"] for row in rows if row["stage"] == "reliable"} == {1.0}

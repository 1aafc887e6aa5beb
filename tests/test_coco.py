"""`rrm manifest coco` on a tiny COCO folder the test writes: polygons, RLE, crowd, overlaps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from pycocotools import mask as coco_mask

from pipeline.cli import main as rrm
from pipeline.core.errors import InputError
from pipeline.core.io import IGNORE, write_image
from pipeline.data.coco import build_coco, class_map, read_split
from pipeline.data.manifest import load_manifest

CATEGORIES = [{"id": 3, "name": "car"}, {"id": 1, "name": "person"}]
"""Listed out of order, with a gap in the ids: the classes come in id order, person then car."""


def square(top: int, left: int, side: int) -> list[list[float]]:
    """A polygon (COCO's flat x, y list) of a square."""
    return [[left, top, left + side, top, left + side, top + side, left, top + side]]


def rle(mask: np.ndarray, compressed: bool) -> dict:
    """COCO's RLE of a bool mask: string counts, or the list counts of crowd annotations."""
    encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    if compressed:
        return {"size": encoded["size"], "counts": encoded["counts"].decode()}
    flat = mask.astype(np.uint8).flatten(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"size": list(mask.shape), "counts": np.diff(np.concatenate([[0], changes])).tolist()}


def write_coco(root: Path, year: str = "2014") -> Path:
    """Three train images (one without annotations) and one val image of 20x30 pixels."""
    crowd = np.zeros((20, 30), bool)
    crowd[10:20, 0:30] = True
    car = np.zeros((20, 30), bool)
    car[0:5, 20:30] = True
    train = {
        "images": [{"id": n, "file_name": f"COCO_train{year}_{n:012d}.jpg", "height": 20, "width": 30}
                   for n in (1, 2, 3)],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 100.0, "segmentation": square(0, 0, 10)},
            {"id": 11, "image_id": 1, "category_id": 3, "iscrowd": 0, "area": 16.0, "segmentation": square(2, 2, 4)},
            {"id": 12, "image_id": 2, "category_id": 1, "iscrowd": 1, "area": 300.0, "segmentation": rle(crowd, False)},
            {"id": 13, "image_id": 2, "category_id": 1, "iscrowd": 0, "area": 36.0, "segmentation": square(12, 0, 6)},
            {"id": 14, "image_id": 2, "category_id": 3, "iscrowd": 0, "area": 50.0, "segmentation": rle(car, True)},
        ],
        "categories": CATEGORIES,
    }
    val = {"images": [{"id": 9, "file_name": f"COCO_val{year}_{9:012d}.jpg", "height": 20, "width": 30}],
           "annotations": [{"id": 20, "image_id": 9, "category_id": 3, "iscrowd": 0, "area": 25.0,
                            "segmentation": square(5, 5, 5)}],
           "categories": CATEGORIES}
    for split, data in (("train", train), ("val", val)):
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}{year}.json").write_text(json.dumps(data))
        for image in data["images"]:
            write_image(root / f"{split}{year}" / image["file_name"], np.full((20, 30, 3), 120, np.uint8))
    return root


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    return write_coco(tmp_path / "COCO")


def test_the_manifest_has_coco_s_classes_tags_and_masks(coco_root, tmp_path):
    manifest = build_coco(coco_root, tmp_path / "data" / "coco", workers=1, progress=False)
    assert manifest.classes == ("person", "car")
    train = {item.id: item for item in manifest.split("train")}
    assert set(train) == {"COCO_train2014_000000000001", "COCO_train2014_000000000002"}  # image 3: no annotation
    assert train["COCO_train2014_000000000001"].labels == (0, 1)
    assert [item.id for item in manifest.split("val")] == ["COCO_val2014_000000000009"]
    assert manifest.read_image("COCO_val2014_000000000009").shape == (20, 30, 3)  # through the image links

    overlap = manifest.read_mask(train["COCO_train2014_000000000001"])
    assert (overlap[3:6, 3:6] == 2).all()  # the small car on the large person
    assert (overlap[0, 0] == 1) and (overlap[15, 25] == 0)
    crowded = manifest.read_mask(train["COCO_train2014_000000000002"])
    assert (crowded[13:17, 1:5] == 1).all()  # an instance inside the crowd region keeps its class
    assert (crowded[15, 20] == IGNORE) and (crowded[2, 25] == 2) and (crowded[2, 5] == 0)


def test_images_without_annotations_are_kept_as_background_on_request(coco_root, tmp_path):
    manifest = build_coco(coco_root, tmp_path / "data", keep_empty=True, workers=1, progress=False)
    empty = manifest.item("train", "COCO_train2014_000000000003")
    assert empty.labels == () and (manifest.read_mask(empty) == 0).all()


def test_a_rerun_writes_only_the_missing_masks(coco_root, tmp_path):
    build_coco(coco_root, tmp_path / "data", workers=1, progress=False)
    masks = tmp_path / "data" / "masks"
    kept = masks / "COCO_train2014_000000000001.png"
    stamp = kept.stat().st_mtime_ns
    (masks / "COCO_val2014_000000000009.png").unlink()  # a build stopped before this one
    build_coco(coco_root, tmp_path / "data", workers=1, progress=False)
    assert kept.stat().st_mtime_ns == stamp and (masks / "COCO_val2014_000000000009.png").is_file()


def test_rrm_manifest_coco_writes_the_manifest_and_reports_it(coco_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(rrm, ["manifest", "coco", "--coco-root", str(coco_root), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "wrote manifests/coco.json: 2 classes; train 2, val 1" in result.output
    manifest = load_manifest("manifests/coco.json")
    assert manifest.mask_dir == (tmp_path / "data" / "coco" / "masks")


def test_one_split_is_enough_and_none_is_an_error(coco_root, tmp_path):
    (coco_root / "annotations" / "instances_val2014.json").unlink()
    assert list(build_coco(coco_root, tmp_path / "data", workers=1, progress=False).splits) == ["train"]
    (coco_root / "annotations" / "instances_train2014.json").unlink()
    with pytest.raises(InputError, match="not a COCO 2014 folder: no .*instances_train2014.json or"):
        build_coco(coco_root, tmp_path / "data", workers=1, progress=False)


@pytest.mark.parametrize("broken, problem", [
    (lambda data: data.pop("annotations"), "not a COCO instances file: no 'annotations' list"),
    (lambda data: data["annotations"][0].update(image_id=77), "annotation 10 names unknown image 77"),
    (lambda data: data["annotations"][0].update(category_id=5), "annotation 10 names unknown category 5"),
])
def test_a_broken_annotation_file_is_one_line_naming_it(coco_root, tmp_path, broken, problem):
    path = coco_root / "annotations" / "instances_train2014.json"
    data = json.loads(path.read_text())
    broken(data)
    path.write_text(json.dumps(data))
    with pytest.raises(InputError) as error:
        build_coco(coco_root, tmp_path / "data", workers=1, progress=False)
    assert str(error.value) == f"{path}: {problem}"


def test_a_missing_image_file_is_one_line_naming_it(coco_root, tmp_path):
    missing = coco_root / "val2014" / "COCO_val2014_000000000009.jpg"
    missing.unlink()
    with pytest.raises(InputError) as error:
        build_coco(coco_root, tmp_path / "data", workers=1, progress=False)
    assert str(error.value) == f"{missing}: image not found"


def test_class_maps_follow_the_area_order_whatever_the_file_order(coco_root):
    _, images = read_split(coco_root / "annotations" / "instances_train2014.json", coco_root / "train2014")
    first = images[0]
    reversed_order = type(first)(first.id, first.file, first.height, first.width, first.annotations[::-1])
    assert (class_map(first) == class_map(reversed_order)).all()

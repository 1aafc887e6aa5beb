"""Building the PASCAL VOC 2012 + SBD manifest from a tiny copy of both trees."""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

import numpy as np
import pytest
from scipy.io import savemat

from pipeline.core.errors import InputError
from pipeline.core.io import write_image, write_mask
from pipeline.data.manifest import Item, default_palette, load_manifest
from pipeline.data.voc import VOC_CLASSES, build_voc12

CAT, CHAIR, DOG, PERSON = (VOC_CLASSES.index(name) for name in ("cat", "chair", "dog", "person"))
PALETTE = default_palette(len(VOC_CLASSES) + 1)


def annotation(*names: str) -> str:
    """A VOC XML annotation; a person carries body parts, whose names are not classes."""
    objects = "".join(
        f"<object><name>{name}</name>"
        + ("<part><name>head</name></part><part><name>hand</name></part>" if name == "person" else "")
        + "</object>"
        for name in names
    )
    return f"<annotation><filename>x.jpg</filename>{objects}</annotation>"


def label_mask(*values: int) -> np.ndarray:
    """A 4x6 mask: background, then one column block per value, and an ignored border row."""
    mask = np.zeros((4, 6), dtype=np.uint8)
    for column, value in enumerate(values, start=1):
        mask[:, column] = value
    mask[-1] = 255
    return mask


def add_image(voc: Path, image_id: str, xml: str | None = None, mask: np.ndarray | None = None) -> None:
    write_image(voc / "JPEGImages" / f"{image_id}.jpg", np.full((4, 6, 3), 90, dtype=np.uint8))
    if xml is not None:
        (voc / "Annotations" / f"{image_id}.xml").write_text(xml)
    if mask is not None:
        write_mask(voc / "SegmentationClass" / f"{image_id}.png", mask, PALETTE)


def write_list(path: Path, ids: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{image_id}\n" for image_id in ids))


def write_sbd_cls(sbd: Path, image_id: str, segmentation: np.ndarray) -> None:
    """An SBD ``cls/<id>.mat``: struct GTcls with the class mask in field Segmentation."""
    present = np.unique(segmentation[segmentation > 0])
    gtcls = {"Segmentation": segmentation, "CategoriesPresent": present}
    savemat(sbd / "cls" / f"{image_id}.mat", {"GTcls": gtcls})


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path]:
    """VOC2012 and SBD ``dataset/`` folders with a handful of images.

    VOC train a1 a2, val v1 v2; SBD train s1 v1 s2, SBD val s3 a1. a2 has no XML (labels from
    its VOC mask), s2 neither XML nor VOC mask (labels from its SBD .mat).
    """
    voc, sbd = tmp_path / "VOCdevkit" / "VOC2012", tmp_path / "SBD" / "dataset"
    for folder in (voc / "JPEGImages", voc / "Annotations", voc / "SegmentationClass", sbd / "cls"):
        folder.mkdir(parents=True)
    add_image(voc, "a1", annotation("cat", "person", "cat"), label_mask(CAT + 1))
    add_image(voc, "a2", mask=label_mask(CHAIR + 1, CAT + 1))
    add_image(voc, "v1", annotation("dog"), label_mask(DOG + 1))
    add_image(voc, "v2", annotation("bird"))
    add_image(voc, "s1", annotation("aeroplane"))
    add_image(voc, "s2")
    write_sbd_cls(sbd, "s2", label_mask(PERSON + 1)[:3])
    add_image(voc, "s3", annotation("car", "car"))
    write_list(voc / "ImageSets" / "Segmentation" / "train.txt", ["a1", "a2"])
    write_list(voc / "ImageSets" / "Segmentation" / "val.txt", ["v1", "v2"])
    write_list(sbd / "train.txt", ["s1", "v1", "s2"])
    write_list(sbd / "val.txt", ["s3", "a1"])
    return voc, sbd


def ids(items: tuple[Item, ...]) -> list[str]:
    return [item.id for item in items]


def test_splits_follow_the_train_aug_arithmetic(trees: tuple[Path, Path]) -> None:
    manifest = build_voc12(*trees)

    assert manifest.name == "voc12"
    assert ids(manifest.split("train")) == ["a1", "a2"]
    assert ids(manifest.split("val")) == ["v1", "v2"]
    # (SBD train + SBD val + VOC train) - VOC val: v1 dropped, a1 once, sorted
    assert ids(manifest.split("train_aug")) == ["a1", "a2", "s1", "s2", "s3"]


def test_without_sbd_train_aug_is_voc_train(trees: tuple[Path, Path]) -> None:
    manifest = build_voc12(trees[0])

    assert manifest.split("train_aug") == manifest.split("train")


def test_labels_come_from_xml_then_voc_mask_then_sbd_mat(trees: tuple[Path, Path]) -> None:
    manifest = build_voc12(*trees)
    labels = {item.id: item.labels for item in manifest.split("train_aug") + manifest.split("val")}

    assert labels["a1"] == (CAT, PERSON)  # the XML, though its mask shows only the cat
    assert labels["a2"] == (CAT, CHAIR)  # no XML: the VOC mask
    assert labels["s2"] == (PERSON,)  # neither: SBD's GTcls.Segmentation
    assert labels["s3"] == (VOC_CLASSES.index("car"),)
    assert labels["v2"] == (VOC_CLASSES.index("bird"),)


def test_has_mask_marks_images_with_a_voc_mask(trees: tuple[Path, Path]) -> None:
    manifest = build_voc12(*trees)
    with_mask = {item.id for split in manifest.splits.values() for item in split if item.has_mask}

    assert with_mask == {"a1", "a2", "v1"}
    assert manifest.read_mask(manifest.item("val", "v1"))[0, 1] == DOG + 1
    assert manifest.read_mask(manifest.item("val", "v2")) is None


def test_manifest_points_at_the_voc_folders(trees: tuple[Path, Path]) -> None:
    voc, _ = trees
    manifest = build_voc12(*trees)

    assert manifest.classes == VOC_CLASSES
    assert manifest.image_path("s3") == voc / "JPEGImages" / "s3.jpg"
    assert manifest.mask_path("a1") == voc / "SegmentationClass" / "a1.png"
    np.testing.assert_array_equal(manifest.palette, PALETTE)


def test_save_and_load_round_trip(trees: tuple[Path, Path], tmp_path: Path) -> None:
    manifest = build_voc12(*trees)
    path = tmp_path / "project" / "manifests" / "voc12.json"

    manifest.save(path)
    loaded = load_manifest(path)

    assert loaded.to_json(tmp_path) == manifest.to_json(tmp_path)
    assert loaded.read_image("s2").shape == (4, 6, 3)


def test_unknown_xml_class_names_the_file_and_the_name(trees: tuple[Path, Path]) -> None:
    voc, sbd = trees
    xml = voc / "Annotations" / "s1.xml"
    xml.write_text(annotation("dog", "unicorn"))

    with pytest.raises(InputError, match="'unicorn'") as error:
        build_voc12(voc, sbd)
    assert error.value.where == str(xml)


def test_malformed_xml_names_the_file(trees: tuple[Path, Path]) -> None:
    voc, sbd = trees
    xml = voc / "Annotations" / "v2.xml"
    xml.write_text("<annotation><object>")

    with pytest.raises(InputError, match="not valid XML") as error:
        build_voc12(voc, sbd)
    assert error.value.where == str(xml)


def test_missing_jpeg_names_the_image_path(trees: tuple[Path, Path]) -> None:
    voc, sbd = trees
    image = voc / "JPEGImages" / "s3.jpg"
    image.unlink()

    with pytest.raises(InputError, match="image not found") as error:
        build_voc12(voc, sbd)
    assert error.value.where == str(image)


def test_image_without_any_label_source_names_the_id(trees: tuple[Path, Path]) -> None:
    voc, sbd = trees
    (sbd / "cls" / "s2.mat").unlink()

    with pytest.raises(InputError, match="no image-level labels") as error:
        build_voc12(voc, sbd)
    assert error.value.where == "s2"


def test_sbd_image_needs_sbd_to_find_its_labels(trees: tuple[Path, Path]) -> None:
    voc, _ = trees
    write_list(voc / "ImageSets" / "Segmentation" / "train.txt", ["a1", "s2"])

    with pytest.raises(InputError, match="^s2: no image-level labels"):
        build_voc12(voc)


def test_missing_sbd_list_names_the_file(trees: tuple[Path, Path]) -> None:
    voc, sbd = trees
    (sbd / "val.txt").unlink()

    with pytest.raises(InputError, match="image list not found") as error:
        build_voc12(voc, sbd)
    assert error.value.where == str(sbd / "val.txt")


def test_devkit_folder_instead_of_voc2012_gets_a_hint(trees: tuple[Path, Path]) -> None:
    voc, sbd = trees

    with pytest.raises(InputError, match="point at its VOC2012 folder"):
        build_voc12(voc.parent, sbd)


def test_failed_build_leaves_the_saved_manifest_untouched(trees: tuple[Path, Path], tmp_path: Path) -> None:
    voc, sbd = trees
    path = tmp_path / "manifests" / "voc12.json"
    build_voc12(voc, sbd).save(path)
    before = path.read_bytes()
    (voc / "Annotations" / "a1.xml").write_text(annotation("unicorn"))

    with pytest.raises(InputError):
        build_voc12(voc, sbd).save(path)
    assert path.read_bytes() == before


def test_save_interrupted_midway_keeps_the_old_manifest(
    trees: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    voc, sbd = trees
    path = tmp_path / "manifests" / "voc12.json"
    build_voc12(voc).save(path)
    before = path.read_bytes()

    def dump_then_fail(data: object, handle: IO[str], **options: object) -> None:
        handle.write('{"format": 1, "name": "voc1')
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", dump_then_fail)
    with pytest.raises(OSError, match="disk full"):
        build_voc12(voc, sbd).save(path)

    assert path.read_bytes() == before
    assert sorted(path.parent.iterdir()) == [path]  # no temporary file left behind

"""Building a manifest from a folder of images and a CSV of image-level labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import InputError
from pipeline.core.io import write_image, write_mask
from pipeline.data.folder import build_folder
from pipeline.data.manifest import Manifest, default_palette, load_manifest


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Four 4x6 JPEGs, 0001.jpg .. 0004.jpg."""
    folder = tmp_path / "images"
    for index in range(1, 5):
        write_image(folder / f"{index:04d}.jpg", np.full((4, 6, 3), 40 * index, dtype=np.uint8))
    return folder


def write_csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return path


def labels_by_id(manifest: Manifest, split: str) -> dict[str, tuple[int, ...]]:
    return {item.id: item.labels for item in manifest.split(split)}


LABELS = "image,labels,split\n0001.jpg,cat dog,train\n0002,person;bicycle,val\n0003.jpg,dog|cat,\n0004,,val\n"


def test_separators_splits_and_inferred_classes(images: Path, tmp_path: Path) -> None:
    manifest = build_folder(images, write_csv(tmp_path, LABELS), name="pets")

    assert manifest.name == "pets"
    assert manifest.classes == ("bicycle", "cat", "dog", "person")  # sorted names of the CSV
    assert manifest.image_suffix == ".jpg"
    assert labels_by_id(manifest, "train") == {"0001": (1, 2), "0003": (1, 2)}  # empty split: train
    assert labels_by_id(manifest, "val") == {"0002": (0, 3), "0004": ()}  # empty labels: background
    assert manifest.image_path("0002") == images / "0002.jpg"
    assert manifest.mask_dir is None


def test_given_classes_set_the_class_indices(images: Path, tmp_path: Path) -> None:
    classes = ["person", "dog", "cat", "bicycle", "horse"]
    manifest = build_folder(images, write_csv(tmp_path, LABELS), classes=classes)

    assert manifest.classes == tuple(classes)
    assert labels_by_id(manifest, "train") == {"0001": (1, 2), "0003": (1, 2)}
    assert labels_by_id(manifest, "val") == {"0002": (0, 3), "0004": ()}


def test_a_quoted_cell_with_commas_is_split_on_them(images: Path, tmp_path: Path) -> None:
    manifest = build_folder(images, write_csv(tmp_path, 'image,labels\n0001,"bee,dog"\n0002,"cat, dog"\n'))

    assert manifest.classes == ("bee", "cat", "dog")
    assert labels_by_id(manifest, "train") == {"0001": (0, 2), "0002": (1, 2)}


def test_class_names_match_regardless_of_case(images: Path, tmp_path: Path) -> None:
    text = "image,labels\n0001,CAT\n0002,cat dog\n0003,Cat\n0004,cat\n"
    inferred = build_folder(images, write_csv(tmp_path, text))
    assert inferred.classes == ("cat", "dog")  # the spelling the CSV uses most
    assert labels_by_id(inferred, "train") == {"0001": (0,), "0002": (0, 1), "0003": (0,), "0004": (0,)}
    assert inferred.images_per_class() == {"cat": 4, "dog": 1}

    given = build_folder(images, write_csv(tmp_path, text), classes=["Dog", "Cat"])
    assert given.classes == ("Dog", "Cat")  # the class list's spelling
    assert labels_by_id(given, "train") == {"0001": (1,), "0002": (0, 1), "0003": (1,), "0004": (1,)}


def test_without_a_split_column_every_image_is_train(images: Path, tmp_path: Path) -> None:
    manifest = build_folder(images, write_csv(tmp_path, " image , labels \n0002.jpg,cat\n0001,dog\n"))

    assert list(manifest.splits) == ["train"]
    assert [item.id for item in manifest.split("train")] == ["0001", "0002"]


def test_mixed_suffixes_keep_whole_file_names_as_ids(images: Path, tmp_path: Path) -> None:
    write_image(images / "0005.png", np.zeros((4, 6, 3), dtype=np.uint8))
    masks = tmp_path / "masks"
    write_mask(masks / "0005.png.png", np.ones((4, 6), dtype=np.uint8), default_palette(2))
    manifest = build_folder(images, write_csv(tmp_path, "image,labels\n0001,cat\n0005,cat\n"), masks)

    assert manifest.image_suffix == ""
    assert [item.id for item in manifest.split("train")] == ["0001.jpg", "0005.png"]
    assert manifest.read_image("0005.png").shape == (4, 6, 3)
    assert [item.has_mask for item in manifest.split("train")] == [False, True]


def test_masks_where_present(images: Path, tmp_path: Path) -> None:
    masks = tmp_path / "masks"
    mask = np.zeros((4, 6), dtype=np.uint8)
    mask[1:3, 2:4] = 2
    mask[0] = 255
    write_mask(masks / "0001.png", mask, default_palette(5))
    manifest = build_folder(images, write_csv(tmp_path, LABELS), masks)

    assert [item.has_mask for item in manifest.split("train")] == [True, False]
    np.testing.assert_array_equal(manifest.read_mask(manifest.item("train", "0001")), mask)


def test_mask_with_values_beyond_the_classes_is_rejected(images: Path, tmp_path: Path) -> None:
    masks = tmp_path / "masks"
    write_mask(masks / "0002.png", np.full((4, 6), 7, dtype=np.uint8), default_palette(8))

    with pytest.raises(InputError, match=r"mask values \[7\] are outside 0..4") as error:
        build_folder(images, write_csv(tmp_path, LABELS), masks)
    assert error.value.where == str(masks / "0002.png")


def test_save_and_load_round_trip(images: Path, tmp_path: Path) -> None:
    masks = tmp_path / "masks"
    write_mask(masks / "0003.png", np.zeros((4, 6), dtype=np.uint8), default_palette(5))
    manifest = build_folder(images, write_csv(tmp_path, LABELS), masks)
    path = tmp_path / "manifests" / "custom.json"

    manifest.save(path)
    loaded = load_manifest(path)

    assert loaded.to_json(tmp_path) == manifest.to_json(tmp_path)
    assert loaded.read_mask(loaded.item("train", "0003")).shape == (4, 6)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("name,labels\n0001,cat\n", "missing column 'image' (the header names name, labels)"),
        ("", "missing column 'image' (the header names nothing)"),
        ("image,labels\n0001,cat\n0009.jpg,dog\n", "line 3: no image '0009.jpg' in "),
        ("image,labels\n0001,cat\n\n0001.jpg,dog\n", "line 4: image '0001.jpg' already listed on line 2"),
        ("image,labels,split\n0001,cat\n", "line 2: expected at least 3 columns, got 2"),
        ("image,labels\n ,cat\n", "line 2: empty 'image'"),
        ("image,labels\n", "lists no images"),
        ("image,labels\n0001,\n", "no class names in column 'labels'"),
    ],
)
def test_bad_csv_names_the_file_and_line(images: Path, tmp_path: Path, text: str, problem: str) -> None:
    labels_csv = write_csv(tmp_path, text)

    with pytest.raises(InputError) as error:
        build_folder(images, labels_csv)
    assert error.value.where == str(labels_csv)
    assert problem in error.value.problem


def test_unknown_class_when_classes_are_given(images: Path, tmp_path: Path) -> None:
    labels_csv = write_csv(tmp_path, LABELS)

    with pytest.raises(InputError, match="line 3: unknown class 'bicycle'") as error:
        build_folder(images, labels_csv, classes=["cat", "dog", "person"])
    assert error.value.where == str(labels_csv)


@pytest.mark.parametrize(
    ("classes", "problem"),
    [([], "empty"), (["cat", "cat"], "'cat' is listed twice"), (["cat", "Cat"], "'cat' is listed twice"),
     (["big cat"], "contains a space"), (["bee,dog"], "contains a space, ','")],
)
def test_bad_class_list(images: Path, tmp_path: Path, classes: list[str], problem: str) -> None:
    with pytest.raises(InputError, match=problem):
        build_folder(images, write_csv(tmp_path, LABELS), classes=classes)


def test_id_matching_two_files_is_ambiguous(images: Path, tmp_path: Path) -> None:
    write_image(images / "0001.png", np.zeros((4, 6, 3), dtype=np.uint8))

    with pytest.raises(InputError, match="line 2: '0001' matches 0001.jpg, 0001.png; name the file"):
        build_folder(images, write_csv(tmp_path, "image,labels\n0001,cat\n"))


def test_unreadable_csv(images: Path, tmp_path: Path) -> None:
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_bytes(b"image,labels\n0001,\xff\xfe\n")

    with pytest.raises(InputError, match="cannot read CSV"):
        build_folder(images, labels_csv)


def test_missing_files_and_folders(images: Path, tmp_path: Path) -> None:
    labels_csv = write_csv(tmp_path, LABELS)

    with pytest.raises(InputError, match="labels CSV not found"):
        build_folder(images, tmp_path / "nothing.csv")
    with pytest.raises(InputError, match="image folder not found"):
        build_folder(tmp_path / "nothing", labels_csv)
    with pytest.raises(InputError, match="mask folder not found"):
        build_folder(images, labels_csv, tmp_path / "nothing")


def test_failed_build_leaves_the_saved_manifest_untouched(images: Path, tmp_path: Path) -> None:
    path = tmp_path / "manifests" / "custom.json"
    build_folder(images, write_csv(tmp_path, LABELS)).save(path)
    before = path.read_bytes()
    (images / "0004.jpg").unlink()

    with pytest.raises(InputError, match="no image '0004'"):
        build_folder(images, write_csv(tmp_path, LABELS)).save(path)
    assert path.read_bytes() == before

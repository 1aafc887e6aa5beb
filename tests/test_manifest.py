import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import InputError
from pipeline.data.manifest import (
    check_images_exist,
    default_palette,
    labels_from_mask,
    load_manifest,
)


def test_voc_palette_first_colours():
    palette = default_palette(4)
    assert palette.tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]


def test_round_trip_keeps_everything(tiny_manifest, tmp_path):
    copy = tmp_path / "elsewhere" / "copy.json"
    tiny_manifest.save(copy)
    again = load_manifest(copy)
    assert again.classes == tiny_manifest.classes
    assert again.splits == tiny_manifest.splits
    assert again.image_path("im0") == tiny_manifest.image_path("im0")
    assert np.array_equal(again.palette, tiny_manifest.palette)


def test_paths_are_stored_relative_to_the_manifest(tiny_manifest):
    data = json.loads(tiny_manifest.source.read_text())
    assert data["images"]["dir"] == "../images"
    assert data["masks"]["dir"] == "../masks"


def test_reading_images_masks_and_labels(tiny_manifest):
    item = tiny_manifest.item("train", "im1")
    image, mask = tiny_manifest.read_image(item.id), tiny_manifest.read_mask(item)
    assert image.shape == (20, 24, 3) and image.dtype == np.uint8
    assert labels_from_mask(mask, tiny_manifest.num_classes) == item.labels == (1,)
    assert tiny_manifest.label_vector(item).tolist() == [0.0, 1.0, 0.0]
    assert tiny_manifest.label_names == ("background", "red", "green", "yellow")


def test_missing_image_is_named(tiny_manifest):
    tiny_manifest.image_path("im2").unlink()
    with pytest.raises(InputError, match=r"im2\.png: image of id 'im2' in split 'train' not found"):
        check_images_exist(tiny_manifest)
    with pytest.raises(InputError, match=r"im2\.png: file not found"):
        tiny_manifest.read_image("im2")


def test_unknown_split_id_and_class(tiny_manifest):
    with pytest.raises(InputError, match="no split 'test'"):
        tiny_manifest.split("test")
    with pytest.raises(InputError, match="no image id 'nope'"):
        tiny_manifest.item("val", "nope")
    with pytest.raises(InputError, match=r"labels\.csv: unknown class 'blue'"):
        tiny_manifest.class_index("blue", "labels.csv")


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data))
    return path


GOOD = {"format": 1, "name": "x", "classes": ["a", "b"], "images": {"dir": ".", "suffix": ".jpg"},
        "splits": {"train": [{"id": "1", "labels": [0]}]}}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format": 7}, "unsupported manifest format 7"),
        ({"classes": []}, "'classes' must be a non-empty list"),
        ({"classes": ["a", "a"]}, "duplicate names"),
        ({"splits": {"train": [{"id": "1", "labels": [2]}]}}, "labels must be class indices in 0..1"),
        ({"splits": {"train": [{"id": "1"}, {"id": "1"}]}}, "duplicate image id '1'"),
        ({"palette": [[0, 0, 0]]}, "'palette' must be 3 RGB triples"),
    ],
)
def test_malformed_manifest_is_one_clear_error(tmp_path, change, message):
    path = _write(tmp_path, {**GOOD, **change})
    with pytest.raises(InputError, match=message) as error:
        load_manifest(path)
    assert str(error.value).startswith(str(path))


def test_not_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_manifest(bad)
    with pytest.raises(InputError, match="manifest not found"):
        load_manifest(tmp_path / "none.json")


def test_failed_save_keeps_the_old_manifest(tiny_manifest, monkeypatch):
    before = tiny_manifest.source.read_text()

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(json, "dump", explode)
    with pytest.raises(RuntimeError):
        tiny_manifest.save(tiny_manifest.source)
    assert tiny_manifest.source.read_text() == before
    assert [p.name for p in tiny_manifest.source.parent.iterdir()] == ["tiny.json"]

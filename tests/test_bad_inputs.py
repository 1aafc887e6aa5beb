"""Bad input, case by case: one line naming the file (or item) and what is wrong, or with
``--skip-bad`` a rejects file and a run on the good items; nothing already written is lost."""

from __future__ import annotations

import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from click.testing import CliRunner
from PIL import ExifTags, Image
from torch.utils.data import DataLoader

from pipeline.cli import main as rrm
from pipeline.core.errors import InputError
from pipeline.core.io import read_image, read_mask, write_image, write_mask
from pipeline.core.params import load_params
from pipeline.core.provenance import write_record
from pipeline.core.registry import CLASSIFIER_WEIGHTS as WEIGHTS
from pipeline.core.run import RunParams
from pipeline.core.stage import DatasetParams, run, screened_dataset
from pipeline.core.store import ImageStore
from pipeline.data.datasets import ImageDataset
from pipeline.data.folder import build_folder
from pipeline.data.manifest import Manifest, default_palette, load_manifest
from pipeline.data.screen import Reject, screen_splits
from pipeline.method.cams import CamParams, extract_cams
from pipeline.method.crf_runner import local_cluster
from pipeline.method.prune import PruneParams
from pipeline.models.backbones import build_backbone
from pipeline.models.weights import load_checkpoint, save_checkpoint
from pipeline.train.classifier import CAMNet, ClassifierParams, build_classifier, classifier_made_from
from tests.conftest import write_tiny_project


def one_line(error: pytest.ExceptionInfo[InputError]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def truncate(path: Path) -> None:
    """Cut a file to half its bytes, as an interrupted copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def zero_width_png(path: Path) -> None:
    """A PNG whose header says 0 x 10 pixels (PIL refuses to write one)."""
    header_only_png(path, 0, 10)


def header_only_png(path: Path, width: int, height: int) -> None:
    """A PNG whose header says ``width`` x ``height`` pixels, with no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)


# Images: every way a file can fail the strict reader.


@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda p: (write_image(p, np.zeros((32, 32, 3), np.uint8)), truncate(p)), "truncated or corrupt"),
        (lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
        (zero_width_png, "unknown format or broken header"),
        (lambda p: p.write_text("not an image"), "unknown format or broken header"),
        (lambda p: Image.new("L", (4, 3)).save(p, format="PNG"), "got an 8-bit greyscale image (mode 'L')"),
        (lambda p: Image.new("RGBA", (4, 3)).save(p, format="PNG"), "got an RGB-with-alpha image (mode 'RGBA')"),
        (lambda p: Image.new("I;16", (4, 3)).save(p, format="PNG"), "got a 16-bit greyscale image (mode 'I;16')"),
        (lambda p: Image.new("I", (4, 3)).save(p, format="TIFF"), "got a 32-bit integer image (mode 'I')"),
        (lambda p: Image.new("P", (4, 3)).save(p, format="PNG"), "got a palette image (mode 'P')"),
        (lambda p: header_only_png(p, 8000, 8000),
         "image of 8000x8000 pixels is over the budget of 40 megapixels; scale it down"),
    ],
    ids=["truncated-jpeg", "empty", "zero-width", "text", "greyscale", "rgba", "16-bit", "32-bit", "palette",
         "over-budget"],
)
def test_a_bad_image_is_one_line_naming_the_file(tmp_path, make, problem):
    path = tmp_path / "x.jpg"
    make(path)
    with pytest.raises(InputError) as error:
        read_image(path)
    assert one_line(error).startswith(f"{path}: ") and problem in str(error.value)


def test_a_phone_photo_is_read_turned_as_viewers_show_it(tmp_path):
    from pipeline.method.cams import image_size

    stored = np.zeros((4, 6, 3), np.uint8)
    stored[0, 0] = 255  # top-left as stored
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # shown turned a quarter clockwise
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=100)

    shown = read_image(tmp_path / "phone.jpg")
    assert shown.shape == (6, 4, 3) and image_size(tmp_path / "phone.jpg") == (6, 4)
    assert shown[0, -1].min() > 200  # the stored top-left corner is now top-right


def test_a_palette_png_is_a_mask_but_not_an_image(tmp_path):
    write_mask(tmp_path / "m.png", np.array([[0, 1, 255]], np.uint8), default_palette(3))
    assert read_mask(tmp_path / "m.png", num_classes=2).tolist() == [[0, 1, 255]]
    Image.new("RGB", (3, 1)).save(tmp_path / "rgb.png")
    with pytest.raises(InputError, match=r"rgb\.png: expected a palette or greyscale label mask, got an image"):
        read_mask(tmp_path / "rgb.png", num_classes=2)


def test_mask_values_outside_the_classes_are_listed_briefly(tmp_path):
    mask = np.arange(200, dtype=np.uint8).reshape(10, 20)  # 196 values beyond class 3
    Image.fromarray(mask, mode="L").save(tmp_path / "m.png")
    with pytest.raises(InputError) as error:
        read_mask(tmp_path / "m.png", num_classes=3)
    expected = "mask values [4, 5, 6, 7, 8, 9, 10, 11, ...] (196 values) are outside 0..3 and 255"
    assert one_line(error) == f"{tmp_path / 'm.png'}: {expected}"


# Manifests: repeated ids and keys, an image in both the training and the validation split.


def manifest_text(splits: str) -> str:
    """A manifest file's text with the given ``splits`` object body, written by hand to repeat keys."""
    return '{"format": 1, "name": "m", "classes": ["cat"], "images": {"dir": "."}, "splits": {' + splits + "}}"


@pytest.mark.parametrize(
    "splits, problem",
    [
        ('"train": [{"id": "a"}, {"id": "a"}]', "split 'train': duplicate image id 'a'"),
        ('"train": [{"id": "a"}], "train": [{"id": "b"}]', "key 'train' appears twice in one object"),
        ('"train": [{"id": "a", "labels": [0], "labels": []}]', "key 'labels' appears twice in one object"),
    ],
)
def test_a_manifest_with_duplicates_is_refused(tmp_path, splits, problem):
    (tmp_path / "m.json").write_text(manifest_text(splits))
    with pytest.raises(InputError) as error:
        load_manifest(tmp_path / "m.json")
    assert one_line(error) == f"{tmp_path / 'm.json'}: {problem}"


def write_params(folder: Path, manifest: Path, **dataset: object) -> Path:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump({"dataset": {"manifest": str(manifest), **dataset}}))
    return path


def test_an_image_in_both_the_training_and_the_validation_split_is_refused(tmp_path):
    (tmp_path / "m.json").write_text(manifest_text('"train": [{"id": "a"}, {"id": "b"}], "val": [{"id": "b"}]'))
    with pytest.raises(InputError) as error:
        screened_dataset(write_params(tmp_path, tmp_path / "m.json"), "cams")
    assert one_line(error) == f"{tmp_path / 'm.json'}: image id 'b' is in both split 'train' and 'val'"


def test_a_label_csv_that_lists_an_image_twice_is_refused(tmp_path):
    write_image(tmp_path / "images" / "a.jpg", np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "labels.csv").write_text("image,labels\na.jpg,cat\na,dog\n")
    with pytest.raises(InputError) as error:
        build_folder(tmp_path / "images", tmp_path / "labels.csv")
    assert one_line(error) == f"{tmp_path / 'labels.csv'}: line 3: image 'a.jpg' already listed on line 2"


# Parameters: wrong types and values out of range name the file, the section and the key.


@pytest.mark.parametrize(
    "section, values, problem",
    [
        ("classifier", {"steps": "abc"}, "[classifier]: parameter steps: expected int, got 'abc'"),
        ("classifier", {"lr": [0.1, 0.2]}, "[classifier]: parameter lr: expected float, got [0.1, 0.2]"),
        ("classifier", {"lr": float("nan")}, "[classifier]: parameter lr=nan is outside [0, inf]"),
        ("classifier", {"scale_range": 0.5}, "[classifier]: parameter scale_range: expected a list, got 0.5"),
        ("prune", {"cam_quantile": 1.5}, "[prune]: parameter cam_quantile=1.5 is outside [0, 1]"),
        ("dataset", {"skip_bad": "yes"}, "[dataset]: parameter skip_bad: expected bool, got 'yes'"),
    ],
)
def test_a_bad_parameter_names_the_file_section_and_key(tmp_path, section, values, problem):
    kinds = {"classifier": ClassifierParams, "prune": PruneParams, "dataset": DatasetParams}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({section: values}))
    with pytest.raises(InputError) as error:
        load_params(kinds[section], section, tmp_path / "params.yaml")
    assert one_line(error) == f"{tmp_path / 'params.yaml'} {problem}"


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "empty parameters file (a stage would run on defaults alone)"),
        ("# only a comment\n", "empty parameters file (a stage would run on defaults alone)"),
        ("cam:\n  flip: false\n", "unknown section 'cam' (known: dataset, storage, run, data, classifier, "),
        ("prune:\n  la_alpha: 4\n  la_alpha: 8\n", "key 'la_alpha' appears twice (line 3)"),
        ("prune: {}\nprune: {}\n", "key 'prune' appears twice (line 2)"),
        ("- classifier\n", "must be a mapping of stage names to parameters"),
    ],
    ids=["empty", "comment-only", "misspelled-section", "duplicate-key", "duplicate-section", "a-list"],
)
def test_a_params_file_that_would_run_on_defaults_unnoticed_is_refused(tmp_path, text, problem):
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(InputError) as error:
        load_params(PruneParams, "prune", tmp_path / "params.yaml")
    assert one_line(error).startswith(f"{tmp_path / 'params.yaml'}: {problem}")


# Weights: a torchvision ResNet-50 state dict is not the small backbone's.


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory) -> Path:
    """torchvision's ResNet-50 names, each with a one-element tensor (the names are what differ)."""
    path = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    torch.save({key: torch.zeros(1) for key in torchvision.models.resnet50().state_dict()}, path)
    return path


def test_weights_of_another_architecture_are_counted_and_named_on_one_line(resnet50_file):
    with pytest.raises(InputError) as error:
        build_backbone("small", resnet50_file)
    message = one_line(error)
    assert message.startswith(f"{resnet50_file}: weights do not fit the small backbone: ")
    assert "55 missing (layers.0.0.weight, " in message and "320 unexpected (conv1.weight, bn1.weight, " in message

    with pytest.raises(InputError) as error:
        load_checkpoint(CAMNet(build_backbone("small"), 3, freeze_bn=False), resnet50_file)
    message = one_line(error)
    assert "CAMNet with a SmallNet backbone" in message and "unexpected (backbone.conv1.weight" in message


# Reading in DataLoader workers, and what a failed run leaves behind.


@pytest.fixture
def bad_manifest(tiny_manifest: Manifest) -> Manifest:
    """The tiny dataset with a truncated image (train im1) and a mask with value 9 (val im5)."""
    truncate(tiny_manifest.image_path("im1"))
    write_mask(tiny_manifest.mask_path("im5"), np.full((20, 24), 9, np.uint8), default_palette(10))
    return tiny_manifest


def test_an_error_in_a_dataloader_worker_is_still_one_line(bad_manifest):
    loader = DataLoader(ImageDataset(bad_manifest, "train"), batch_size=1, num_workers=1)
    with pytest.raises(InputError) as error:
        list(loader)
    assert one_line(error).startswith(f"{bad_manifest.image_path('im1')}: cannot read image, truncated or corrupt")


class MeanColourCams(torch.nn.Module):
    """A CAM network without weights: the class maps are the mean of the colour channels."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(1, keepdim=True).relu().repeat(1, 3, 1, 1)


def test_a_stage_stopped_by_a_bad_image_keeps_what_it_wrote(bad_manifest, tmp_path):
    store = ImageStore(tmp_path / "cams.zarr")
    params, one_by_one = CamParams(scales=(1.0,), flip=False), RunParams(loader_workers=0, inference_batch=1)
    with pytest.raises(InputError, match="im1.png: cannot read image"):
        extract_cams(MeanColourCams(), bad_manifest, "train", store, params, torch.device("cpu"), run=one_by_one,
                     progress=False)
    written = store.complete_ids()
    assert written and "im1" not in written

    write_image(bad_manifest.image_path("im1"), np.full((20, 24, 3), 90, np.uint8))  # the user fixes the file
    again = extract_cams(MeanColourCams(), bad_manifest, "train", store, params, torch.device("cpu"), run=one_by_one,
                         progress=False)
    assert "im1" in again and not set(again) & set(written)


# Screening: --skip-bad leaves the bad items out and lists them.


def test_screening_lists_the_bad_items_and_keeps_the_good_ones(bad_manifest, tmp_path):
    screened, rejects = screen_splits(bad_manifest, ["train", "val"], tmp_path / "rejects.json")
    assert [item.id for item in screened.split("train")] == ["im0", "im2", "im3"]
    assert [item.id for item in screened.split("val")] == ["im4"]
    assert [(reject.id, Path(reject.file).name) for reject in rejects] == [("im1", "im1.png"), ("im5", "im5.png")]
    assert "outside 0..3 and 255" in rejects[1].problem
    assert json.loads((tmp_path / "rejects.json").read_text()) == [
        {"id": r.id, "file": r.file, "problem": r.problem} for r in rejects
    ]


def test_screening_without_skipping_stops_at_the_first_bad_item(bad_manifest):
    with pytest.raises(InputError) as error:
        screen_splits(bad_manifest, ["train", "val"], None)
    assert one_line(error).startswith(f"{bad_manifest.image_path('im1')}: cannot read image")
    assert str(error.value).endswith("(--skip-bad leaves bad images out; 1 more bad)")


def test_a_split_with_no_good_image_left_is_an_error(bad_manifest, tmp_path):
    for item in bad_manifest.split("val"):
        bad_manifest.image_path(item.id).write_bytes(b"")
    with pytest.raises(InputError, match=r"rejects\.json: every image of split 'val' is bad"):
        screen_splits(bad_manifest, ["val"], tmp_path / "rejects.json")


def test_every_stage_leaves_out_the_same_images(bad_manifest, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = write_params(tmp_path, bad_manifest.source, skip_bad=True)
    cams_manifest, _, cams_rejected = screened_dataset(params, "cams")
    segment_manifest, _, segment_rejected = screened_dataset(params, "segment")
    assert cams_rejected == segment_rejected == 2
    assert cams_manifest.splits == segment_manifest.splits
    assert Path("rejects/cams.json").read_text() == Path("rejects/segment.json").read_text()


def test_the_flag_overrides_the_parameter_and_without_either_nothing_is_screened(bad_manifest, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = write_params(tmp_path, bad_manifest.source, skip_bad=True)
    manifest, dataset, rejected = screened_dataset(params, "prune", skip_bad=False)
    assert not dataset.skip_bad and rejected == 0 and len(manifest.split("train")) == 4
    assert not Path("rejects/prune.json").exists()
    write_params(tmp_path, bad_manifest.source)
    assert screened_dataset(params, "prune", skip_bad=True)[2] == 2
    assert len(json.loads(Path("rejects/prune.json").read_text())) == 2


def test_a_stage_entry_point_takes_skip_bad_as_a_flag(monkeypatch):
    calls = []

    def main(params_path: Path, scheduler: str | None = None, skip_bad: bool | None = None) -> None:
        calls.append({"params": params_path, "scheduler": scheduler, "skip_bad": skip_bad})

    for argv in (["crf"], ["crf", "p.yaml", "--skip-bad", "--scheduler", "tcp://x:1"]):
        monkeypatch.setattr(sys, "argv", argv)
        run("crf", main)
    assert calls == [
        {"params": Path("params.yaml"), "scheduler": None, "skip_bad": None},
        {"params": Path("p.yaml"), "scheduler": "tcp://x:1", "skip_bad": True},
    ]


def test_rrm_stage_passes_skip_bad_only_to_stages_that_read_images(monkeypatch):
    from stages import cams

    calls = []

    def main(params_path: Path, skip_bad: bool | None = None) -> None:  # the stage's signature
        calls.append({} if skip_bad is None else {"skip_bad": skip_bad})

    monkeypatch.setattr(cams, "main", main)
    assert CliRunner().invoke(rrm, ["stage", "cams", "--skip-bad"]).exit_code == 0
    assert CliRunner().invoke(rrm, ["stage", "cams"]).exit_code == 0
    assert calls == [{"skip_bad": True}, {}]
    result = CliRunner().invoke(rrm, ["stage", "data", "--skip-bad"])
    assert result.exit_code == 2 and "--skip-bad is for the stages that read the dataset's images" in result.output


@pytest.mark.parametrize(
    "raised, line, status",
    [
        (PermissionError(13, "Permission denied", "artifacts/cams.zarr/zarr.json"),
         "error: artifacts/cams.zarr/zarr.json: permission denied", 2),
        (KeyboardInterrupt(), "interrupted: what was finished is kept, and a rerun resumes from it", 130),
    ],
    ids=["read-only-store", "ctrl-c"],
)
def test_a_refused_permission_and_ctrl_c_end_a_command_in_one_line(monkeypatch, raised, line, status):
    from stages import cams

    def fail(params_path, **options):
        raise raised

    monkeypatch.setattr(cams, "main", fail)
    result = CliRunner().invoke(rrm, ["stage", "cams"])
    assert result.exit_code == status and result.output == line + "\n"


def test_an_unreachable_scheduler_is_one_line_after_the_timeout(monkeypatch):
    from pipeline.method import crf_runner

    monkeypatch.setattr(crf_runner, "SCHEDULER_TIMEOUT", 1)
    with pytest.raises(InputError) as error, crf_runner.scheduler_client("tcp://127.0.0.1:1"):
        pass
    assert one_line(error) == "tcp://127.0.0.1:1: no dask scheduler answered within 1 s (OSError)"


def test_rrm_manifest_folder_with_a_bad_image(tmp_path):
    images = tmp_path / "images"
    for name in ("a", "b", "c"):
        write_image(images / f"{name}.jpg", np.full((8, 8, 3), 100, np.uint8))
    truncate(images / "b.jpg")
    out = tmp_path / "manifests" / "pets.json"
    labels = tmp_path / "labels.csv"
    labels.write_text("image,labels\na,cat\nb,cat\nc,dog\n")
    command = ["manifest", "folder", "--images", str(images), "--labels", str(labels), "--out", str(out)]

    refused = CliRunner().invoke(rrm, command)
    assert refused.exit_code == 2 and refused.output.count("\n") == 1
    assert refused.output.startswith(f"error: {images / 'b.jpg'}: cannot read image, truncated or corrupt")
    assert not out.exists()

    skipped = CliRunner().invoke(rrm, [*command, "--skip-bad"])
    assert skipped.exit_code == 0, skipped.output
    assert [item.id for item in load_manifest(out).split("train")] == ["a", "c"]
    rejects = json.loads((tmp_path / "manifests" / "pets.rejects.json").read_text())
    assert [Reject(**reject).id for reject in rejects] == ["b"]
    assert "left out 1 bad image(s)" in skipped.output
    assert "images per class: cat 1, dog 1" in skipped.output  # a surprise in the classes shows at once


def test_rrm_manifest_folder_with_a_mask_of_another_size(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    for name in ("a", "b"):
        write_image(images / f"{name}.jpg", np.full((8, 10, 3), 100, np.uint8))
    write_mask(masks / "a.png", np.zeros((8, 10), np.uint8), default_palette(2))
    write_mask(masks / "b.png", np.zeros((10, 8), np.uint8), default_palette(2))  # drawn on the turned photo
    labels = tmp_path / "labels.csv"
    labels.write_text("image,labels\na,cat\nb,cat\n")
    command = ["manifest", "folder", "--images", str(images), "--labels", str(labels), "--masks", str(masks),
               "--out", str(tmp_path / "m.json")]

    refused = CliRunner().invoke(rrm, command)
    assert refused.exit_code == 2
    assert refused.output.startswith(f"error: {masks / 'b.png'}: mask of 8x10 pixels, its image 10x8")
    skipped = CliRunner().invoke(rrm, [*command, "--skip-bad"])
    assert skipped.exit_code == 0 and "left out 1 bad image(s)" in skipped.output


# The stages after one another: an image the CAM stage left out is left out by every later stage.

def test_cams_crf_prune_and_segment_leave_out_the_same_bad_image(tmp_path, monkeypatch):

    from stages import cams, crf, data, prune, segment

    monkeypatch.chdir(tmp_path)
    params = write_tiny_project(Path("."), dataset={"skip_bad": True},
                                data={"image_size": 32, "train_images": 6, "val_images": 3, "seed": 2},
                                cams={"scales": [1.0], "flip": False},
                                segment={"crop_size": 32, "batch_size": 2, "steps": 1, "crf": False})
    data.main(params)
    manifest = load_manifest("manifests/synth.json")
    bad = manifest.split("train")[2].id
    truncate(manifest.image_path(bad))
    classifier = load_params(ClassifierParams, "classifier", params)
    save_checkpoint(build_classifier(classifier, manifest.num_classes), WEIGHTS)
    write_record(WEIGHTS, classifier_made_from(manifest, "train", classifier))

    cams.main(params)
    with local_cluster(1, processes=False) as cluster:
        crf.main(params, scheduler=cluster.scheduler_address)
    prune.main(params)
    segment.main(params)

    for stage in ("cams", "crf", "prune", "segment"):
        assert [reject["id"] for reject in json.loads(Path(f"rejects/{stage}.json").read_text())] == [bad]
        assert json.loads(Path(f"scores/{stage}.json").read_text())["rejected"] == 1
    for store, count in (("cams", 8), ("crf", 5), ("crfmaps", 5), ("masks", 5), ("pseudo", 5), ("segment", 3)):
        ids = ImageStore(f"artifacts/{store}.zarr").complete_ids()
        assert len(ids) == count and bad not in ids

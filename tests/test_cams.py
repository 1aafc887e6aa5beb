from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from torch import nn

from pipeline.core.errors import InputError
from pipeline.core.io import IGNORE, write_image, write_mask
from pipeline.core.params import build_params
from pipeline.core.run import RunParams
from pipeline.core.store import COMPLETE, ImageStore
from pipeline.data.datasets import normalize
from pipeline.data.manifest import Item, Manifest, default_palette
from pipeline.method.cams import (
    CamParams,
    coarse_scales_warning,
    extract_cams,
    image_size,
    multiscale_cams,
    padded_channels,
    sampled_sizes,
    score_cams,
    select_and_normalise,
    size_grouped_batches,
)
from pipeline.method.metrics import SegmentationScore

NUM_CLASSES = 3
SIZES = [(20, 24), (16, 30), (20, 24), (17, 19), (16, 30), (20, 24), (25, 25)]
"""Image (height, width)s: some shared, some seen once."""
LABELS = [(0,), (1, 2), (2,), (0, 1), (), (1,), (0, 2)]
PARAMS = CamParams(scales=(1.0, 0.5, 1.5))
RUN = RunParams(loader_workers=0, inference_batch=2)


class TinyCamNet(nn.Module):
    """A stride-4 CAM head: two strided convolutions, a bias-free 1x1 conv to the classes, ReLU."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()
        )
        self.classifier = nn.Conv2d(16, NUM_CLASSES, 1, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.relu(self.classifier(self.features(images)))


class CountingCamFn:
    """Wraps a network and records the batch size of every forward pass."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net.eval()
        self.batches: list[int] = []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.batches.append(images.shape[0])
        return self.net(images)


def reference_cams(net: nn.Module, image: torch.Tensor, scales, flip: bool) -> torch.Tensor:
    """The PSA/IRN/RRM loop: one image, each scale, the flipped copy in its own forward pass."""
    height, width = image.shape[-2:]
    total = torch.zeros(())
    for scale in scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        scaled = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)
        maps = net(scaled)
        if flip:
            maps = maps + net(scaled.flip(-1)).flip(-1)
        total = total + F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)
    return total[0]


@pytest.fixture
def manifest(tmp_path: Path) -> Manifest:
    """Seven random images of the sizes and labels above, without masks."""
    rng = np.random.default_rng(0)
    items = []
    for index, ((height, width), labels) in enumerate(zip(SIZES, LABELS, strict=True)):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        write_image(tmp_path / "images" / f"im{index}.png", image)
        items.append(Item(f"im{index}", labels))
    return Manifest("sizes", ("a", "b", "c"), tmp_path / "images", ".png", {"train": tuple(items)})


def expected_cams(manifest: Manifest, item: Item, net: nn.Module) -> np.ndarray:
    image = torch.from_numpy(normalize(manifest.read_image(item.id)))
    with torch.inference_mode():
        return select_and_normalise(reference_cams(net, image, PARAMS.scales, PARAMS.flip), item.labels).numpy()


def test_default_params_and_range_checks():
    params = build_params(CamParams, {"scales": [1, 0.5]}, "params.yaml [cams]")
    assert params.scales == (1.0, 0.5) and params.flip and params.score_thresholds[:2] == (0.05, 0.1)
    assert CamParams().scales == (1.0, 0.5, 1.5, 2.0)
    with pytest.raises(InputError, match=r"params.yaml \[cams\]: parameter scales=\(0.0,\) must be"):
        build_params(CamParams, {"scales": [0]}, "params.yaml [cams]")
    with pytest.raises(InputError, match=r"unknown parameter 'batch_size'"):  # a run setting: `run: inference_batch`
        build_params(CamParams, {"batch_size": 0}, "params.yaml [cams]")
    with pytest.raises(InputError, match="score_thresholds=1.5 is outside"):
        build_params(CamParams, {"score_thresholds": [0.5, 1.5]}, "params.yaml [cams]")


def test_size_grouped_batches_keep_one_size_per_batch_in_first_seen_order():
    sizes = dict(enumerate(SIZES))
    assert size_grouped_batches(sizes, batch_size=2) == [[0, 2], [5], [1, 4], [3], [6]]
    assert size_grouped_batches({4: (9, 9), 7: (9, 9)}, batch_size=8) == [[4, 7]]


def test_a_pixel_budget_caps_batches_of_large_images():
    sizes = {0: (10, 10), 1: (10, 10), 2: (10, 10), 3: (50, 50), 4: (50, 50)}
    assert size_grouped_batches(sizes, batch_size=8, batch_pixels=250) == [[0, 1], [2], [3], [4]]


def test_scales_whose_cams_are_too_coarse_for_the_images_are_named():
    synthetic = [(96, 96)] * 5
    warning = coarse_scales_warning("cams.scales", synthetic, (1.0, 0.5, 1.5, 2.0), output_stride=8)
    assert warning.startswith("cams.scales: at 0.5 the median image (96 pixels on its shorter side, output stride 8)"
                              " gives CAMs 6 cells across, under 12")
    assert coarse_scales_warning("cams.scales", synthetic, (1.0, 1.5, 2.0), output_stride=8) is None
    photos = [(240, 320), (320, 240), (213, 320)]
    assert "at 0.75 and 0.5 " in coarse_scales_warning("cams.scales", photos, (1.0, 0.75, 0.5), output_stride=16)
    assert coarse_scales_warning("cams.scales", photos, (1.0, 1.5), output_stride=16) is None
    assert coarse_scales_warning("segment.mining_scales", [], (0.5,), output_stride=8) is None


def test_a_size_sample_spreads_evenly_over_the_split(manifest):
    every = [image_size(manifest.image_path(item.id)) for item in manifest.split("train")]
    assert sampled_sizes(manifest, "train") == every
    assert sampled_sizes(manifest, "train", count=3) == every[::3]  # 7 images: the 1st, 4th and 7th
    assert sampled_sizes(manifest, "train", count=1) == every[:1]


def test_image_size_comes_from_the_header(manifest, tmp_path):
    assert image_size(manifest.image_path("im1")) == (16, 30)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="junk.png: cannot read image"):
        image_size(tmp_path / "junk.png")


def test_select_and_normalise_divides_each_class_by_its_own_maximum():
    cams = torch.zeros(4, 2, 3)
    cams[1, 0, 0], cams[1, 1, 2] = 2.0, 1.0
    cams[3, 0, 1] = 0.5
    result = select_and_normalise(cams, [1, 2, 3])
    assert result.dtype == torch.float32 and result.shape == (3, 2, 3)
    assert result[0].tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.5]]
    assert not result[1].any() and not result.isnan().any()
    assert result[2].max() == 1.0
    assert select_and_normalise(cams, []).shape == (0, 2, 3)


@pytest.mark.parametrize("flip", [True, False])
def test_a_batch_gives_the_per_image_results(flip):
    net = TinyCamNet().eval()
    images = torch.randn(3, 3, 18, 22, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        batched = multiscale_cams(net, images, (1.0, 0.5, 2.0), flip)
        single = torch.stack([reference_cams(net, image, (1.0, 0.5, 2.0), flip) for image in images])
    assert batched.shape == (3, NUM_CLASSES, 18, 22) and batched.dtype == torch.float32
    assert (batched - single).abs().max() < 1e-3 * single.abs().max()
    assert single.abs().max() > 0


def test_chosen_channels_are_taken_before_upsampling_with_the_same_values():
    net = TinyCamNet().eval()
    images = torch.randn(3, 3, 18, 22, generator=torch.Generator().manual_seed(1))
    channels = padded_channels([[2], [0, 1], []], torch.device("cpu"))
    assert channels.tolist() == [[2, 0], [0, 1], [0, 0]]
    with torch.inference_mode():
        every = multiscale_cams(net, images, (1.0, 0.5), flip=True)
        chosen = multiscale_cams(net, images, (1.0, 0.5), flip=True, channels=channels)
    assert chosen.shape == (3, 2, 18, 22)
    for image, rows in enumerate(channels.tolist()):
        torch.testing.assert_close(chosen[image], every[image, rows])
    assert padded_channels([[], []], torch.device("cpu")).tolist() == [[0], [0]]


def test_extraction_matches_a_plain_per_image_loop(manifest, tmp_path):
    net = CountingCamFn(TinyCamNet())
    store = ImageStore(tmp_path / "cams.zarr", stage="cams")
    written = extract_cams(net, manifest, "train", store, PARAMS, torch.device("cpu"), run=RUN, progress=False)

    items = manifest.split("train")
    assert sorted(written) == store.complete_ids() == sorted(item.id for item in items)
    # The batches [[0, 2], [5], [1, 4], [3], [6]] of the batching test, once per scale, each
    # image with its flipped copy in the same pass.
    assert net.batches == [size for size in (4, 2, 4, 2, 2) for _ in PARAMS.scales]
    for item, (height, width) in zip(items, SIZES, strict=True):
        cams, attrs = store.read(item.id)
        assert cams.dtype == np.float16 and cams.shape == (len(item.labels), height, width)
        assert attrs == {"classes": list(item.labels)}
        np.testing.assert_allclose(cams, expected_cams(manifest, item, net.net), rtol=0, atol=1e-3)


class FailingStore(ImageStore):
    """A store whose write of one image fails, as a full disk would."""

    def write(self, image_id: str, array: np.ndarray, **attrs) -> None:
        if image_id == "im4":
            raise OSError(28, "No space left on device")
        super().write(image_id, array, **attrs)


def test_a_failed_write_stops_the_extraction_and_keeps_what_was_written(manifest, tmp_path):
    store = FailingStore(tmp_path / "cams.zarr")
    with pytest.raises(OSError, match="No space left on device"):
        extract_cams(TinyCamNet().eval(), manifest, "train", store, PARAMS, torch.device("cpu"), run=RUN,
                     progress=False)
    # Batches [[0, 2], [5], [1, 4], ...]: the writes up to im4's batch went through.
    assert {"im0", "im2", "im5"} <= set(store.complete_ids()) and "im4" not in store.complete_ids()
    rerun = extract_cams(TinyCamNet().eval(), manifest, "train", ImageStore(store.path), PARAMS,
                         torch.device("cpu"), run=RUN, progress=False)
    assert "im0" not in rerun and "im4" in rerun


def test_workers_give_the_same_cams(manifest, tmp_path):
    net = TinyCamNet().eval()
    plain, workers = ImageStore(tmp_path / "plain.zarr"), ImageStore(tmp_path / "workers.zarr")
    extract_cams(net, manifest, "train", plain, PARAMS, torch.device("cpu"), run=RUN, progress=False)
    extract_cams(net, manifest, "train", workers, PARAMS, torch.device("cpu"),
                 run=RunParams(loader_workers=1, inference_batch=3), progress=False)
    for image_id in plain.ids():
        np.testing.assert_allclose(plain.read(image_id)[0], workers.read(image_id)[0], rtol=0, atol=1e-3)


def test_a_rerun_recomputes_only_what_is_missing_or_cut_short(manifest, tmp_path):
    store = ImageStore(tmp_path / "cams.zarr")
    net = CountingCamFn(TinyCamNet())
    extract_cams(net, manifest, "train", store, PARAMS, torch.device("cpu"), run=RUN, progress=False)
    before = store.read("im3")[0]

    zarr.open_array(store.path, path="im3", mode="a").attrs[COMPLETE] = False  # marker lost
    group = zarr.open_group(store.path, mode="a")
    del group["im5"]
    group.create_array("im5", shape=(1, 20, 24), dtype=np.float16)[...] = 7  # killed before the marker
    assert store.complete_ids() == ["im0", "im1", "im2", "im4", "im6"]

    net.batches.clear()
    rerun = extract_cams(net, manifest, "train", store, PARAMS, torch.device("cpu"), run=RUN, progress=False)
    assert sorted(rerun) == ["im3", "im5"]
    assert sum(net.batches) == 2 * 2 * len(PARAMS.scales)  # two images, each with its flipped copy
    assert np.array_equal(store.read("im3")[0], before)
    assert store.read("im5")[0].max() == 1.0
    assert extract_cams(net, manifest, "train", store, PARAMS, torch.device("cpu"), run=RUN, progress=False) == []


def test_two_processes_share_the_ids_exactly(manifest, tmp_path):
    store = ImageStore(tmp_path / "cams.zarr")
    net = TinyCamNet().eval()
    shares = [
        extract_cams(net, manifest, "train", store, PARAMS, torch.device("cpu"), rank, 2, run=RUN, progress=False)
        for rank in (0, 1)
    ]
    ids = [item.id for item in manifest.split("train")]
    assert sorted(shares[0]) == ids[0::2] and sorted(shares[1]) == ids[1::2]
    assert store.complete_ids() == sorted(ids)
    with pytest.raises(ValueError, match="rank 2 is outside 0..1"):
        extract_cams(net, manifest, "train", store, PARAMS, torch.device("cpu"), 2, 2, run=RUN)


@pytest.fixture
def scored(tmp_path: Path) -> tuple[Manifest, ImageStore]:
    """Two images with masks and hand-written CAMs, and one without a mask (nor CAMs)."""
    masks = tmp_path / "masks"
    palette = default_palette(3)
    write_mask(masks / "line.png", np.array([[0, 0, 1, 1, IGNORE]], dtype=np.uint8), palette)
    write_mask(masks / "empty.png", np.zeros((1, 2), dtype=np.uint8), palette)
    items = (Item("line", (0,), True), Item("empty", (), True), Item("unmasked", (1,), False))
    manifest = Manifest("hand", ("a", "b"), tmp_path / "images", ".png", {"val": items}, mask_dir=masks)
    store = ImageStore(tmp_path / "cams.zarr")
    store.write("line", np.array([[[0.1, 0.3, 0.6, 0.9, 0.9]]], dtype=np.float16), classes=[0])
    store.write("empty", np.zeros((0, 1, 2), dtype=np.float16), classes=[])
    return manifest, store


def test_score_cams_finds_the_best_background_threshold(scored):
    manifest, store = scored
    result = score_cams(store, manifest, "val", thresholds=[0.7, 0.05, 0.4, 0.2])

    # At 0.4 the line is [0, 0, 1, 1] as in its mask: a perfect score.
    assert result["threshold"] == 0.4 and result["miou"] == 1.0
    assert [point["threshold"] for point in result["curve"]] == [0.05, 0.2, 0.4, 0.7]
    assert result["iou"] == {"background": 1.0, "a": 1.0, "b": None}
    for point in result["curve"]:  # the same as scoring each threshold on its own
        score = SegmentationScore(3)
        score.update(np.array([[0, 0, 1, 1]]), (np.array([[0.1, 0.3, 0.6, 0.9]]) > point["threshold"]).astype(int))
        score.update(np.zeros((1, 2), dtype=np.uint8), np.zeros((1, 2), dtype=np.uint8))
        assert point["miou"] == pytest.approx(score.miou())
    assert result["curve"][0]["miou"] == pytest.approx((2 / 4 + 2 / 4) / 2)


def test_score_cams_errors_name_the_mask_or_store_and_without_masks_nothing_is_scored(scored, tmp_path):
    manifest, store = scored
    store.write("line", np.zeros((1, 1, 4), dtype=np.float16), classes=[0])
    with pytest.raises(InputError, match=r"line.png: mask of 5x1 pixels, its image's CAMs 4x1 \(`rrm manifest`"):
        score_cams(store, manifest, "val", [0.5])
    with pytest.raises(InputError, match="other.zarr: store not found"):
        score_cams(ImageStore(tmp_path / "other.zarr"), manifest, "val", [0.5])
    unmasked = Manifest("hand", ("a", "b"), tmp_path / "images", ".png", {"val": manifest.split("val")[2:]})
    assert score_cams(store, unmasked, "val", [0.5]) == {"miou": None, "threshold": None, "curve": [], "iou": None,
                                                          "scored_images": 0}

"""Mining a split over dask: the masks are the rule's, whatever the cluster; resume; scoring."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import dask.config
import numpy as np
import pytest
import torch
import zarr
from distributed import Client, LocalCluster, get_task_stream
from scipy.ndimage import gaussian_filter

from pipeline.core.errors import InputError
from pipeline.core.io import IGNORE, write_image, write_mask
from pipeline.core.params import load_params
from pipeline.core.run import RunParams, load_run
from pipeline.core.store import ImageStore
from pipeline.data.manifest import Item, Manifest
from pipeline.method.mining import MiningJob, crf_made_from, masks_made_from, mine_chunk, mine_split, per_class_rows
from pipeline.method.prune import PruneParams, prune_image
from tests.conftest import beside

PARAMS = PruneParams()


def fake_cams(gt: np.ndarray, classes: tuple[int, ...]) -> np.ndarray:
    """Blurred one-hot ground truth of the present classes, each divided by its maximum, float16."""
    cams = [gaussian_filter((gt == c + 1).astype(np.float32), sigma=2.0) for c in classes]
    return np.stack([cam / cam.max() for cam in cams]).astype(np.float16)


def write_cams(store: ImageStore, manifest: Manifest, split: str) -> None:
    """A complete CAM store for ``split``, as the cams stage leaves it."""
    store.reset_unless("cams-of-the-test")
    items = manifest.split(split)
    for item in items:
        store.write(item.id, fake_cams(manifest.read_mask(item), item.labels), classes=list(item.labels))
    store.mark_complete(item.id for item in items)


def stored(store: ImageStore) -> dict[str, bytes]:
    return {image_id: store.read(image_id)[0].tobytes() for image_id in store.ids()}


@pytest.fixture
def cams(tiny_manifest: Manifest, tmp_path: Path) -> ImageStore:
    store = ImageStore(tmp_path / "cams.zarr", stage="cams")
    write_cams(store, tiny_manifest, "train")
    return store


@pytest.fixture(scope="module")
def scheduler() -> Iterator[str]:
    """The address of a running scheduler with one in-process worker (cheap to start)."""
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def test_masks_are_the_rules_and_equal_for_one_and_two_worker_processes(tiny_manifest, cams, tmp_path):
    one, two = ImageStore(tmp_path / "one.zarr"), ImageStore(tmp_path / "two.zarr")
    mine_split(tiny_manifest, "train", cams, one, beside(one), PARAMS, RunParams(workers=1), progress=False)
    mine_split(tiny_manifest, "train", cams, two, beside(two), PARAMS, RunParams(workers=2, chunk_size=1),
               progress=False)

    assert stored(one) == stored(two)
    assert one.is_complete() and two.is_complete()
    for item in tiny_manifest.split("train"):
        image_cams, attrs = cams.read(item.id)
        image = tiny_manifest.read_image(item.id)
        expected = prune_image(image, image_cams.astype(np.float32), np.array(attrs["classes"]), PARAMS)
        assert stored(one)[item.id] == expected.tobytes()


def test_a_killed_run_resumes_with_only_the_missing_masks(tiny_manifest, cams, scheduler, tmp_path):
    cluster = RunParams(scheduler=scheduler)
    whole = ImageStore(tmp_path / "whole.zarr")
    first = mine_split(tiny_manifest, "train", cams, whole, beside(whole), PARAMS, cluster, progress=False)
    assert first.computed == ["im0", "im1", "im2", "im3"]

    killed = ImageStore(tmp_path / "killed.zarr")
    for source, copy in ((whole, killed), (beside(whole), beside(killed))):
        shutil.copytree(source.path, copy.path)
        shutil.rmtree(copy.path / "im1")  # killed before it started
    half = zarr.open_group(killed.path, mode="a").create_array("im3", shape=(20, 24), dtype=np.uint8, overwrite=True)
    half[...] = 7  # killed after writing the mask, before the completion mark
    resumed = mine_split(tiny_manifest, "train", cams, killed, beside(killed), PARAMS, cluster, progress=False)

    assert resumed.computed == ["im1", "im3"]
    assert stored(killed) == stored(whole)
    assert resumed.masks.counts.tolist() == first.masks.counts.tolist()


def test_other_cluster_settings_keep_the_masks_and_other_rule_settings_redo_them(
    tiny_manifest, cams, scheduler, tmp_path
):
    masks, crf = ImageStore(tmp_path / "masks.zarr"), ImageStore(tmp_path / "crf.zarr")
    cluster = RunParams(scheduler=scheduler)
    mine_split(tiny_manifest, "train", cams, masks, crf, PARAMS, cluster, progress=False)
    crf_labels = stored(crf)
    again = mine_split(tiny_manifest, "train", cams, masks, crf, PARAMS, replace(cluster, chunk_size=1),
                       progress=False)
    stricter = replace(PARAMS, cam_quantile=0.9)
    redone = mine_split(tiny_manifest, "train", cams, masks, crf, stricter, cluster, progress=False)

    assert again.computed == []
    assert redone.computed == ["im0", "im1", "im2", "im3"]
    made = masks_made_from(tiny_manifest, "train", stricter, cams)
    assert masks.fingerprint == made.fingerprint != masks_made_from(tiny_manifest, "train", PARAMS, cams).fingerprint
    assert masks.made_from == made.as_json() and made.settings["prune.cam_quantile"] == 0.9
    assert redone.masks.coverage() < again.masks.coverage()
    # The CRFs' labels do not depend on the rule's thresholds: the same record, the same bytes.
    assert crf.fingerprint == crf_made_from(tiny_manifest, "train", PARAMS, cams).fingerprint
    assert stored(crf) == crf_labels and "prune.cam_quantile" not in crf.made_from["settings"]
    softer = replace(PARAMS, la_alpha=2.0)  # a CRF's setting starts both stores anew
    assert mine_split(tiny_manifest, "train", cams, masks, crf, softer, cluster, progress=False).computed == [
        "im0", "im1", "im2", "im3"]
    assert crf.fingerprint == crf_made_from(tiny_manifest, "train", softer, cams).fingerprint


@pytest.mark.parametrize("given_in", ["params", "dask config"])
def test_the_tasks_run_on_the_scheduler_given_by_address(tiny_manifest, cams, scheduler, tmp_path, given_in):
    cluster = RunParams(scheduler=scheduler if given_in == "params" else None, chunk_size=3)
    config = {"scheduler-address": scheduler if given_in == "dask config" else None}
    masks = ImageStore(tmp_path / "m.zarr")
    with dask.config.set(config), Client(scheduler) as client, get_task_stream(client) as stream:
        mine_split(tiny_manifest, "train", cams, masks, beside(masks), PARAMS, cluster, progress=False)
    assert sorted(task["key"].split("-")[0] for task in stream.data) == ["mine_chunk", "mine_chunk"]


def test_an_incomplete_cam_store_is_refused(tiny_manifest, tmp_path):
    cams = ImageStore(tmp_path / "cams.zarr", stage="cams")
    cams.reset_unless("cams-of-the-test")
    item = tiny_manifest.split("train")[0]
    cams.write(item.id, fake_cams(tiny_manifest.read_mask(item), item.labels), classes=list(item.labels))
    masks = ImageStore(tmp_path / "masks.zarr")

    with pytest.raises(InputError, match=r"cams\.zarr: incomplete store \(rerun the cams stage\)"):
        mine_split(tiny_manifest, "train", cams, masks, beside(masks), PARAMS, RunParams(workers=1), progress=False)
    assert not masks.exists()


@pytest.fixture
def hand_made(tmp_path: Path) -> tuple[MiningJob, tuple[Item, ...]]:
    """Two 2x4 images over classes a (label 1) and b (label 2): "gt" with a mask, "nogt" without;
    their CAMs, masks and CRF labels already in the stores, so the task only scores."""
    gt = np.array([[0, 0, 1, 1], [0, 2, 2, 1]], dtype=np.uint8)
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0]], dtype=np.uint8)
    write_mask(tmp_path / "masks" / "gt.png", gt, palette)
    items = (Item("gt", (0, 1), has_mask=True), Item("nogt", (0, 1), has_mask=False))
    manifest = Manifest("hand", ("a", "b"), tmp_path / "images", ".png", {"train": items}, mask_dir=tmp_path / "masks")
    cams, masks = ImageStore(tmp_path / "cams.zarr"), ImageStore(tmp_path / "masks.zarr")
    cam_a = np.array([[0, 0, 1, 1], [0.9, 0, 0, 1]], dtype=np.float16)  # (1, 0): a where the truth is background
    cam_b = np.array([[0, 0, 0, 0], [0, 1, 1, 0]], dtype=np.float16)
    mask = np.array([[0, IGNORE, 1, 1], [1, IGNORE, 2, IGNORE]], dtype=np.uint8)
    crf = beside(masks)
    for item in items:
        cams.write(item.id, np.stack([cam_a, cam_b]), classes=[0, 1])
        crf.write(item.id, mask)
        masks.write(item.id, mask)
    return MiningJob.create(manifest, cams, masks, crf, PARAMS), items


def test_scores_of_a_hand_made_mask_and_cam(hand_made):
    job, items = hand_made
    score = mine_chunk(job, items)
    metrics = score.as_dict(("background", "a", "b"))

    assert (score.computed, score.images, score.scored) == ([], 2, 1)
    # 8 valid pixels, 5 labelled, 4 of them right; (1, 0) is labelled a over background.
    assert metrics["precision"] == pytest.approx(4 / 5)
    assert metrics["coverage"] == pytest.approx(5 / 8)
    assert per_class_rows(metrics) == [
        {"class": "background", "precision": 1.0, "coverage": pytest.approx(2 / 3)},
        {"class": "a", "precision": pytest.approx(2 / 3), "coverage": pytest.approx(2 / 3)},
        {"class": "b", "precision": 1.0, "coverage": 0.5},
    ]
    # The CAM argmax is the truth but at (1, 0): IoU 2/3 background, 3/4 a, 1 b.
    assert metrics["cam_argmax"]["miou"] == pytest.approx((2 / 3 + 3 / 4 + 1) / 3)


def test_an_image_without_labels_is_all_unreliable(tmp_path):
    write_image(tmp_path / "images" / "empty.png", np.full((5, 6, 3), 90, dtype=np.uint8))
    write_mask(tmp_path / "masks" / "empty.png", np.zeros((5, 6), dtype=np.uint8), np.zeros((2, 3), dtype=np.uint8))
    item = Item("empty", (), has_mask=True)
    manifest = Manifest("empty", ("a",), tmp_path / "images", ".png", {"train": (item,)}, mask_dir=tmp_path / "masks")
    cams, masks = ImageStore(tmp_path / "cams.zarr"), ImageStore(tmp_path / "masks.zarr")
    cams.write("empty", np.zeros((0, 5, 6), dtype=np.float16), classes=[])

    score = mine_chunk(MiningJob.create(manifest, cams, masks, beside(masks), PARAMS), [item])

    assert score.computed == ["empty"]
    mask, _ = masks.read("empty")
    assert mask.dtype == np.uint8 and mask.shape == (5, 6) and (mask == IGNORE).all()
    assert score.masks.coverage() == 0.0
    assert score.cams.miou() == 1.0  # the plain CAM argmax calls it all background


def test_how_to_prune_is_the_run_section_s_and_the_prune_section_holds_only_the_rule(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("prune:\n  crf_confidence: 0.9\nrun:\n  workers: 3\n  scheduler: tcp://head:8786\n")
    assert load_params(PruneParams, "prune", path) == PruneParams(crf_confidence=0.9)
    assert load_run(path) == RunParams(scheduler="tcp://head:8786", workers=3)
    path.write_text("run:\n  workers: 0\n")
    with pytest.raises(InputError, match=r"\[run\]: parameter workers=0 is outside"):
        load_run(path)
    path.write_text("prune:\n  workers: 3\n")
    with pytest.raises(InputError, match=r"\[prune\]: unknown parameter 'workers'"):
        load_params(PruneParams, "prune", path)


def test_cams_of_another_size_than_their_image_are_an_error_naming_the_store(tiny_manifest, tmp_path):
    item = tiny_manifest.split("train")[0]
    cams = ImageStore(tmp_path / "cams.zarr", stage="cams")
    cams.write(item.id, np.ones((1, 10, 12), dtype=np.float16), classes=list(item.labels))
    masks = ImageStore(tmp_path / "masks.zarr")
    job = MiningJob.create(tiny_manifest, cams, masks, beside(masks), PARAMS)

    with pytest.raises(InputError, match=r"cams\.zarr: the CAM array of 'im0' is 10x12, its image 20x24"):
        mine_chunk(job, [item])


def test_the_torch_backend_mines_in_this_process_in_batches_as_it_prunes_alone(tiny_manifest, cams, tmp_path):
    params = PruneParams(crf_backend="torch")
    masks = ImageStore(tmp_path / "torch.zarr")
    score = mine_split(tiny_manifest, "train", cams, masks, beside(masks), params, RunParams(inference_batch=4),
                       progress=False,
                       device=torch.device("cpu"))  # as on a GPU: no cluster, a batch per image size

    assert masks.is_complete() and score.images == len(tiny_manifest.split("train"))

    for item in tiny_manifest.split("train"):
        image_cams, attrs = cams.read(item.id)
        image = tiny_manifest.read_image(item.id)
        expected = prune_image(image, image_cams.astype(np.float32), np.array(attrs["classes"]), params)
        assert stored(masks)[item.id] == expected.tobytes()

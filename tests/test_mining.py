"""Mining a split in two steps, the CRFs over dask and the rule from what they kept: the masks are
the rule's, whatever the cluster; resume; a threshold keeps the CRFs; scoring."""

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
from distributed import Client, get_task_stream
from scipy.ndimage import gaussian_filter

from pipeline.core.errors import InputError
from pipeline.core.io import IGNORE, write_image, write_mask
from pipeline.core.params import load_params
from pipeline.core.run import RunParams, load_run
from pipeline.core.store import ImageStore
from pipeline.data.manifest import Item, Manifest
from pipeline.method.crf_runner import local_cluster
from pipeline.method.mining import (
    MiningJob,
    MiningScore,
    RuleJob,
    crf_made_from,
    masks_made_from,
    mine_chunk,
    mine_split,
    per_class_rows,
    prune_chunk,
    prune_split,
)
from pipeline.method.prune import CrfOutputs, PruneParams, cam_winners, prune_image

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


class Run:
    """The stores of one run of both steps in a folder: the CRFs' two and the masks."""

    def __init__(self, folder: Path) -> None:
        self.crf = ImageStore(folder / "crf.zarr", "crf")
        self.maps = ImageStore(folder / "crfmaps.zarr", "crf")
        self.masks = ImageStore(folder / "masks.zarr", "prune")

    def crfs(self, manifest: Manifest, cams: ImageStore, params: PruneParams, run: RunParams,
             **options) -> MiningScore:
        return mine_split(manifest, "train", cams, self.crf, self.maps, params, run, progress=False, **options)

    def rule(self, manifest: Manifest, cams: ImageStore, params: PruneParams) -> MiningScore:
        return prune_split(manifest, "train", self.maps, self.masks, params, progress=False)


def expected_masks(manifest: Manifest, cams: ImageStore, params: PruneParams) -> dict[str, bytes]:
    """The rule on each image's own CRFs, pruned alone."""
    found = {}
    for item in manifest.split("train"):
        image_cams, attrs = cams.read(item.id)
        image = manifest.read_image(item.id)
        found[item.id] = prune_image(image, image_cams.astype(np.float32), np.array(attrs["classes"]), params).tobytes()
    return found


@pytest.fixture(scope="module")
def scheduler() -> Iterator[str]:
    """The address of a running scheduler with one in-process worker (cheap to start)."""
    with local_cluster(1, processes=False, threads=2) as cluster:
        yield cluster.scheduler_address


def test_masks_are_the_rules_and_equal_for_one_and_two_worker_processes(tiny_manifest, cams, tmp_path):
    one, two = Run(tmp_path / "one"), Run(tmp_path / "two")
    one.crfs(tiny_manifest, cams, PARAMS, RunParams(workers=1))
    two.crfs(tiny_manifest, cams, PARAMS, RunParams(workers=2, chunk_size=1))
    for run in (one, two):
        run.rule(tiny_manifest, cams, PARAMS)

    assert stored(one.masks) == stored(two.masks) == expected_masks(tiny_manifest, cams, PARAMS)
    assert stored(one.crf) == stored(two.crf) and stored(one.maps) == stored(two.maps)
    assert all(store.is_complete() for store in (one.crf, one.maps, one.masks))
    assert one.maps.read("im0")[0].dtype == np.float32 and one.maps.read("im0")[0].shape == (4, 20, 24)


def test_a_killed_run_resumes_with_only_the_missing_images(tiny_manifest, cams, scheduler, tmp_path):
    cluster = RunParams(scheduler=scheduler)
    whole, killed = Run(tmp_path / "whole"), Run(tmp_path / "killed")
    first = whole.crfs(tiny_manifest, cams, PARAMS, cluster)
    assert first.computed == ["im0", "im1", "im2", "im3"]

    for source, copy in ((whole.crf, killed.crf), (whole.maps, killed.maps)):
        shutil.copytree(source.path, copy.path)
        shutil.rmtree(copy.path / "im1")  # killed before it started
    half = zarr.open_group(killed.crf.path, mode="a").create_array("im3", shape=(20, 24), dtype=np.uint8,
                                                                   overwrite=True)
    half[...] = 7  # an array without its completion mark: a write cut short
    resumed = killed.crfs(tiny_manifest, cams, PARAMS, cluster)

    assert resumed.computed == ["im1", "im3"]
    assert stored(killed.crf) == stored(whole.crf) and stored(killed.maps) == stored(whole.maps)
    assert resumed.crf.counts.tolist() == first.crf.counts.tolist()
    whole.rule(tiny_manifest, cams, PARAMS)
    shutil.rmtree(whole.masks.path / "im2")
    assert whole.rule(tiny_manifest, cams, PARAMS).computed == ["im2"]


def test_other_cluster_settings_keep_the_crfs_and_a_threshold_redoes_the_rule_alone(
    tiny_manifest, cams, scheduler, tmp_path
):
    run, cluster = Run(tmp_path), RunParams(scheduler=scheduler)
    run.crfs(tiny_manifest, cams, PARAMS, cluster)
    first = run.rule(tiny_manifest, cams, PARAMS)
    kept = stored(run.crf), stored(run.maps)
    again = run.crfs(tiny_manifest, cams, PARAMS, replace(cluster, chunk_size=1))
    stricter = replace(PARAMS, cam_quantile=0.9)
    # A threshold is the rule's alone: the CRFs' record does not hold it, they have nothing to redo.
    assert run.crfs(tiny_manifest, cams, stricter, cluster).computed == again.computed == []
    redone = run.rule(tiny_manifest, cams, stricter)

    assert redone.computed == ["im0", "im1", "im2", "im3"]
    assert stored(run.masks) == expected_masks(tiny_manifest, cams, stricter)
    made = masks_made_from(tiny_manifest, "train", stricter, run.maps)
    assert run.masks.fingerprint == made.fingerprint
    assert made.fingerprint != masks_made_from(tiny_manifest, "train", PARAMS, run.maps).fingerprint
    assert run.masks.made_from == made.as_json() and made.settings["prune.cam_quantile"] == 0.9
    assert redone.masks.coverage() < first.masks.coverage()
    assert (stored(run.crf), stored(run.maps)) == kept
    assert run.crf.fingerprint == crf_made_from(tiny_manifest, "train", PARAMS, cams).fingerprint
    assert "prune.cam_quantile" not in run.crf.made_from["settings"]
    softer = replace(PARAMS, la_alpha=2.0)  # an alpha starts the CRFs' stores anew
    assert run.crfs(tiny_manifest, cams, softer, cluster).computed == ["im0", "im1", "im2", "im3"]
    assert run.crf.fingerprint == run.maps.fingerprint == crf_made_from(tiny_manifest, "train", softer,
                                                                                cams).fingerprint


@pytest.mark.parametrize("given_in", ["params", "dask config"])
def test_the_tasks_run_on_the_scheduler_given_by_address(tiny_manifest, cams, scheduler, tmp_path, given_in):
    cluster = RunParams(scheduler=scheduler if given_in == "params" else None, chunk_size=3)
    config = {"scheduler-address": scheduler if given_in == "dask config" else None}
    with dask.config.set(config), Client(scheduler) as client, get_task_stream(client) as stream:
        Run(tmp_path).crfs(tiny_manifest, cams, PARAMS, cluster)
    assert sorted(task["key"].split("-")[0] for task in stream.data) == ["mine_chunk", "mine_chunk"]


def test_an_incomplete_cam_store_is_refused(tiny_manifest, tmp_path):
    cams = ImageStore(tmp_path / "cams.zarr", stage="cams")
    cams.reset_unless("cams-of-the-test")
    item = tiny_manifest.split("train")[0]
    cams.write(item.id, fake_cams(tiny_manifest.read_mask(item), item.labels), classes=list(item.labels))
    run = Run(tmp_path)

    with pytest.raises(InputError, match=r"cams\.zarr: incomplete store \(rerun the cams stage\)"):
        run.crfs(tiny_manifest, cams, PARAMS, RunParams(workers=1))
    assert not run.crf.exists()


def test_the_rule_refuses_crfs_of_an_unfinished_crf_stage(tiny_manifest, cams, tmp_path):
    run = Run(tmp_path)
    run.crfs(tiny_manifest, cams, PARAMS, RunParams(workers=1))
    shutil.rmtree(run.maps.path / "im2")
    zarr.open_group(run.maps.path, mode="a").attrs.pop("complete")  # as if cut short

    with pytest.raises(InputError, match=r"crfmaps\.zarr: incomplete store \(rerun the crf stage\)"):
        run.rule(tiny_manifest, cams, PARAMS)


@pytest.fixture
def hand_made(tmp_path: Path) -> tuple[MiningJob, RuleJob, tuple[Item, ...]]:
    """Two 2x4 images over classes a (label 1) and b (label 2): "gt" with a mask, "nogt" without;
    their CAMs, kept CRF outputs and masks already in the stores, so the task only scores."""
    gt = np.array([[0, 0, 1, 1], [0, 2, 2, 1]], dtype=np.uint8)
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0]], dtype=np.uint8)
    write_mask(tmp_path / "masks" / "gt.png", gt, palette)
    items = (Item("gt", (0, 1), has_mask=True), Item("nogt", (0, 1), has_mask=False))
    manifest = Manifest("hand", ("a", "b"), tmp_path / "images", ".png", {"train": items}, mask_dir=tmp_path / "masks")
    run, cams = Run(tmp_path), ImageStore(tmp_path / "cams.zarr")
    cam_a = np.array([[0, 0, 1, 1], [0.9, 0, 0, 1]], dtype=np.float16)  # (1, 0): a where the truth is background
    cam_b = np.array([[0, 0, 0, 0], [0, 1, 1, 0]], dtype=np.float16)
    mask = np.array([[0, IGNORE, 1, 1], [1, IGNORE, 2, IGNORE]], dtype=np.uint8)
    cam_label, cam_value = cam_winners(np.stack([cam_a, cam_b]).astype(np.float32), PARAMS.ha_alpha)
    kept = CrfOutputs(mask, (0, 1, 2), np.ones(mask.shape, dtype=np.float32), cam_label, cam_value)
    for item in items:
        cams.write(item.id, np.stack([cam_a, cam_b]), classes=[0, 1])
        run.crf.write(item.id, mask)
        run.maps.write(item.id, kept.planes(), present=list(kept.present))
        run.masks.write(item.id, mask)
    return (MiningJob.create(manifest, cams, run.crf, run.maps, PARAMS), RuleJob(manifest, run.maps, run.masks, PARAMS),
            items)


def test_scores_of_a_hand_made_mask_and_cam(hand_made):
    job, rule, items = hand_made
    score = prune_chunk(rule, items)
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
    crfs = mine_chunk(job, items).as_dict(("background", "a", "b"))  # the crf stage scores the CAMs
    assert crfs["cam_argmax"]["miou"] == pytest.approx((2 / 3 + 3 / 4 + 1) / 3)


def test_an_image_without_labels_is_all_unreliable(tmp_path):
    write_image(tmp_path / "images" / "empty.png", np.full((5, 6, 3), 90, dtype=np.uint8))
    write_mask(tmp_path / "masks" / "empty.png", np.zeros((5, 6), dtype=np.uint8), np.zeros((2, 3), dtype=np.uint8))
    item = Item("empty", (), has_mask=True)
    manifest = Manifest("empty", ("a",), tmp_path / "images", ".png", {"train": (item,)}, mask_dir=tmp_path / "masks")
    run, cams = Run(tmp_path), ImageStore(tmp_path / "cams.zarr")
    cams.write("empty", np.zeros((0, 5, 6), dtype=np.float16), classes=[])
    job = MiningJob.create(manifest, cams, run.crf, run.maps, PARAMS)

    crfs = mine_chunk(job, [item])
    assert crfs.computed == ["empty"]
    assert crfs.cams.miou() == 1.0  # the plain CAM argmax calls it all background
    assert run.maps.read("empty")[1]["present"] == [] and (run.crf.read("empty")[0] == IGNORE).all()
    score = prune_chunk(RuleJob(manifest, run.maps, run.masks, PARAMS), [item])

    assert score.computed == ["empty"]
    mask, _ = run.masks.read("empty")
    assert mask.dtype == np.uint8 and mask.shape == (5, 6) and (mask == IGNORE).all()
    assert score.masks.coverage() == 0.0


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
    run = Run(tmp_path)
    job = MiningJob.create(tiny_manifest, cams, run.crf, run.maps, PARAMS)

    with pytest.raises(InputError, match=r"cams\.zarr: the CAM array of 'im0' is 10x12, its image 20x24"):
        mine_chunk(job, [item])


def test_the_torch_backend_mines_in_this_process_in_batches_as_it_prunes_alone(tiny_manifest, cams, tmp_path):
    params = PruneParams(crf_backend="torch")
    run = Run(tmp_path)
    score = run.crfs(tiny_manifest, cams, params, RunParams(inference_batch=4),
                     device=torch.device("cpu"))  # as on a GPU: no cluster, a batch per image size
    run.rule(tiny_manifest, cams, params)

    assert run.crf.is_complete() and score.images == len(tiny_manifest.split("train"))
    assert stored(run.masks) == expected_masks(tiny_manifest, cams, params)
    assert run.maps.read("im0")[0].dtype == np.float32



def test_two_local_clusters_at_once_take_no_fixed_port_and_warn_of_none(recwarn):
    with local_cluster(1, processes=False) as first, local_cluster(1, processes=False) as second:
        ports = {cluster.scheduler.http_server.port for cluster in (first, second)}
    assert len(ports) == 2 and 8787 not in ports
    assert not [warning for warning in recwarn if "already in use" in str(warning.message)]

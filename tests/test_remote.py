"""Stores and datasets at an fsspec URL, against a real S3 server: moto's, serving HTTP on
127.0.0.1 from a thread of this process, reached by s3fs exactly as a real bucket would be."""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import s3fs
import yaml
import zarr
from moto.server import ThreadedMotoServer
from upath import UPath

from pipeline.core.errors import InputError
from pipeline.core.io import read_image, read_mask
from pipeline.core.params import build_params, load_params
from pipeline.core.provenance import write_record
from pipeline.core.registry import CAMS, MASKS, STAGES
from pipeline.core.registry import CLASSIFIER_WEIGHTS as WEIGHTS
from pipeline.core.store import ImageStore, StorageParams
from pipeline.data.manifest import Manifest, load_manifest
from pipeline.method.cams import image_size
from pipeline.models.weights import save_checkpoint
from pipeline.train.classifier import ClassifierParams, build_classifier, classifier_made_from

BUCKET = "rrm"


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """The server's URL, with fake credentials and the endpoint in the environment, and one bucket."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as env:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            env.delenv(name, raising=False)
        env.setenv("AWS_CONFIG_FILE", "/nonexistent")  # nothing of the user's own setup
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_ENDPOINT_URL", url)
        s3fs.S3FileSystem().mkdir(BUCKET)
        yield url
    server.stop()


@pytest.fixture
def prefix(endpoint: str, request: pytest.FixtureRequest) -> str:
    """A folder of the bucket of this test's own."""
    return f"s3://{BUCKET}/{request.node.name}"


def upload(local: Path, url: str) -> None:
    s3fs.S3FileSystem().put(str(local), url.removeprefix("s3://"), recursive=True)


def test_a_store_in_a_bucket_writes_reads_and_resets(prefix):
    store = ImageStore(f"{prefix}/cams.zarr", stage="cams")
    assert not store.exists() and store.ids() == [] and store.fingerprint is None
    cams = np.random.default_rng(0).random((2, 5, 7)).astype(np.float16)

    assert store.reset_unless("settings-1") is False
    store.write("im1", cams, classes=[0, 2])
    store.write("im0", np.zeros((5, 7), np.uint8))

    array, attrs = store.read("im1")
    np.testing.assert_array_equal(array, cams)
    assert array.dtype == np.float16 and attrs == {"classes": [0, 2]}
    assert store.ids() == store.complete_ids() == ["im0", "im1"]
    assert "im1" in store and "im2" not in store
    assert store.fingerprint == "settings-1" and not store.is_complete()
    with pytest.raises(InputError, match=rf"^{prefix}/cams.zarr: 1 image\(s\) missing, e.g. 'im2'"):
        store.mark_complete(["im0", "im1", "im2"])
    store.mark_complete(["im0", "im1"])
    store.require_complete()

    assert store.reset_unless("settings-1") is True and store.ids() == ["im0", "im1"]
    assert store.reset_unless("settings-2") is False
    assert store.ids() == [] and store.fingerprint == "settings-2" and not store.is_complete()


@pytest.mark.filterwarnings("ignore:Object at stray is not recognized")  # until the rerun clears it
def test_an_array_cut_short_in_a_bucket_is_absent_until_written_again(prefix):
    store = ImageStore(f"{prefix}/masks.zarr", stage="prune")
    store.reset_unless("settings")
    store.write("done", np.ones((4, 4), np.uint8))
    killed = zarr.open_group(f"{prefix}/masks.zarr", mode="a").create_array("killed", shape=(4, 4), dtype="uint8")
    killed[...] = 7  # the data is there, the `complete` attribute never came
    UPath(f"{prefix}/masks.zarr/stray/c/0/0").write_bytes(b"\x00")  # a chunk without its zarr.json

    assert store.complete_ids() == ["done"] and "killed" not in store
    with pytest.raises(InputError, match=r"masks.zarr: image 'killed' was not written in full \(rerun the prune"):
        store.read("killed")
    assert store.reset_unless("settings") is True  # a rerun keeps "done" and clears the stray objects
    assert not UPath(f"{prefix}/masks.zarr/stray").exists()
    store.write("killed", np.full((4, 4), 3, np.uint8))
    assert store.complete_ids() == ["done", "killed"] and store.read("killed")[0].max() == 3


def test_storage_params_put_the_stores_in_a_bucket_with_their_own_options(prefix, endpoint, monkeypatch):
    assert StorageParams().store(CAMS).path == Path("artifacts/cams.zarr")
    params = build_params(StorageParams, {"artifacts": f"{prefix}/artifacts", "options": {"endpoint_url": endpoint}},
                          "params.yaml [storage]")
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the endpoint now comes from the options alone
    store = params.store(MASKS)
    assert str(store.path) == f"{prefix}/artifacts/masks.zarr"
    store.reset_unless("settings")
    store.write("im0", np.eye(3, dtype=np.uint8))

    shipped = pickle.loads(pickle.dumps(store))  # as dask sends it to a worker
    np.testing.assert_array_equal(shipped.read("im0")[0], np.eye(3))
    with pytest.raises(InputError, match=r"^params.yaml \[storage\]: parameter options='x' must be a mapping"):
        build_params(StorageParams, {"options": "x"}, "params.yaml [storage]")


def test_a_dataset_in_a_bucket_reads_like_the_local_one(tiny_manifest: Manifest, tmp_path, prefix):
    for folder in ("images", "masks", "manifests"):
        upload(tmp_path / folder, f"{prefix}/{folder}")
    remote = load_manifest(f"{prefix}/manifests/tiny.json")

    assert isinstance(remote.image_path("im1"), UPath) and str(remote.image_path("im1")) == f"{prefix}/images/im1.png"
    assert remote.splits == tiny_manifest.splits
    shipped = pickle.loads(pickle.dumps(remote))  # as a DataLoader worker gets it
    for item in tiny_manifest.split("train"):
        np.testing.assert_array_equal(shipped.read_image(item.id), tiny_manifest.read_image(item.id))
        np.testing.assert_array_equal(remote.read_mask(item), tiny_manifest.read_mask(item))
        assert image_size(remote.image_path(item.id)) == image_size(tiny_manifest.image_path(item.id))
    with pytest.raises(InputError, match=rf"^{prefix}/images/nope.png: file not found$"):
        read_image(f"{prefix}/images/nope.png")
    with pytest.raises(InputError, match=r"/images/im0.png: expected a palette or greyscale label mask"):
        read_mask(remote.image_path("im0"), 3)


def test_a_local_manifest_may_name_image_folders_in_a_bucket(tiny_manifest: Manifest, tmp_path, prefix):
    upload(tmp_path / "images", f"{prefix}/images")
    data = json.loads(tiny_manifest.source.read_text())
    data["images"]["dir"] = f"{prefix}/images"
    local = tmp_path / "manifests" / "mixed.json"
    local.write_text(json.dumps(data))

    mixed = load_manifest(local)
    assert str(mixed.image_dir) == f"{prefix}/images" and mixed.mask_dir == tiny_manifest.mask_dir
    np.testing.assert_array_equal(mixed.read_image("im3"), tiny_manifest.read_image("im3"))
    assert mixed.to_json(local.parent)["images"]["dir"] == f"{prefix}/images"


def store_contents(store: ImageStore) -> dict[str, tuple[np.ndarray, dict]]:
    return {image_id: store.read(image_id) for image_id in store.ids()}


def test_the_cams_stage_with_dataset_and_stores_in_a_bucket_matches_the_local_run(
    tiny_manifest: Manifest, tmp_path, prefix, monkeypatch
):
    from stages import cams

    monkeypatch.chdir(tmp_path)
    for folder in ("images", "masks", "manifests"):
        upload(tmp_path / folder, f"{prefix}/{folder}")
    settings = {"cams": {"scales": [1.0, 0.5], "flip": True}, "run": {"loader_workers": 0}}
    local_params, remote_params = tmp_path / "local.yaml", tmp_path / "remote.yaml"
    local_params.write_text(yaml.safe_dump({**settings, "dataset": {"manifest": "manifests/tiny.json"}}))
    remote_params.write_text(yaml.safe_dump({
        "dataset": {"manifest": f"{prefix}/manifests/tiny.json"},
        "storage": {"artifacts": f"{prefix}/artifacts"},
        "cams": settings["cams"],
        "run": {"loader_workers": 1},  # a DataLoader worker reads the bucket too
    }))
    classifier = load_params(ClassifierParams, "classifier", local_params)
    save_checkpoint(build_classifier(classifier, tiny_manifest.num_classes), WEIGHTS)
    write_record(WEIGHTS, classifier_made_from(tiny_manifest, "train", classifier))  # the same images' in the bucket

    cams.main(local_params)
    local_metrics = json.loads(STAGES["cams"].scores_file.read_text())
    cams.main(remote_params)
    remote_metrics = json.loads(STAGES["cams"].scores_file.read_text())

    local = ImageStore(tmp_path / "artifacts" / "cams.zarr")
    remote = load_params(StorageParams, "storage", remote_params).store(CAMS)
    assert remote.is_complete() and remote.ids() == local.ids() == [f"im{i}" for i in range(6)]
    for image_id, (array, attrs) in store_contents(local).items():
        remote_array, remote_attrs = remote.read(image_id)
        np.testing.assert_array_equal(remote_array, array)
        assert remote_attrs == attrs
    assert remote_metrics["miou"] == local_metrics["miou"] and remote_metrics["iou"] == local_metrics["iou"]

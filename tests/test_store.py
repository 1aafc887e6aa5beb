import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.core.errors import InputError
from pipeline.core.store import COMPLETE, DamagedImageError, ImageStore, chunk_problem


@pytest.fixture
def store(tmp_path):
    return ImageStore(tmp_path / "cams.zarr", stage="cams")


def test_round_trip_keeps_dtype_shape_values_and_attrs(store):
    rng = np.random.default_rng(0)
    cams = rng.random((2, 7, 5)).astype(np.float16)
    mask = rng.integers(0, 4, size=(7, 5), dtype=np.uint8)
    store.write("a", cams, classes=[3, 11])
    store.write("b", mask)

    cams_back, cams_attrs = store.read("a")
    mask_back, mask_attrs = store.read("b")
    assert cams_back.dtype == np.float16 and np.array_equal(cams_back, cams)
    assert mask_back.dtype == np.uint8 and np.array_equal(mask_back, mask)
    assert cams_attrs == {"classes": [3, 11]}
    assert mask_attrs == {}
    assert store.ids() == ["a", "b"] == store.complete_ids()
    assert "a" in store and "c" not in store


def test_an_array_whose_chunk_file_is_gone_counts_as_not_written(store):
    store.write("background", np.zeros((3, 4), dtype=np.uint8))  # all zeros: its chunk is still written
    store.write("object", np.ones((3, 4), dtype=np.uint8))
    store.mark_complete(["background", "object"])
    for chunk in [path for path in (store.path / "background" / "c").rglob("*") if path.is_file()]:
        chunk.unlink()

    assert "background" not in store and store.complete_ids() == ["object"]  # a rerun writes it again
    with pytest.raises(DamagedImageError, match=r"image 'background': its chunk file .*/background/c/0/0 is gone "
                                                r"\(rerun the cams stage to write it again\)"):
        store.read("background")
    store.write("background", np.zeros((3, 4), dtype=np.uint8))
    assert store.complete_ids() == ["background", "object"]


def test_empty_array_for_an_image_without_classes(store):
    store.write("none", np.zeros((0, 4, 6), dtype=np.float16), classes=[])
    array, attrs = store.read("none")
    assert array.shape == (0, 4, 6) and attrs == {"classes": []}


def test_rewrite_replaces_shape_and_attrs(store):
    store.write("a", np.ones((3, 4, 4), dtype=np.float16), classes=[0, 1, 2])
    store.write("a", np.zeros((1, 2, 2), dtype=np.float16), classes=[5])
    array, attrs = store.read("a")
    assert array.shape == (1, 2, 2) and attrs == {"classes": [5]}


def test_a_write_cut_short_counts_as_absent_and_is_replaced(store):
    store.write("done", np.ones((2, 2), dtype=np.uint8))
    group = zarr.open_group(store.path, mode="a")
    half = group.create_array("killed", shape=(2, 2), dtype=np.uint8, chunks=(2, 2))
    half[...] = 7  # data written, the process dies before the marker

    assert store.ids() == ["done", "killed"]
    assert store.complete_ids() == ["done"]
    assert "killed" not in store
    with pytest.raises(InputError, match=r"cams.zarr: image 'killed' was not written in full \(rerun the cams stage\)"):
        store.read("killed")

    store.write("killed", np.full((2, 2), 3, dtype=np.uint8))
    assert "killed" in store and store.read("killed")[0].tolist() == [[3, 3], [3, 3]]


def test_removing_the_marker_makes_an_array_incomplete(store):
    store.write("a", np.ones((2, 2), dtype=np.uint8))
    zarr.open_array(store.path, path="a", mode="a").attrs[COMPLETE] = False
    assert store.complete_ids() == [] and "a" not in store


def test_missing_store_and_missing_id_name_the_store(store):
    with pytest.raises(InputError, match=r"cams.zarr: store not found \(has the cams stage run\?\)"):
        store.read("x")
    assert store.ids() == [] and store.complete_ids() == [] and "x" not in store
    store.write("a", np.zeros((1, 1), dtype=np.uint8))
    with pytest.raises(InputError, match=r"^.*cams.zarr: no image 'x' \(has the cams stage run\?\)$"):
        store.read("x")


def test_a_store_of_no_named_stage_gives_no_hint(tmp_path):
    masks = ImageStore(tmp_path / "masks.zarr")
    masks.write("y", np.zeros((1, 1), dtype=np.uint8))
    with pytest.raises(InputError, match=r"masks.zarr: no image 'x'$"):
        masks.read("x")


@pytest.mark.parametrize("bad", ["", "a/b", "__meta", ".."])
def test_ids_that_cannot_name_an_array_are_refused(store, bad):
    with pytest.raises(InputError, match="cannot name an array"):
        store.write(bad, np.zeros((1, 1), dtype=np.uint8))


def _write_share(path: str, ids: list[str]) -> None:
    store = ImageStore(path)
    for index, image_id in enumerate(ids):
        store.write(image_id, np.full((3, 3), index, dtype=np.uint8), rank=ids[0])


def test_processes_writing_their_own_ids_into_one_store_at_once(tmp_path):
    path = str(tmp_path / "masks.zarr")
    shares = [[f"p{p}_{i}" for i in range(12)] for p in range(3)]
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_share, args=(path, share)) for share in shares]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0

    store = ImageStore(path)
    assert store.complete_ids() == sorted(i for share in shares for i in share)
    for share in shares:
        array, attrs = store.read(share[-1])
        assert array[0, 0] == len(share) - 1 and attrs == {"rank": share[0]}


def test_a_store_made_with_other_settings_is_started_anew(tmp_path):
    store = ImageStore(tmp_path / "cams.zarr", stage="cams")
    assert store.reset_unless("settings-a") is False
    store.write("a", np.zeros((2, 2), dtype=np.uint8))
    assert store.reset_unless("settings-a") is True
    assert store.complete_ids() == ["a"]
    assert store.reset_unless("settings-b") is False
    assert store.complete_ids() == [] and store.fingerprint == "settings-b"


def test_only_a_store_marked_complete_is_taken_as_complete(tmp_path):
    store = ImageStore(tmp_path / "masks.zarr", stage="prune")
    store.reset_unless("x")
    store.write("a", np.zeros((2, 2), dtype=np.uint8))
    with pytest.raises(InputError, match=r"masks\.zarr: incomplete store \(rerun the prune stage\)"):
        store.require_complete()
    with pytest.raises(InputError, match="1 image\\(s\\) missing, e.g. 'b'"):
        store.mark_complete(["a", "b"])
    store.mark_complete(["a"])
    store.require_complete()
    assert store.reset_unless("y") is False and not store.is_complete()


def chunk_file(store: ImageStore, image_id: str) -> Path:
    (chunk,) = [path for path in (store.path / image_id / "c").rglob("*") if path.is_file()]
    return chunk


def cut_short(chunk: Path, other: Path) -> None:
    chunk.write_bytes(chunk.read_bytes()[:10])  # a full disk, an interrupted copy


def garbled(chunk: Path, other: Path) -> None:
    chunk.write_bytes(bytes(255 - byte for byte in chunk.read_bytes()))  # the same size, every byte wrong


def another_array_s(chunk: Path, other: Path) -> None:
    chunk.write_bytes(other.read_bytes())  # a chunk of another shape


ARRAYS = {"cams": (np.linspace(0, 1, 2 * 6 * 8, dtype=np.float16).reshape(2, 6, 8), {"classes": [0, 4]}),
          "mask": (np.arange(6 * 8, dtype=np.uint8).reshape(6, 8) % 3, {})}


@pytest.mark.parametrize("damage", [cut_short, garbled, another_array_s])
@pytest.mark.parametrize("kind", ARRAYS)
def test_a_damaged_chunk_counts_as_not_written_and_reading_it_names_the_file(store, kind, damage):
    array, attrs = ARRAYS[kind]
    store.write("a", array, **attrs)
    store.write("other", ARRAYS["mask" if kind == "cams" else "cams"][0])
    store.write("kept", array, **attrs)
    damage(chunk_file(store, "a"), chunk_file(store, "other"))

    assert "a" not in store and store.complete_ids() == ["kept", "other"]  # its stage writes it again
    assert set(store.read_whole(["a", "kept"])) == {"kept"}
    with pytest.raises(DamagedImageError, match=rf"image 'a': its chunk file {chunk_file(store, 'a')} is damaged: "):
        store.read("a")
    assert {image_id: kind for image_id, (kind, _) in store.check(["a", "kept"]).items()} == {"a": "damaged"}
    store.write("a", array, **attrs)
    assert np.array_equal(store.read("a")[0], array) and store.check(["a"]) == {}


def test_bytes_garbled_past_the_header_fail_their_checksum_when_decoded(store):
    store.write("a", ARRAYS["mask"][0])
    chunk = chunk_file(store, "a")
    data = bytearray(chunk.read_bytes())
    data[20] ^= 0xFF  # one byte of the compressed data: the header still matches the array
    chunk.write_bytes(bytes(data))

    assert "a" in store  # what a stage sees without decoding
    with pytest.raises(DamagedImageError, match=r"image 'a': its chunk file .* does not decode \(Stored and "
                                                r"computed checksum do not match\) \(`rrm verify --repair` deletes "
                                                r"it; then rerun the cams stage\)"):
        store.read("a")
    ((kind, why),) = store.check(["a"]).values()
    assert kind == "damaged" and "does not decode" in why
    store.remove_chunk("a")
    assert "a" not in store and store.check(["a"])["a"][0] == "missing"


def test_the_header_check_reads_sizes_only():
    header = bytes([2, 1, 0x91, 1]) + (100).to_bytes(4, "little") + (100).to_bytes(4, "little") + \
        (40).to_bytes(4, "little")
    assert chunk_problem(header, 44, 100, checksum=True) is None
    assert chunk_problem(header, 40, 100, checksum=True) == "cut short (40 bytes of 44)"
    assert chunk_problem(header, 50, 100, checksum=True) == "too long (50 bytes of 44)"
    assert chunk_problem(header, 44, 200, checksum=True).startswith("not this array's (100 bytes of data")
    assert chunk_problem(header[:10], 10, 100, checksum=False) == "cut short (10 bytes)"

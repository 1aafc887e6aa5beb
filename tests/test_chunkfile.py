import numpy as np
import pytest
import zarr

from pipeline.core import chunkfile
from pipeline.core.store import ImageStore

ARRAYS = {
    "CAMs, float16 (k, H, W)": np.random.default_rng(0).random((3, 17, 23)).astype(np.float16),
    "a mask, uint8 (H, W)": np.random.default_rng(1).integers(0, 6, (17, 23)).astype(np.uint8),
    "kept CRF maps, float32 (4, H, W)": np.random.default_rng(2).random((4, 9, 11)).astype(np.float32),
}


def zarr_wrote(folder, name, array, attributes):
    """What zarr itself writes for ``array`` under ``name`` in the group at ``folder``."""
    group = zarr.open_group(folder, mode="a", zarr_format=3)
    node = group.create_array(name, **chunkfile.layout(array), attributes={**attributes, chunkfile.COMPLETE: True})
    node[...] = array
    return folder / name


@pytest.mark.parametrize("array", ARRAYS.values(), ids=ARRAYS.keys())
def test_the_files_written_are_zarr_s_own_byte_for_byte(tmp_path, array):
    ours = tmp_path / "store.zarr" / "ours"
    theirs = zarr_wrote(tmp_path / "store.zarr", "theirs", array, {"classes": [4, 7]})
    assert chunkfile.write(ours, array, {"classes": [4, 7]})

    for relative in ("zarr.json", chunkfile.chunk_key(array.ndim)):
        assert (ours / relative).read_bytes() == (theirs / relative).read_bytes()
    assert sorted(path.relative_to(ours) for path in ours.rglob("*")) == \
        sorted(path.relative_to(theirs) for path in theirs.rglob("*"))
    back = zarr.open_array(tmp_path / "store.zarr", path="ours", mode="r")
    assert np.array_equal(back[...], array) and back.attrs["classes"] == [4, 7]


@pytest.mark.parametrize("array", ARRAYS.values(), ids=ARRAYS.keys())
def test_what_zarr_wrote_reads_back_whole_and_writable(tmp_path, array):
    read = chunkfile.read(zarr_wrote(tmp_path / "store.zarr", "a", array, {"present": [0, 2]}))

    assert read is not None
    back, attributes = read
    assert back.dtype == array.dtype and np.array_equal(back, array) and back.flags.writeable
    assert attributes == {"present": [0, 2], chunkfile.COMPLETE: True}


def test_a_big_endian_array_is_written_in_the_layout_s_order(tmp_path):
    array = ARRAYS["kept CRF maps, float32 (4, H, W)"]
    assert chunkfile.write(tmp_path / "store.zarr" / "a", array.astype(">f4"), {})
    assert np.array_equal(chunkfile.read(tmp_path / "store.zarr" / "a")[0], array)


def test_a_store_written_before_the_checksum_reads_directly(tmp_path):
    array = ARRAYS["a mask, uint8 (H, W)"]
    group = zarr.open_group(tmp_path / "old.zarr", mode="a", zarr_format=3)
    group.create_array("a", **{**chunkfile.layout(array), "compressors": (chunkfile.COMPRESSOR,)},
                       attributes={chunkfile.COMPLETE: True})[...] = array

    assert np.array_equal(chunkfile.read(tmp_path / "old.zarr" / "a")[0], array)


def test_anything_but_a_whole_array_of_the_layout_is_left_to_zarr(tmp_path):
    mask = ARRAYS["a mask, uint8 (H, W)"]
    folder = zarr_wrote(tmp_path / "store.zarr", "a", mask, {})
    chunk = folder / chunkfile.chunk_key(2)
    whole = chunk.read_bytes()

    chunk.write_bytes(whole[:-1] + bytes([whole[-1] ^ 1]))  # the checksum fails
    assert chunkfile.read(folder) is None
    chunk.write_bytes(whole[:10])  # cut short
    assert chunkfile.read(folder) is None
    chunk.unlink()  # gone
    assert chunkfile.read(folder) is None
    assert chunkfile.read(tmp_path / "store.zarr" / "never written") is None

    group = zarr.open_group(tmp_path / "store.zarr", mode="a")
    group.create_array("two chunks", shape=(4, 4), dtype=np.uint8, chunks=(2, 2))[...] = 1
    group["two chunks"].attrs[chunkfile.COMPLETE] = True
    unfinished = group.create_array("unfinished", **chunkfile.layout(mask))
    unfinished[...] = mask
    assert chunkfile.read(tmp_path / "store.zarr" / "two chunks") is None
    assert chunkfile.read(tmp_path / "store.zarr" / "unfinished") is None


def test_an_empty_array_is_left_to_zarr_which_writes_no_chunk_for_it(tmp_path):
    assert not chunkfile.write(tmp_path / "store.zarr" / "empty", np.zeros((0, 4, 6), dtype=np.float16), {})
    assert not (tmp_path / "store.zarr" / "empty").exists()

    store = ImageStore(tmp_path / "cams.zarr", stage="cams")
    store.write("no classes", np.zeros((0, 4, 6), dtype=np.float16), classes=[])
    assert chunkfile.read(store.path / "no classes") is None
    assert store.read("no classes")[0].shape == (0, 4, 6) and store.complete_ids() == ["no classes"]


def test_a_write_killed_before_its_metadata_leaves_debris_a_rerun_removes(tmp_path):
    store = ImageStore(tmp_path / "masks.zarr", stage="prune")
    store.reset_unless("settings")
    store.write("done", np.ones((2, 2), dtype=np.uint8))
    killed = store.path / "killed"
    chunkfile.write(killed, np.ones((2, 2), dtype=np.uint8), {})
    (killed / "zarr.json").unlink()  # the kill came between the chunk and the metadata

    with pytest.warns(UserWarning, match="not recognized"):  # zarr does not list it
        assert store.ids() == ["done"]
    assert "killed" not in store
    assert store.reset_unless("settings")  # the same settings: a resumed run keeps "done"
    assert not killed.exists() and store.complete_ids() == ["done"]

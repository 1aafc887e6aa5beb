import numpy as np
import pytest
from PIL import Image

from pipeline.core.errors import InputError
from pipeline.core.io import atomic_open, read_image, read_mask, write_mask
from pipeline.data.manifest import default_palette


def test_mask_round_trip_through_a_palette_png(tmp_path):
    mask = np.array([[0, 1, 2], [255, 2, 0]], dtype=np.uint8)
    write_mask(tmp_path / "m.png", mask, default_palette(3))
    assert Image.open(tmp_path / "m.png").mode == "P"
    assert np.array_equal(read_mask(tmp_path / "m.png", num_classes=2), mask)


def test_mask_values_outside_the_classes(tmp_path):
    write_mask(tmp_path / "m.png", np.array([[0, 7]], dtype=np.uint8), default_palette(3))
    with pytest.raises(InputError, match=r"m\.png: mask values \[7\] are outside 0..2 and 255"):
        read_mask(tmp_path / "m.png", num_classes=2)


@pytest.mark.parametrize("mode, message", [("L", "mode 'L'"), ("RGBA", "mode 'RGBA'"), ("I;16", "mode 'I;16'")])
def test_wrong_image_modes(tmp_path, mode, message):
    Image.new(mode, (4, 3)).save(tmp_path / "x.png")
    with pytest.raises(InputError, match=message):
        read_image(tmp_path / "x.png")


def test_truncated_and_missing_images(tmp_path):
    Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / "x.jpg")
    data = (tmp_path / "x.jpg").read_bytes()
    (tmp_path / "x.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"x\.jpg: cannot read image"):
        read_image(tmp_path / "x.jpg")
    with pytest.raises(InputError, match=r"y\.jpg: file not found"):
        read_image(tmp_path / "y.jpg")


def test_atomic_writes_keep_an_old_file_on_failure_and_get_the_usual_permissions(tmp_path):
    target = tmp_path / "page.html"
    with atomic_open(target) as handle:
        handle.write("first")
    with pytest.raises(RuntimeError), atomic_open(target) as handle:
        handle.write("half")
        raise RuntimeError("killed")
    assert target.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["page.html"]
    plain = tmp_path / "plain"
    plain.write_text("")
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777

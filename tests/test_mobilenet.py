"""The MobileNetV2 backbone: torchvision's ImageNet file loads strictly, its pixels are read the way
the network was trained on, and dilation keeps the features it had."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from skimage.data import chelsea

from pipeline.data.datasets import normalize
from pipeline.models import CAMNet, build_backbone, fold_batch_norms, read_weights

WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights" / "mobilenet_v2-b0353104.pth"
IMAGENET_CATS = range(281, 286)
"""ImageNet's domestic cat classes: tabby, tiger cat, Persian, Siamese, Egyptian cat."""

needs_weights = pytest.mark.skipif(
    not WEIGHTS.is_file(), reason=f"torchvision's ImageNet MobileNetV2 is not at {WEIGHTS}"
)


def _imagenet_logits(backbone: torch.nn.Module, head: dict[str, torch.Tensor], image: np.ndarray) -> torch.Tensor:
    """The file's own 1000-way head on the pooled features of ``image`` read as the stages read it."""
    batch = torch.from_numpy(normalize(image))[None]
    with torch.inference_mode():
        pooled = backbone(batch).mean(dim=(2, 3))
    return pooled @ head["classifier.1.weight"].T + head["classifier.1.bias"]


@needs_weights
@pytest.mark.parametrize("output_stride", [32, 16, 8])
def test_imagenet_file_loads_strictly_and_sees_a_cat(output_stride):
    backbone = fold_batch_norms(build_backbone("mobilenet_v2", WEIGHTS, output_stride))
    state = read_weights(WEIGHTS, "")
    photo = np.asarray(Image.fromarray(chelsea()).resize((224, 224), Image.Resampling.BILINEAR))
    logits = _imagenet_logits(backbone, state, photo)
    assert logits.argmax().item() in IMAGENET_CATS
    if output_stride == 32:  # undilated: torchvision's own network, to float rounding
        reference = torchvision.models.mobilenet_v2(weights=None).eval()
        reference.load_state_dict(state)
        with torch.inference_mode():
            expected = reference(torch.from_numpy(normalize(photo))[None])
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-3)


@needs_weights
def test_every_key_but_the_imagenet_head_is_loaded():
    state = read_weights(WEIGHTS, "")
    backbone = build_backbone("mobilenet_v2", WEIGHTS, 8)
    own = backbone.state_dict()
    assert sorted(own) == sorted(key for key in state if not key.startswith("classifier."))
    for key, value in own.items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize(("output_stride", "step"), [(16, 2), (8, 4)])
def test_dilation_keeps_the_undilated_features_a_trous(output_stride, step):
    torch.manual_seed(0)
    plain = build_backbone("mobilenet_v2", output_stride=32).eval()
    dilated = build_backbone("mobilenet_v2", output_stride=output_stride).eval()
    dilated.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 64, 96)
    with torch.inference_mode():
        coarse, fine = plain(images), dilated(images)
    assert fine.shape[-2:] == (64 // output_stride, 96 // output_stride)
    torch.testing.assert_close(fine[..., ::step, ::step], coarse, rtol=1e-4, atol=1e-4)


def test_a_classifier_on_mobilenet_folds_to_the_same_cams():
    net = CAMNet(build_backbone("mobilenet_v2", output_stride=16), num_classes=4, freeze_bn=True)
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected, cams = net.eval().cams(images), fold_batch_norms(net).cams(images)
    torch.testing.assert_close(cams, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())

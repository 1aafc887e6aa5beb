"""Training as RRM's and PSA's code runs it: online mining from the training pass itself, its
scales fused on the scale-1 grid, minable padding, and the frozen first blocks of PSA's classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.core.distributed import Distributed
from pipeline.core.io import IGNORE
from pipeline.core.run import RunParams
from pipeline.data.datasets import MEAN_COLOUR, normalize
from pipeline.method.cams import select_and_normalise
from pipeline.method.prune import PruneParams, prune_image
from pipeline.models import SegNet, build_backbone
from pipeline.train.classifier import ClassifierParams, build_classifier, train_classifier
from pipeline.train.miner import Miner, fused_cams
from pipeline.train.segment import SegmentParams, train_segmentation
from pipeline.train.segnet import build_segnet


def plain_fusion(cam_fn, images, cams, scales):
    """The reference's fusion, written out: each scale's CAMs from the images resized by
    int(size * scale), resized to the scale-1 CAM grid, averaged there."""
    height, width = images.shape[-2:]
    maps = []
    for scale in scales:
        if scale == 1.0:
            maps.append(cams)
            continue
        scaled = F.interpolate(images, size=(int(height * scale), int(width * scale)), mode="bilinear",
                               align_corners=False)
        maps.append(F.interpolate(cam_fn(scaled), size=cams.shape[-2:], mode="bilinear", align_corners=False))
    return sum(maps) / len(maps)


def test_scales_are_fused_on_the_scale_1_grid_as_the_reference_does():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, stride=4, padding=1)

    def cam_fn(images):
        return F.relu(conv(images))

    images = torch.randn(2, 3, 37, 45)
    cams = cam_fn(images)
    scales = (1.0, 0.5, 1.5, 2.0)
    fused = fused_cams(cam_fn, images, cams, scales)
    assert fused.shape == cams.shape == (2, 4, 10, 12)
    torch.testing.assert_close(fused, plain_fusion(cam_fn, images, cams, scales))


def crop_with_padding() -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """A 24x24 crop: a red object on grey, columns 14.. padding in the mean colour; tagged class 1."""
    rgb = np.full((24, 24, 3), 90, dtype=np.uint8)
    rgb[4:20, 2:14] = (200, 30, 30)
    rgb[:, 14:] = MEAN_COLOUR
    batch = {"image": torch.from_numpy(normalize(rgb))[None], "rgb": torch.from_numpy(rgb.transpose(2, 0, 1))[None],
             "labels": torch.tensor([[0.0, 1.0]]), "valid": torch.ones(1, 24, 24)}
    batch["valid"][0, :, 14:] = 0
    return rgb, batch


class NoOtherPass(SegNet):
    def cams(self, images):
        raise AssertionError("with scale 1.0 alone the miner needs no other pass")


@pytest.mark.parametrize("backend", ["pydensecrf", "torch"])
def test_the_miner_labels_from_the_cams_of_the_training_pass_and_mines_the_padding(backend):
    rgb, batch = crop_with_padding()
    cams = torch.zeros(1, 2, 6, 6)
    cams[0, 1, 1:5, 0:3] = 1.0  # class 1 fires on the object, at stride 4
    params = PruneParams(crf_backend=backend)
    miner = Miner(params, (1.0,), workers=1, device=torch.device("cpu"))
    try:
        labels = miner(NoOtherPass(build_backbone("small"), 2, freeze_bn=False), batch, cams)
    finally:
        miner.close()
    upsampled = F.interpolate(cams, size=(24, 24), mode="bilinear", align_corners=False)[0]
    expected = prune_image(rgb, select_and_normalise(upsampled, [1]).numpy(), np.array([1]), params)
    np.testing.assert_array_equal(labels[0].numpy(), expected)
    padding = batch["valid"][0].numpy() == 0
    assert (labels[0].numpy()[padding] == 0).any()  # padded pixels can be reliable background
    assert labels.dtype == torch.int64 and set(np.unique(labels)) <= {0, 2, IGNORE}


def test_the_other_scales_leave_the_running_statistics_of_batch_norm_alone():
    net = SegNet(build_backbone("small"), 2, freeze_bn=False).train()
    before = {name: value.clone() for name, value in net.state_dict().items() if "running" in name}
    _, batch = crop_with_padding()
    miner = Miner(PruneParams(), (1.0, 0.5, 2.0), workers=1, device=torch.device("cpu"))
    try:
        miner(net, batch, net(batch["image"]).cams)
    finally:
        miner.close()
    after = net.state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in before)  # the training pass's own update
    net_again = SegNet(build_backbone("small"), 2, freeze_bn=False).train()
    net_again.load_state_dict({**net.state_dict(), **before})
    net_again(batch["image"])
    for name in before:  # ... is all that changed them
        torch.testing.assert_close(after[name], net_again.state_dict()[name])


def test_end_to_end_mines_from_the_cams_of_the_training_pass_in_train_mode(tiny_manifest, tmp_path, monkeypatch):
    forwards, mined = [], []
    forward = SegNet.forward

    def recording_forward(self, images):
        output = forward(self, images)
        forwards.append(output)
        return output

    def recording_miner(self, net, batch, cams):
        mined.append((cams, net.training))
        return torch.full((len(batch["id"]), *batch["rgb"].shape[-2:]), IGNORE, dtype=torch.long)

    monkeypatch.setattr(SegNet, "forward", recording_forward)
    monkeypatch.setattr(Miner, "__call__", recording_miner)
    params = SegmentParams(mode="end_to_end", crop_size=16, batch_size=2, steps=2)
    train_segmentation(tiny_manifest, "train", ClassifierParams(), params, PruneParams(), None, None,
                       tmp_path / "segment.pth", tmp_path / "state.pt", Distributed(), torch.device("cpu"),
                       RunParams(loader_workers=0, workers=1), progress=False)
    assert len(mined) == len(forwards) == 2
    for (cams, training), output in zip(mined, forwards, strict=True):
        assert cams is output.cams and training  # the very tensor of that pass, the network training


def test_frozen_modules_do_not_train_and_take_no_weight_decay(tiny_manifest, tmp_path):
    params = ClassifierParams(crop_size=16, batch_size=2, steps=3, frozen=("layers.0",))
    torch.manual_seed(params.seed)  # the initial network train_classifier builds
    before = {name: value.clone() for name, value in build_classifier(params, 3).state_dict().items()}
    net = train_classifier(tiny_manifest, "train", params, tmp_path / "c.pth", tmp_path / "state.pt", Distributed(),
                           torch.device("cpu"), RunParams(loader_workers=0), progress=False)
    after = net.state_dict()
    frozen = [name for name in after if name.startswith("backbone.layers.0.")]
    trained = [name for name in after if name.startswith("backbone.layers.1.") and name.endswith("weight")]
    assert frozen and all(torch.equal(before[name], after[name]) for name in frozen)  # batch norm statistics too
    assert trained and not all(torch.equal(before[name], after[name]) for name in trained)
    optimised = {id(p) for group in params.optimizer(net).param_groups for p in group["params"]}
    assert not any(id(p) in optimised for p in net.backbone.layers[0].parameters())


def test_psa_s_frozen_blocks_are_resnet38_modules_and_unknown_ones_are_refused():
    params = ClassifierParams(backbone="resnet38", frozen=("conv1a", "b2", "b2_1", "b2_2"))
    with torch.device("meta"):
        net = build_classifier(params, 20)
    frozen = [name for name, p in net.named_parameters() if not p.requires_grad]
    assert frozen and all(name.split(".")[1] in params.frozen for name in frozen)
    with pytest.raises(ValueError, match=r"no module 'b9' in the ResNet38 backbone \(its modules: conv1a, b2,"):
        ClassifierParams(backbone="resnet38", frozen=("b9",))


def test_resize_long_replaces_scale_range_rather_than_compounding_it():
    with pytest.raises(ValueError, match="with resize_long, set scale_range: \\[1.0, 1.0\\]"):
        ClassifierParams(resize_long=(256, 512))
    assert ClassifierParams(resize_long=(256, 512), scale_range=(1.0, 1.0)).augmentation().resize_long == (256, 512)


def test_mining_scales_must_hold_the_training_pass_s_own():
    with pytest.raises(ValueError, match="must hold 1.0"):
        SegmentParams(mining_scales=(0.5, 1.5))


def test_the_segment_network_starts_from_a_whole_checkpoint_in_rrm_s_flat_layout(tmp_path):
    trained = SegNet(build_backbone("small"), 3, freeze_bn=False)
    flat = {key.removeprefix("backbone."): value for key, value in trained.state_dict().items()}
    assert "fc8_seg_conv2.weight" in flat and "layers.0.0.weight" in flat
    torch.save(flat, tmp_path / "released.pth")
    net = build_segnet(ClassifierParams(), 3, None, tmp_path / "released.pth")
    for name, value in trained.state_dict().items():
        assert torch.equal(net.state_dict()[name], value), name


def test_the_classifier_part_of_a_segmentation_network_serves_as_classifier_checkpoint(tmp_path):
    joint = SegNet(build_backbone("small"), 3, freeze_bn=False)
    torch.save({key.removeprefix("backbone."): value for key, value in joint.state_dict().items()},
               tmp_path / "RRM_final.pth")
    net = build_classifier(ClassifierParams(checkpoint=str(tmp_path / "RRM_final.pth")), 3)
    assert set(net.state_dict()) == {key for key in joint.state_dict() if not key.startswith("fc8_seg")}
    for name, value in net.state_dict().items():
        assert torch.equal(value, joint.state_dict()[name]), name

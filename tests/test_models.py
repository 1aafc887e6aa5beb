"""Backbones, networks and weights: PSA/RRM checkpoints, MXNet files, torchvision files, shapes."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from pipeline.core.errors import InputError
from pipeline.models import (
    CAMNet,
    SegNet,
    build_backbone,
    fold_batch_norms,
    load_backbone_weights,
    load_checkpoint,
    param_groups,
    read_weights,
    save_checkpoint,
    seg_dilation,
)
from pipeline.models.mxnet import read_ndarray_file
from pipeline.models.resnet38 import mxnet_to_psa

# --- PSA's ResNet-38 (network/resnet38d.py, resnet38_cls.py) and RRM's heads (network/RRM.py) ---

PSA_BLOCKS = [
    # name, input, middle, output channels; a projection shortcut where the shape changes
    ("b2", 64, 128, 128), ("b2_1", 128, 128, 128), ("b2_2", 128, 128, 128),
    ("b3", 128, 256, 256), ("b3_1", 256, 256, 256), ("b3_2", 256, 256, 256),
    ("b4", 256, 512, 512), ("b4_1", 512, 512, 512), ("b4_2", 512, 512, 512),
    ("b4_3", 512, 512, 512), ("b4_4", 512, 512, 512), ("b4_5", 512, 512, 512),
    ("b5", 512, 512, 1024), ("b5_1", 1024, 512, 1024), ("b5_2", 1024, 512, 1024),
]  # fmt: skip
PSA_BOTTLENECKS = [("b6", 1024, 2048), ("b7", 2048, 4096)]
BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


def _bn(name: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.{field}": (channels,) for field in BN_FIELDS}


def psa_resnet38_shapes() -> dict[str, tuple[int, ...]]:
    """PSA's resnet38d state dict (without num_batches_tracked, as PyTorch 0.4.0 saved it)."""
    shapes = {"conv1a.weight": (64, 3, 3, 3)}
    for name, cin, mid, cout in PSA_BLOCKS:
        shapes |= _bn(f"{name}.bn_branch2a", cin)
        shapes[f"{name}.conv_branch2a.weight"] = (mid, cin, 3, 3)
        shapes |= _bn(f"{name}.bn_branch2b1", mid)
        shapes[f"{name}.conv_branch2b1.weight"] = (cout, mid, 3, 3)
        if cin != cout:
            shapes[f"{name}.conv_branch1.weight"] = (cout, cin, 1, 1)
    for name, cin, cout in PSA_BOTTLENECKS:
        shapes |= _bn(f"{name}.bn_branch2a", cin)
        shapes[f"{name}.conv_branch2a.weight"] = (cout // 4, cin, 1, 1)
        shapes |= _bn(f"{name}.bn_branch2b1", cout // 4)
        shapes[f"{name}.conv_branch2b1.weight"] = (cout // 2, cout // 4, 3, 3)
        shapes |= _bn(f"{name}.bn_branch2b2", cout // 2)
        shapes[f"{name}.conv_branch2b2.weight"] = (cout, cout // 2, 1, 1)
        shapes[f"{name}.conv_branch1.weight"] = (cout, cin, 1, 1)
    return shapes | _bn("bn7", 4096)


CLS_HEAD = {"fc8.weight": (20, 4096, 1, 1)}
RRM_HEAD = {
    "fc8_seg_conv1.weight": (512, 4096, 3, 3),
    "fc8_seg_conv1.bias": (512,),
    "fc8_seg_conv2.weight": (21, 512, 3, 3),
    "fc8_seg_conv2.bias": (21,),
}


def tagged(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """One constant per tensor (its position), as expanded views: a 100M-parameter dict for free."""
    return {key: torch.tensor(float(i)).expand(shape) for i, (key, shape) in enumerate(shapes.items())}


def ends(tensor: torch.Tensor) -> tuple[float, float]:
    return tensor[(0,) * tensor.ndim].item(), tensor[(-1,) * tensor.ndim].item()


def assert_loaded(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Each tensor holds the constant it was given (its ends are checked: copies are all or nothing)."""
    for key, value in expected.items():
        assert ends(state[key]) == ends(value), key


def nested(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PSA's keys as our networks name them: heads as in PSA, the backbone under ``backbone``."""
    return {key if key.startswith("fc8") else f"backbone.{key}": value for key, value in state.items()}


@pytest.fixture(scope="module")
def resnet38_segnet() -> SegNet:
    """Built once (ResNet-38 has about 105M parameters) and left uninitialised, which is free:
    the tests that read its values load them first."""
    with torch.device("meta"):
        net = SegNet(build_backbone("resnet38"), num_classes=20, freeze_bn=True)
    return net.to_empty(device="cpu")


def test_resnet38_has_psa_names_and_shapes(resnet38_segnet):
    ours = {
        key: tuple(value.shape)
        for key, value in resnet38_segnet.backbone.state_dict().items()
        if not key.endswith("num_batches_tracked")
    }
    assert ours == psa_resnet38_shapes()


def test_psa_classifier_checkpoint_loads_strictly(resnet38_segnet, tmp_path):
    psa_state = tagged(psa_resnet38_shapes() | CLS_HEAD)
    torch.save(psa_state, tmp_path / "res38_cls.pth")
    net = CAMNet(resnet38_segnet.backbone, num_classes=20, freeze_bn=True)
    load_checkpoint(net, tmp_path / "res38_cls.pth")
    assert_loaded(net.state_dict(), nested(psa_state))


def test_rrm_checkpoint_loads_strictly_into_segnet(resnet38_segnet, tmp_path):
    rrm_state = tagged(psa_resnet38_shapes() | CLS_HEAD | RRM_HEAD)
    torch.save(rrm_state, tmp_path / "RRM_final.pth")
    load_checkpoint(resnet38_segnet, tmp_path / "RRM_final.pth")
    assert_loaded(resnet38_segnet.state_dict(), nested(rrm_state))


def test_checkpoint_of_another_class_count_is_refused(resnet38_segnet, tmp_path):
    shapes = psa_resnet38_shapes() | {"fc8.weight": (6, 4096, 1, 1)}
    torch.save(tagged(shapes), tmp_path / "cls6.pth")
    net = CAMNet(resnet38_segnet.backbone, num_classes=20, freeze_bn=True)
    with pytest.raises(InputError, match=r"1 of another shape \(fc8.weight \(6, 4096, 1, 1\) in the file"):
        load_checkpoint(net, tmp_path / "cls6.pth")


@pytest.mark.parametrize(
    ("name", "output_stride", "features"),
    [
        ("resnet38", 8, (1, 4096, 8, 6)),
        ("resnet38", 16, (1, 4096, 4, 3)),
        ("resnet50", 8, (1, 2048, 8, 6)),
        ("resnet50", 16, (1, 2048, 4, 3)),
        ("resnet101", 8, (1, 2048, 8, 6)),
        ("mobilenet_v2", 8, (1, 1280, 8, 6)),
        ("mobilenet_v2", 16, (1, 1280, 4, 3)),
        ("mobilenet_v2", 32, (1, 1280, 2, 2)),
        ("small", 8, (1, 96, 8, 6)),
    ],
)
def test_output_stride(name, output_stride, features):
    """Shapes only, on the meta device: no memory, no arithmetic."""
    with torch.device("meta"):
        backbone = build_backbone(name, output_stride=output_stride).eval()
        assert backbone(torch.empty(1, 3, 64, 48)).shape == features
    assert backbone.out_channels == features[1]


# --- MXNet's NDArray list format, written here from its description ---

MXNET_FLAGS = {np.dtype("float32"): 0, np.dtype("float64"): 1, np.dtype("float16"): 2, np.dtype("int64"): 6}


def write_mxnet(path: Path, arrays: dict[str, np.ndarray], version: str = "v2") -> None:
    with path.open("wb") as handle:
        handle.write(struct.pack("<QQQ", 0x112, 0, len(arrays)))
        for array in arrays.values():
            if version == "v2":
                handle.write(struct.pack(f"<IiI{array.ndim}q", 0xF993FAC9, 0, array.ndim, *array.shape))
            elif version == "v3":
                handle.write(struct.pack(f"<Iii{array.ndim}q", 0xF993FACA, 0, array.ndim, *array.shape))
            elif version == "v1":
                handle.write(struct.pack(f"<II{array.ndim}q", 0xF993FAC8, array.ndim, *array.shape))
            else:
                handle.write(struct.pack(f"<I{array.ndim}I", array.ndim, *array.shape))
            handle.write(struct.pack("<iii", 1, 0, MXNET_FLAGS[array.dtype]))
            handle.write(array.astype(array.dtype.newbyteorder("<")).tobytes())
        handle.write(struct.pack("<Q", len(arrays)))
        for name in arrays:
            handle.write(struct.pack("<Q", len(name.encode())) + name.encode())


@pytest.mark.parametrize("version", ["v2", "v3", "v1", "legacy"])
def test_mxnet_reader_round_trip(tmp_path, version):
    rng = np.random.default_rng(0)
    arrays = {
        "arg:res2a_branch2a_weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "aux:bn2a_branch2a_moving_var": rng.random(4).astype(np.float16),
        "arg:steps": np.arange(6, dtype=np.int64).reshape(2, 3),
    }
    write_mxnet(tmp_path / "w.params", arrays, version)
    read = read_ndarray_file(tmp_path / "w.params")
    assert list(read) == list(arrays)
    for name, array in arrays.items():
        assert read[name].dtype == array.dtype
        np.testing.assert_array_equal(read[name], array)


def test_mxnet_reader_errors_name_the_file(tmp_path):
    (tmp_path / "bad.params").write_bytes(struct.pack("<QQQ", 0x113, 0, 0))
    with pytest.raises(InputError, match=r"bad\.params: .*not an MXNet NDArray file"):
        read_ndarray_file(tmp_path / "bad.params")
    write_mxnet(tmp_path / "cut.params", {"arg:w": np.ones((64, 64), np.float32)})
    data = (tmp_path / "cut.params").read_bytes()
    (tmp_path / "cut.params").write_bytes(data[:100])
    with pytest.raises(InputError, match=r"cut\.params: .*truncated"):
        read_ndarray_file(tmp_path / "cut.params")


def test_mxnet_names_become_psa_names():
    weight, mean = torch.zeros(1), torch.ones(1)
    renamed = mxnet_to_psa(
        {
            "arg:conv1a_weight": weight,
            "arg:res2a_branch1_weight": weight,
            "arg:res4b5_branch2b1_weight": weight,
            "aux:bn5b2_branch2a_moving_mean": mean,
            "arg:bn6a_branch2b2_gamma": weight,
            "arg:bn7_beta": weight,
            "arg:linear1000_weight": weight,
            "arg:linear1000_bias": weight,
            "arg:something_else": weight,
        }
    )
    assert list(renamed) == [
        "conv1a.weight",
        "b2.conv_branch1.weight",
        "b4_5.conv_branch2b1.weight",
        "b5_2.bn_branch2a.running_mean",
        "b6.bn_branch2b2.weight",
        "bn7.bias",
        "arg:something_else",
    ]


def mxnet_name(psa_key: str) -> str:
    """The ImageNet ResNet-38's MXNet name for a PSA key, e.g. b4_3.bn_branch2a.running_mean ->
    aux:bn4b3_branch2a_moving_mean."""
    module, field = psa_key.rsplit(".", 1)
    bn_field = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_var"}
    prefix = "aux" if field.startswith("running") else "arg"
    if module in ("conv1a", "bn7"):
        return f"{prefix}:{module}_{bn_field[field] if module == 'bn7' else field}"
    block, layer = module.split(".")
    stage, _, index = block[1:].partition("_")
    unit = f"{stage}b{index}" if index else f"{stage}a"
    kind, branch = layer.split("_", 1)
    if kind == "conv":
        return f"arg:res{unit}_{branch}_weight"
    return f"{prefix}:bn{unit}_{branch}_{bn_field[field]}"


def test_imagenet_params_file_loads_into_resnet38(resnet38_segnet, tmp_path):
    """A full-size file in float16 (half the bytes); every tensor gets its own constant."""
    expected = tagged(psa_resnet38_shapes())
    arrays = {
        mxnet_name(key): np.full(value.shape, ends(value)[0], np.float16) for key, value in expected.items()
    }
    arrays["arg:linear1000_weight"] = np.zeros((1000, 4096), np.float16)
    arrays["arg:linear1000_bias"] = np.zeros(1000, np.float16)
    write_mxnet(tmp_path / "ilsvrc-cls_rna-a1_cls1000_ep-0001.params", arrays)
    del arrays
    backbone = resnet38_segnet.backbone
    load_backbone_weights(backbone, "resnet38", tmp_path / "ilsvrc-cls_rna-a1_cls1000_ep-0001.params")
    assert_loaded(backbone.state_dict(), expected)


# --- torchvision ResNets ---


def test_torchvision_resnet50_file_loads(tmp_path):
    with torch.device("meta"):
        reference = torchvision.models.resnet50(weights=None).state_dict()
    file_state = tagged({key: tuple(value.shape) for key, value in reference.items()})
    torch.save(file_state, tmp_path / "resnet50-0676ba61.pth")
    backbone = build_backbone("resnet50", tmp_path / "resnet50-0676ba61.pth")
    without_classifier = {key: value for key, value in file_state.items() if not key.startswith("fc.")}
    assert_loaded(backbone.state_dict(), without_classifier)


# --- errors that say what to do ---


@pytest.mark.parametrize(
    ("name", "file", "advice"),
    [
        ("resnet38", "init.params", "ilsvrc-cls_rna-a1_cls1000_ep-0001.params"),
        ("resnet50", "r50.pth", "resnet50-0676ba61.pth"),
        ("resnet101", "r101.pth", "resnet101-63fe2227.pth"),
    ],
)
def test_missing_weights_file_says_what_to_put_there(tmp_path, name, file, advice):
    with pytest.raises(InputError, match=rf"{file}: weights file not found; put .*{advice}") as error:
        build_backbone(name, tmp_path / file)
    assert "\n" not in str(error.value)


def test_keys_that_do_not_fit_are_listed_with_counts(tmp_path):
    state = build_backbone("small").state_dict()
    state.pop("layers.0.0.weight")
    state["layers.9.weight"] = torch.zeros(3)
    state["layers.0.1.bias"] = torch.zeros(7)
    for extra in range(5):
        state[f"extra{extra}"] = torch.zeros(1)
    torch.save(state, tmp_path / "small.pth")
    with pytest.raises(InputError) as error:
        build_backbone("small", tmp_path / "small.pth")
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'small.pth'}: weights do not fit the small backbone")
    assert "1 missing (layers.0.0.weight)" in message
    assert "6 unexpected (layers.9.weight, extra0, extra1, extra2, ...)" in message
    assert "1 of another shape (layers.0.1.bias (7,) in the file, (24,) in the network)" in message


def test_unreadable_weights_are_input_errors(tmp_path):
    (tmp_path / "noise.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=r"noise\.pth: cannot read PyTorch weights"):
        read_weights(tmp_path / "noise.pth", "")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(InputError, match=r"list\.pth: not a state dict"):
        read_weights(tmp_path / "list.pth", "")
    (tmp_path / "w.h5").write_bytes(b"")
    with pytest.raises(InputError, match=r"w\.h5: unknown weights format '\.h5'"):
        read_weights(tmp_path / "w.h5", "")


def test_bad_backbone_name_or_stride():
    known = r"unknown backbone \(known: resnet38, resnet50, resnet101, mobilenet_v2, small\)"
    with pytest.raises(InputError, match=known):
        build_backbone("vgg16")
    with pytest.raises(InputError, match=r"backbone 'resnet50': .*not 32"):
        build_backbone("resnet50", output_stride=32)
    with pytest.raises(InputError, match=r"backbone 'small': .*output stride 8 only"):
        build_backbone("small", output_stride=16)


# --- networks on the small backbone ---


def small_segnet(freeze_bn: bool = False) -> SegNet:
    torch.manual_seed(0)
    return SegNet(build_backbone("small"), num_classes=6, freeze_bn=freeze_bn)


def test_small_backbone_stride_size_and_receptive_field():
    torch.manual_seed(0)
    backbone = build_backbone("small").eval()
    assert 100_000 < sum(p.numel() for p in backbone.parameters()) < 1_000_000
    images = torch.randn(1, 3, 160, 160, requires_grad=True)
    features = backbone(images)
    assert features.shape == (1, backbone.out_channels, 20, 20)
    features[0, :, 10, 10].sum().backward()
    seen = (images.grad.abs().sum(dim=1)[0] > 0).nonzero()
    assert (seen.max(dim=0).values - seen.min(dim=0).values + 1).tolist() == [103, 103]


def test_stages_on_the_small_backbone_start_without_torchvision():
    """Importing torchvision (torch._dynamo, through torchvision.ops) takes seconds of every stage's
    start; only a torchvision backbone, DeepLab's head or colour jitter loads it (so a switched-off
    deeplab or supervised stage does not)."""
    code = ("import sys; from stages import classifier, cams, prune, segment, deeplab, supervised, overlays; "
            "from pipeline.models import SegNet, build_backbone; SegNet(build_backbone('small'), 3, freeze_bn=False); "
            "print(sorted(name for name in sys.modules if name.startswith('torchvision')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_camnet_logits_are_pooled_cams_before_relu():
    torch.manual_seed(0)
    net = CAMNet(build_backbone("small"), num_classes=6, freeze_bn=False).eval()
    images = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        logits, cams = net(images), net.cams(images)
        raw = net.fc8(net.backbone(images))
    assert logits.shape == (2, 6)
    assert cams.shape == (2, 6, 8, 6)
    assert cams.min() >= 0
    torch.testing.assert_close(cams, raw.clamp(min=0))
    torch.testing.assert_close(logits, raw.mean(dim=(2, 3)))


def test_segnet_gives_logits_cams_and_segmentation_in_one_pass():
    net = small_segnet().eval()
    images = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        logits, cams, seg = net(images)
        torch.testing.assert_close(seg, net.segment(images))
        torch.testing.assert_close(cams, net.cams(images))
    assert (logits.shape, cams.shape, seg.shape) == ((2, 6), (2, 6, 8, 6), (2, 7, 8, 6))
    assert net.fc8_seg_conv1.dilation == (12, 12) and net.fc8_seg_conv1.out_channels == 512


@pytest.mark.parametrize(("output_stride", "dilation"), [(8, 12), (16, 6), (32, 3)])
def test_segmentation_head_reaches_as_far_at_every_output_stride(output_stride, dilation):
    assert seg_dilation(output_stride) == dilation
    net = SegNet(build_backbone("small"), num_classes=2, freeze_bn=False, dilation=dilation)
    assert net.fc8_seg_conv1.dilation == net.fc8_seg_conv2.dilation == (dilation, dilation)


def _centre_only(features: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    return F.conv2d(features, conv.weight[:, :, 1:2, 1:2], conv.bias)


def test_outer_taps_of_the_head_start_at_zero_and_learn_where_they_see_features():
    net = small_segnet()
    for conv in (net.fc8_seg_conv1, net.fc8_seg_conv2):
        outer = conv.weight.clone()
        outer[:, :, 1, 1] = 0
        assert not outer.any() and conv.weight[:, :, 1, 1].any()
    small, large = torch.randn(1, 3, 96, 96), torch.randn(1, 3, 256, 256)  # 12x12 and 32x32 features
    with torch.no_grad():  # as started, the head is two 1x1 convolutions, on any image
        features = net.backbone(large)
        expected = _centre_only(F.relu(_centre_only(features, net.fc8_seg_conv1)), net.fc8_seg_conv2)
        torch.testing.assert_close(net.seg_from(features), expected)
    for images, trained in ((small, False), (large, True)):  # 96-pixel crops never train the outer taps
        net.zero_grad()
        net.segment(images).square().sum().backward()
        grad = net.fc8_seg_conv1.weight.grad.clone()
        grad[:, :, 1, 1] = 0
        assert bool(grad.any()) is trained


def test_segnet_starts_from_a_classifier_checkpoint(tmp_path):
    classifier = CAMNet(build_backbone("small"), num_classes=6, freeze_bn=False)
    save_checkpoint(classifier, tmp_path / "classifier.pth")
    net = small_segnet()
    head = net.fc8_seg_conv2.weight.clone()
    with pytest.raises(InputError, match=r"4 missing \(fc8_seg_conv1.weight, fc8_seg_conv1.bias"):
        load_checkpoint(net, tmp_path / "classifier.pth")
    load_checkpoint(net, tmp_path / "classifier.pth", allow_missing=SegNet.seg_head)
    torch.testing.assert_close(net.fc8.weight, classifier.fc8.weight)
    torch.testing.assert_close(net.backbone.state_dict(), classifier.backbone.state_dict())
    torch.testing.assert_close(net.fc8_seg_conv2.weight, head)


def test_a_classifier_checkpoint_serves_as_backbone_weights(tmp_path):
    classifier = CAMNet(build_backbone("small"), num_classes=6, freeze_bn=False)
    save_checkpoint(classifier, tmp_path / "classifier.pth")
    backbone = build_backbone("small", tmp_path / "classifier.pth")
    torch.testing.assert_close(backbone.state_dict(), classifier.backbone.state_dict())
    with pytest.raises(InputError, match="weights do not fit the resnet50 backbone: .* missing"):
        build_backbone("resnet50", tmp_path / "classifier.pth")


def test_frozen_batchnorm_stays_frozen_through_train():
    net = small_segnet(freeze_bn=True).train()
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in norms]
    net(torch.randn(2, 3, 64, 64))
    assert not any(m.training for m in norms)
    assert not any(p.requires_grad for m in norms for p in m.parameters())
    assert all(torch.equal(m.running_mean, b) for m, b in zip(norms, before, strict=True))


def test_trained_batchnorm_updates_its_statistics():
    net = small_segnet(freeze_bn=False).train()
    norm = net.backbone.layers[0][1]
    before = norm.running_mean.clone()
    net(torch.randn(2, 3, 64, 64))
    assert norm.training and norm.weight.requires_grad
    assert not torch.equal(norm.running_mean, before)


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_param_groups_cover_trainable_parameters_once(freeze_bn):
    net = small_segnet(freeze_bn)
    groups = param_groups(net, lr=0.01, weight_decay=1e-4)
    grouped = [id(p) for group in groups for p in group["params"]]
    trainable = [id(p) for p in net.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable)
    assert len(set(grouped)) == len(grouped)
    settings = {g["name"]: (g["lr"], g["weight_decay"]) for g in groups}
    assert settings == {
        "backbone weights": (0.01, 1e-4),
        "backbone biases": (0.02, 0.0),
        "new weights": (0.1, 1e-4),
        "new biases": (0.2, 0.0),
    }
    named = {g["name"]: {id(p) for p in g["params"]} for g in groups}
    assert id(net.fc8.weight) in named["new weights"] and id(net.fc8_seg_conv1.bias) in named["new biases"]
    assert bool(named["backbone biases"]) is not freeze_bn  # trained batch-norm shifts and scales
    torch.optim.SGD(groups, lr=0.01, momentum=0.9)


def _with_random_statistics(net: nn.Module) -> nn.Module:
    """``net`` with batch norms that do something: random statistics, scales and shifts."""
    generator = torch.Generator().manual_seed(0)
    for norm in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
        for tensor, low, high in ((norm.running_mean, -1, 1), (norm.running_var, 0.5, 2),
                                  (norm.weight.data, 0.5, 1.5), (norm.bias.data, -0.5, 0.5)):
            tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)
    return net


@pytest.mark.parametrize(
    ("name", "norms_left"), [("small", 0), ("resnet50", 0), ("resnet38", 17), ("mobilenet_v2", 0)]
)
def test_folded_batch_norms_give_the_same_cams(name, norms_left):
    net = _with_random_statistics(CAMNet(build_backbone(name), num_classes=3, freeze_bn=False)).train()
    folded = fold_batch_norms(net)
    assert isinstance(folded, CAMNet) and not folded.training and net.training  # a copy; the original as it was
    # ResNet-38 is pre-activation: the norms opening the blocks after the first, and the last
    # one, follow an addition and stay.
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == norms_left
    images = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected, cams = net.eval().cams(images), folded.cams(images)
    torch.testing.assert_close(cams, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())

"""The bilateral filters against the kernel's formula, the dense energy and its gradient, and the CE."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.core.io import IGNORE
from pipeline.method.losses import (
    DENSE_ENERGY_WEIGHT,
    DenseEnergyLoss,
    bilateral_filter,
    bilateral_filter_auto,
    bilateral_filter_blockwise,
    bilateral_filter_lattice,
    bilateral_filter_sdpa,
    crop_reach,
    crop_weight,
    dense_energy,
    energy_gate,
    energy_size,
    kernel_mass,
    reliable_counts,
    segmentation_ce,
)
from pipeline.train.segment import SegmentParams

SIGMA_RGB, SIGMA_XY = 15.0, 6.0


def brute_force_filter(images: torch.Tensor, values: torch.Tensor, sigma_rgb: float, sigma_xy: float) -> torch.Tensor:
    """``W @ values`` with W written out from its formula, in float64."""
    _, _, h, w = images.shape
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    position = torch.stack([rows, cols], dim=-1).reshape(-1, 2).double()
    filtered = []
    for image, value in zip(images.double(), values.double(), strict=True):
        colour = image.reshape(3, -1).T
        xy = ((position[:, None] - position[None]) ** 2).sum(-1)
        rgb = ((colour[:, None] - colour[None]) ** 2).sum(-1)
        kernel = torch.exp(-xy / (2 * sigma_xy**2) - rgb / (2 * sigma_rgb**2))
        filtered.append((kernel @ value.reshape(len(value), -1).T).T.reshape(value.shape))
    return torch.stack(filtered)


def brute_force_energy(images, probs, valid, labels, sigma_rgb, sigma_xy) -> torch.Tensor:
    """The spec's energy term by term: S <- S R, g = max(0, R - max_k S) (1 where unknown)."""
    probs = probs.double() * valid[:, None]
    gate = valid - probs.amax(dim=1)
    gate[labels == IGNORE] = 1
    gate = gate.clamp(min=0)
    filtered = brute_force_filter(images, probs, sigma_rgb, sigma_xy)
    return -(gate[:, None] * probs * filtered).sum() / len(probs)


def random_batch(seed: int, n: int = 2, k: int = 4, h: int = 12, w: int = 14):
    """Images, softmax probabilities, a valid mask with padding at the right, labels partly 255."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, h, w, generator=generator) * 255
    probs = torch.softmax(3 * torch.randn(n, k, h, w, generator=generator), dim=1)
    valid = torch.ones(n, h, w)
    valid[..., w - 3 :] = 0
    labels = torch.randint(0, k, (n, h, w), generator=generator)
    labels[torch.rand(n, h, w, generator=generator) < 0.5] = IGNORE
    return images, probs, valid, labels


def smooth_image(h: int, w: int) -> torch.Tensor:
    """(1, 3, h, w): colour ramps with a flat disc, as in natural images' regions and edges."""
    rows, cols = torch.meshgrid(torch.arange(h) / h, torch.arange(w) / w, indexing="ij")
    image = torch.stack([60 + 120 * rows, 90 + 80 * cols, 150 - 60 * rows * cols])
    disc = (rows - 0.5) ** 2 + (cols - 0.4) ** 2 < 0.08
    return torch.where(disc, torch.tensor([220.0, 40.0, 60.0])[:, None, None], image)[None]


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return float(((result.double() - reference) / reference).abs().max())


def test_exact_filter_matches_the_kernel_formula():
    images, probs, _, _ = random_batch(0)
    expected = brute_force_filter(images, probs, SIGMA_RGB, SIGMA_XY)
    assert relative_error(bilateral_filter(images, probs, SIGMA_RGB, SIGMA_XY), expected) < 1e-4


def test_exact_filter_weighs_each_pixel_itself_by_one():
    values = torch.tensor([[[[2.0, 3.0]]]])
    black_and_white = torch.tensor([0.0, 255.0]).expand(1, 3, 1, 2)
    # colours 442 sigma_rgb apart: W is the identity
    assert torch.allclose(bilateral_filter(black_and_white, values, 1.0, 100.0), values)
    # the same colour, one sigma_xy apart: W = [[1, e^-1/2], [e^-1/2, 1]]
    grey = torch.full((1, 3, 1, 2), 128.0)
    expected = torch.tensor([2 + 3 * math.exp(-0.5), 3 + 2 * math.exp(-0.5)]).view(1, 1, 1, 2)
    assert torch.allclose(bilateral_filter(grey, values, 1.0, 1.0), expected)


@pytest.mark.parametrize("block", [7, 64, 1000])
def test_blockwise_filter_does_not_depend_on_the_block_size(block):
    images, probs, _, _ = (tensor.double() for tensor in random_batch(1))
    whole = bilateral_filter_blockwise(images, probs, SIGMA_RGB, SIGMA_XY, block=10_000)
    blocks = bilateral_filter_blockwise(images, probs, SIGMA_RGB, SIGMA_XY, block=block)
    assert torch.allclose(blocks, whole, rtol=1e-12, atol=0)


def test_attention_filter_matches_the_kernel_formula():
    images, probs, _, _ = random_batch(2)
    expected = brute_force_filter(images, probs, SIGMA_RGB, SIGMA_XY)
    assert relative_error(bilateral_filter_sdpa(images, probs, SIGMA_RGB, SIGMA_XY), expected) < 1e-4


def test_exact_filter_keeps_double_precision_and_runs_in_float32_for_half():
    images, probs, _, _ = random_batch(3)
    expected = brute_force_filter(images, probs, SIGMA_RGB, SIGMA_XY)
    result = bilateral_filter(images.double(), probs.double(), SIGMA_RGB, SIGMA_XY)
    assert result.dtype == torch.float64 and relative_error(result, expected) < 1e-10
    half = bilateral_filter(images, probs.bfloat16(), SIGMA_RGB, SIGMA_XY)
    assert half.dtype == torch.bfloat16 and relative_error(half.float(), expected) < 1e-2


@pytest.mark.parametrize(
    ("bilateral", "asymmetry"), [(bilateral_filter_blockwise, 1e-5), (bilateral_filter_lattice, 1e-3)]
)
def test_filters_are_differentiable_in_the_values_through_their_symmetry(bilateral, asymmetry):
    """The lattice's blur, axis by axis over a truncated lattice, is symmetric to about 2e-4."""
    images, probs, _, _ = random_batch(12)
    generator = torch.Generator().manual_seed(12)
    probe = torch.rand(probs.shape, generator=generator)
    probs.requires_grad_(True)
    (probe * bilateral(images, probs, SIGMA_RGB, SIGMA_XY)).sum().backward()
    filtered_probe = bilateral(images, probe, SIGMA_RGB, SIGMA_XY)
    assert torch.equal(probs.grad, filtered_probe)
    # <probe, W probs> = <W probe, probs>
    forward = (probe * bilateral(images, probs.detach(), SIGMA_RGB, SIGMA_XY)).sum()
    assert math.isclose(float(forward), float((filtered_probe * probs.detach()).sum()), rel_tol=asymmetry)


def test_lattice_approximates_the_exact_sum_on_a_smooth_image():
    """Documented in pipeline.method.lattice: mean ratio near 1, 5-7% spread per pixel, none off by 35%."""
    image = smooth_image(32, 40)
    generator = torch.Generator().manual_seed(4)
    probs = torch.softmax(2 * torch.randn(1, 3, 32, 40, generator=generator), dim=1)
    values = torch.cat([torch.ones(1, 1, 32, 40), probs], dim=1)
    ratio = bilateral_filter_lattice(image, values, 15.0, 10.0) / bilateral_filter(image, values, 15.0, 10.0)
    assert abs(float(ratio.mean()) - 1) < 0.06
    assert float(ratio.std()) < 0.08
    assert 0.75 < float(ratio.min()) and float(ratio.max()) < 1.35


def test_lattice_filters_each_image_of_a_batch_on_its_own():
    images, probs, _, _ = random_batch(5, n=3)
    batch = bilateral_filter_lattice(images, probs, SIGMA_RGB, SIGMA_XY)
    for index in range(3):
        alone = bilateral_filter_lattice(images[index : index + 1], probs[index : index + 1], SIGMA_RGB, SIGMA_XY)
        assert torch.allclose(batch[index : index + 1], alone, rtol=1e-5)


def test_auto_filter_uses_the_lattice_from_the_pixel_threshold_on():
    images, probs, _, _ = random_batch(6)
    pixels = 12 * 14
    exact = bilateral_filter(images, probs, SIGMA_RGB, SIGMA_XY)
    lattice = bilateral_filter_lattice(images, probs, SIGMA_RGB, SIGMA_XY)

    def auto(**options):
        return bilateral_filter_auto(images, probs, SIGMA_RGB, SIGMA_XY, **options)

    assert torch.equal(auto(lattice_min_pixels=pixels), lattice)
    assert torch.equal(auto(lattice_min_pixels=pixels + 1), exact)
    assert torch.equal(auto(method="exact", lattice_min_pixels=1), exact)
    assert torch.equal(auto(method="lattice", lattice_min_pixels=pixels + 1), lattice)
    with pytest.raises(ValueError, match="method='fast' is not one of auto, exact, lattice"):
        auto(method="fast")


def test_gate_is_one_on_unknown_pixels_and_zero_on_padding():
    background = torch.tensor([0.9, 0.6, 0.9, 0.9])
    probs = torch.stack([background, 1 - background]).view(1, 2, 1, 4)
    valid = torch.tensor([1.0, 1.0, 1.0, 0.0]).view(1, 1, 4)
    labels = torch.tensor([1, 0, IGNORE, 0]).view(1, 1, 4)
    # 1 - max S on labelled pixels, 1 where unknown however confident, 0 outside the image
    assert torch.allclose(energy_gate(probs, valid, labels), torch.tensor([0.1, 0.4, 1.0, 0.0]).view(1, 1, 4))


def test_dense_energy_matches_the_formula():
    images, probs, valid, labels = random_batch(7)
    energy = dense_energy(images, probs, valid, labels, SIGMA_RGB, SIGMA_XY, scale=1.0, method="exact")
    expected = brute_force_energy(images, probs, valid, labels, SIGMA_RGB, SIGMA_XY)
    assert energy.shape == () and expected < 0
    assert math.isclose(float(energy), float(expected), rel_tol=1e-5)


def test_dense_energy_gradient_is_the_references():
    """-(2/N) g (W (S R)) R with respect to S, the gate held constant."""
    images, probs, valid, labels = random_batch(8)
    probs.requires_grad_(True)
    dense_energy(images, probs, valid, labels, SIGMA_RGB, SIGMA_XY, scale=1.0, method="exact").backward()
    masked = probs.detach() * valid[:, None]
    gate = valid - masked.amax(dim=1)
    gate[labels == IGNORE] = 1
    filtered = brute_force_filter(images, masked, SIGMA_RGB, SIGMA_XY)
    expected = -2 / len(probs) * gate.clamp(min=0)[:, None] * filtered * valid[:, None]
    assert relative_error(probs.grad[expected != 0], expected[expected != 0]) < 1e-4
    assert torch.all(probs.grad[expected == 0] == 0)


def test_half_resolution_is_the_energy_of_the_halved_inputs_with_halved_sigma_xy():
    """Inputs made of 2x2 blocks halve exactly: bilinear averages a block, nearest takes its corner."""
    images, probs, valid, labels = random_batch(9, h=8, w=10)
    double = [F.interpolate(t, scale_factor=2, mode="nearest") for t in (images, probs)]
    double += [F.interpolate(t[:, None].float(), scale_factor=2, mode="nearest")[:, 0] for t in (valid, labels)]
    probs_full = double[1].requires_grad_(True)
    halved = dense_energy(double[0], probs_full, double[2], double[3].long(), SIGMA_RGB, 2 * SIGMA_XY, 0.5, "exact")
    expected = dense_energy(images, probs, valid, labels, SIGMA_RGB, SIGMA_XY, scale=1.0, method="exact")
    assert math.isclose(float(halved.detach()), float(expected), rel_tol=1e-5)
    halved.backward()
    assert probs_full.grad.shape == probs_full.shape and probs_full.grad.abs().sum() > 0


def test_dense_energy_with_the_lattice_is_close_to_the_exact_one():
    image = smooth_image(32, 40).repeat(2, 1, 1, 1)
    _, probs, valid, labels = random_batch(10, h=32, w=40)
    exact = dense_energy(image, probs, valid, labels, 15.0, 20.0, scale=1.0, method="exact")
    lattice = dense_energy(image, probs, valid, labels, 15.0, 20.0, scale=1.0, method="lattice")
    assert 0.95 < float(lattice / exact) < 1.05


def test_dense_energy_loss_is_the_weighted_energy():
    images, probs, valid, labels = random_batch(11)
    loss = DenseEnergyLoss(sigma_xy=SIGMA_XY, scale=1.0, method="exact")
    energy = dense_energy(images, probs, valid, labels, 15.0, SIGMA_XY, 1.0, "exact")
    assert loss.weight == DENSE_ENERGY_WEIGHT == 5e-8
    assert torch.isclose(loss(images, probs, valid, labels), DENSE_ENERGY_WEIGHT * energy)


def test_kernel_mass_between_its_limits():
    assert math.isclose(kernel_mass(5, 1e6), 5.0, rel_tol=1e-6)
    assert math.isclose(kernel_mass(2000, 3.0), math.sqrt(2 * math.pi) * 3.0, rel_tol=0.01)


def uniform_crop(side: int) -> tuple[torch.Tensor, ...]:
    """A one-coloured crop whose every pixel is sure of class 1, with no reliable label."""
    images = torch.full((1, 3, side, side), 120.0)
    probs = torch.zeros(1, 3, side, side)
    probs[:, 1] = 1.0
    return images, probs, torch.ones(1, side, side), torch.full((1, side, side), IGNORE)


def test_crop_weight_keeps_the_energy_of_the_reference_crop_at_any_crop_size():
    """The energy of a uniform crop is -N M; weighted by the rule it is the reference crop's."""
    sigma_xy = 100.0
    assert crop_weight(5e-8, 321, 0.5, sigma_xy) == 5e-8
    reference = -5e-8 * energy_size(321, 0.5, sigma_xy)
    for side in (40, 96):
        energy = dense_energy(*uniform_crop(side), SIGMA_RGB, sigma_xy, scale=0.5, method="exact")
        assert math.isclose(float(energy), -energy_size(side, 0.5, sigma_xy), rel_tol=1e-5)
        weighted = crop_weight(5e-8, side, 0.5, sigma_xy) * float(energy)
        assert math.isclose(weighted, reference, rel_tol=1e-5)
    assert crop_weight(5e-8, 96, 0.5, sigma_xy) > crop_weight(5e-8, 224, 0.5, sigma_xy) > 5e-8


def test_the_segment_energy_spans_the_same_share_of_any_crop_as_the_papers_kernel_of_its_crops():
    assert crop_reach(100.0, 321) == 100.0
    for crop in (96, 224):
        energy = SegmentParams(crop_size=crop).energy()
        assert math.isclose(energy.sigma_xy / crop, 100.0 / 321)
        assert energy.weight == crop_weight(5e-8, crop, 0.5, energy.sigma_xy)
    assert SegmentParams(crop_size=321).energy().weight == 5e-8


@pytest.mark.parametrize(
    "arguments", [{"weight": -1.0}, {"sigma_rgb": 0.0}, {"scale": 1.5}, {"method": "fast"}]
)
def test_dense_energy_loss_rejects_bad_parameters(arguments):
    with pytest.raises(ValueError):
        DenseEnergyLoss(**arguments)


def test_segmentation_ce_averages_background_and_foreground_separately():
    # uniform logits over 3 classes: every labelled pixel costs log 3
    logits = torch.zeros(1, 3, 1, 5)
    logits[0, 1, 0, 4] = math.log(4)  # pixel 4: p(class 1) = 4/6
    labels = torch.tensor([[[0, 0, 0, 2, 1]]])
    # background: 3 pixels at log 3; foreground: log 3 and -log(2/3), averaged over 2 pixels
    expected = math.log(3) + (math.log(3) + math.log(3 / 2)) / 2
    assert math.isclose(float(segmentation_ce(logits, labels)), expected, rel_tol=1e-6)


def test_segmentation_ce_of_two_halves_with_their_mean_counts_averages_to_the_whole_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 6, 6)
    labels = torch.randint(0, 3, (4, 6, 6))
    labels[:2, :3] = IGNORE  # the halves hold different numbers of reliable pixels
    halves = [(logits[:2], labels[:2]), (logits[2:], labels[2:])]
    counts = (reliable_counts(labels[:2]) + reliable_counts(labels[2:])) / 2  # what Distributed.average gives
    assert reliable_counts(labels).tolist() == (2 * counts).tolist()
    mean_of_halves = sum(segmentation_ce(part, part_labels, counts) for part, part_labels in halves) / 2
    assert math.isclose(float(mean_of_halves), float(segmentation_ce(logits, labels)), rel_tol=1e-6)
    own_counts = sum(segmentation_ce(part, part_labels) for part, part_labels in halves) / 2
    assert not math.isclose(float(own_counts), float(segmentation_ce(logits, labels)), rel_tol=1e-3)


def test_segmentation_ce_ignores_unknown_pixels_and_counts_an_absent_group_as_zero():
    logits = torch.zeros(1, 3, 1, 3, requires_grad=True)
    labels = torch.tensor([[[2, IGNORE, IGNORE]]])
    assert math.isclose(float(segmentation_ce(logits.detach(), labels)), math.log(3), rel_tol=1e-6)
    nothing = segmentation_ce(logits, torch.full((1, 1, 3), IGNORE))
    nothing.backward()
    assert float(nothing.detach()) == 0 and torch.all(logits.grad == 0)

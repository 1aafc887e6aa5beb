"""The refine stage's parts: affinity labels from a mask, the affinities of both kinds, the random
walk (a seed spreads inside a boundary and stops at it) and its dense reference, and the labels
it writes (only the image's tags, resumable, recorded)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.io import IGNORE
from pipeline.core.provenance import start
from pipeline.core.store import ImageStore
from pipeline.method.affinity import (
    AFFINITIES,
    affinity_loss,
    boundary_affinities,
    boundary_affinity,
    dense_transition,
    feature_affinities,
    label_grid,
    offsets,
    pair_labels,
    path,
    random_walk,
    transition_weights,
    walk_offsets,
)
from pipeline.models import CAMNet, build_backbone, save_checkpoint
from pipeline.models.affinity import LEVELS, AffinityNet
from pipeline.train.affinity import (
    build_affinity_net,
    chosen_threshold,
    held_scores,
    keep_foreground,
    refine_split,
    score_labels,
    walk_scores,
    walk_split,
    walked_labels,
    weakest_candidate,
)
from pipeline.train.classifier import ClassifierParams, build_classifier
from pipeline.train.predict import crf_labels
from pipeline.train.refine import BACKGROUND_CANDIDATES, RefineParams, refined_made_from

X = IGNORE


def test_psa_s_neighbourhood_holds_each_pair_once():
    half = offsets(5)
    assert len(half) == 34 and (0, 1) in half and (0, -1) not in half and (4, 2) in half and (4, 3) not in half
    assert len(walk_offsets(5)) == 69 and walk_offsets(5)[0] == (0, 0)
    assert {(-dy, -dx) for dy, dx in half}.isdisjoint(half)


def test_pairs_of_a_hand_made_mask():
    labels = torch.tensor([[[0, 0, 2, 2],
                            [X, 1, 1, 2]]])
    background, foreground, different = pair_labels(labels, (0, 1))  # right neighbours
    assert background.tolist() == [[[True, False, False], [False, False, False]]]
    assert foreground.tolist() == [[[False, False, True], [False, True, False]]]
    assert different.tolist() == [[[False, True, False], [False, False, True]]]  # the pair touching 255 is in none
    background, foreground, different = pair_labels(labels, (1, -1))  # down and left
    assert (background | foreground).sum() == 0 and different.tolist() == [[[False, True, True]]]


def test_the_label_grid_samples_each_cell_at_its_centre():
    labels = torch.arange(64).view(1, 8, 8)
    assert label_grid(labels, 4).tolist() == [[[18, 22], [50, 54]]]
    assert label_grid(torch.arange(30).view(1, 5, 6), 4).tolist() == [[[14, 17], [26, 29]]]  # last cells clamped


def test_feature_affinity_is_one_for_equal_features_and_falls_with_their_distance():
    features = torch.zeros(1, 2, 1, 3)
    features[0, :, 0, 2] = 3.0
    assert feature_affinities(features, (0, 1)).flatten().tolist() == pytest.approx([1.0, float(np.exp(-3))])


def test_a_boundary_on_the_line_between_two_cells_parts_them():
    assert path((0, 3)) == ((0, 0), (0, 1), (0, 2), (0, 3)) and path((2, -1)) == ((0, 0), (1, 0), (2, -1))
    logits = torch.full((1, 1, 1, 5), -20.0)
    logits[0, 0, 0, 2] = 20.0  # a wall in the middle column
    affinity = boundary_affinities(logits, (0, 1))[0, 0]
    assert affinity.tolist() == pytest.approx([1.0, 0.0, 0.0, 1.0], abs=1e-6)
    assert boundary_affinities(logits, (0, 4))[0, 0].tolist() == pytest.approx([0.0], abs=1e-6)
    assert boundary_affinities(logits, (0, 1)).shape == (1, 1, 4)


@pytest.mark.parametrize("kind", list(AFFINITIES))
def test_the_loss_pulls_same_labels_together_and_pushes_different_ones_apart(kind):
    channels, pairs = AFFINITIES[kind]
    labels = torch.tensor([[[0, 0, 0, X, 1, 1, 1]] * 4])  # unlabelled between, as in the masks
    maps = torch.randn(1, channels, 4, 7, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    optimizer = torch.optim.Adam([maps], lr=0.1)
    for _ in range(300):
        loss = affinity_loss(maps, labels, 3, pairs)
        optimizer.zero_grad()
        loss["loss"].backward()
        optimizer.step()
    with torch.no_grad():
        across, within = pairs(maps, (0, 2))[0, :, 2], pairs(maps, (0, 1))[0, :, 0]
    assert across.mean() < 0.1 and across.max() < 0.5 and within.min() > 0.9


def _wall(size: int = 12, column: int = 6) -> torch.Tensor:
    """Boundary logits of a size x size grid with a wall down one column."""
    logits = torch.full((1, 1, size, size), -20.0)
    logits[..., column] = 20.0
    return logits


def test_a_seed_spreads_inside_its_boundary_and_stops_at_it():
    weights = transition_weights(_wall(), 5, 8.0, AFFINITIES["boundary"][1])
    seed = torch.zeros(1, 1, 12, 12)
    seed[0, 0, 5, 1] = 1.0
    walked = random_walk(seed, weights, 5, 256)[0, 0]
    left, right = walked[:, :6], walked[:, 7:]
    assert right.max() < 1e-6 * left.max()  # nothing crosses the wall
    assert left.min() > 0.5 * left.max()  # the seed has spread over its whole side
    assert walked.max() < seed.max()  # each step averages


def test_the_walk_is_the_dense_matrix_applied_again_and_again():
    features = torch.randn(2, 8, 7, 9, generator=torch.Generator().manual_seed(0))
    weights = transition_weights(features, 3, 4.0, AFFINITIES["feature"][1])
    assert torch.allclose(weights.sum(dim=1), torch.ones(2, 7, 9))
    maps = torch.rand(2, 3, 7, 9, generator=torch.Generator().manual_seed(1))
    walked = random_walk(maps, weights, 3, 16)
    for image in range(2):
        matrix = dense_transition(weights[image], 3)
        expected = maps[image].reshape(3, -1)
        for _ in range(16):
            expected = expected @ matrix.T
        torch.testing.assert_close(walked[image].reshape(3, -1), expected, rtol=1e-4, atol=1e-6)


def test_the_walked_scores_are_the_cams_on_the_grid_with_psa_s_background_in_front():
    cams = torch.tensor([[[[1.0, 0.5], [0.0, 0.0]]]])
    psa = RefineParams(background="power", bg_power=2.0)
    scores = walk_scores(cams, (2, 2), psa)
    assert scores[0, 0].tolist() == [[0.0, 0.25], [1.0, 1.0]] and scores[0, 1].tolist() == cams[0, 0].tolist()
    assert walk_scores(torch.zeros(1, 0, 4, 4), (2, 2), psa).tolist() == [[[[1.0, 1.0], [1.0, 1.0]]]]
    assert torch.equal(walk_scores(cams, (2, 2), RefineParams(background="threshold")), cams)
    assert walk_scores(torch.ones(1, 1, 4, 4), (2, 2), RefineParams()).shape == (1, 1, 2, 2)


def test_background_is_irn_s_threshold_on_each_image_s_walked_maps_divided_by_their_largest():
    walked = torch.tensor([[[[4.0, 1.0]], [[0.0, 2.0]]],  # two classes: the largest value 4
                           [[[0.0, 0.0]], [[0.0, 0.0]]]])  # nothing walked here: background
    labels = walked_labels(walked, (1, 2), RefineParams(), 0.4)
    assert labels.tolist() == [[[1, 2]], [[0, 0]]]  # 1/4 < 0.4 < 2/4
    assert walked_labels(walked, (1, 2), RefineParams(), 0.6).tolist() == [[[1, 0]], [[0, 0]]]


def test_the_chosen_background_threshold_parts_cells_where_the_affinities_are_weakest():
    features = torch.zeros(1, 1, 12, 12)
    features[..., 6:] = 5.0  # two regions of the affinity network's output: an edge between columns 5 and 6
    scores = torch.linspace(1.0, 0.0, 12).expand(1, 1, 12, 12)  # a walked map falling from left to right
    thresholds = torch.tensor([0.2, 0.5, 0.8])  # the scores cross 0.5 at the edge, the others inside a region
    totals = boundary_affinity(features, scores, thresholds, 5, AFFINITIES["feature"][1])
    means = totals[0, :, 0] / totals[0, :, 1]
    assert torch.all(totals[0, :, 1] > 0) and int(means.argmin()) == 1
    torch.testing.assert_close(means[1], torch.exp(torch.tensor(-5.0)))  # every parted pair crosses the edge
    assert means[0] > 0.5 and means[2] > 0.5  # most parted pairs lie inside one region


def test_auto_walks_once_chooses_a_candidate_and_labels_as_that_fixed_threshold(tiny_manifest, tmp_path, affinity_net):
    cams, labels = _cams_store(tiny_manifest, tmp_path), _labels_store(tiny_manifest, tmp_path)
    ids = [item.id for item in tiny_manifest.split("train")]
    walks = ImageStore(tmp_path / "walks.zarr")
    walks.reset_unless("test")
    params, cpu = RefineParams(log_steps=3, bg_threshold="auto"), torch.device("cpu")
    assert walk_split(affinity_net, tiny_manifest, "train", cams, walks, params, cpu, progress=False) == ids
    assert walk_split(affinity_net, tiny_manifest, "train", cams, walks, params, cpu, progress=False) == []  # resumed
    walk, attrs = walks.read(ids[0])
    assert walk.dtype == np.float32 and walk.shape == (max(1, len(attrs["classes"])), 5, 6)  # 20x24 at stride 4
    assert np.asarray(attrs["boundary"]).shape == (len(BACKGROUND_CANDIDATES), 2)
    threshold = chosen_threshold(walks, ids)
    assert threshold in BACKGROUND_CANDIDATES
    stored, walked = ImageStore(tmp_path / "stored.zarr"), ImageStore(tmp_path / "walked.zarr")
    for store in (stored, walked):
        store.reset_unless("test")
    refine_split(affinity_net, tiny_manifest, "train", cams, labels, stored, params, threshold, cpu, progress=False,
                 walks=walks)
    fixed = RefineParams(log_steps=3, bg_threshold=threshold)
    refine_split(affinity_net, tiny_manifest, "train", cams, labels, walked, fixed, threshold, cpu, progress=False)
    assert all(np.array_equal(stored.read(image_id)[0], walked.read(image_id)[0]) for image_id in ids)


def test_auto_takes_the_highest_candidate_tied_with_the_weakest_affinity_across_edges():
    assert BACKGROUND_CANDIDATES == (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35)
    steep = np.array([0.30, 0.20, 0.26, 0.28, 0.29, 0.30, 0.31])  # the objects reach far past their CAMs
    assert weakest_candidate(steep) == 0.1
    flat = np.array([0.182, 0.163, 0.158, 0.159, 0.154, 0.1529, 0.1531])  # 0.35 within 0.2 % of 0.3
    assert weakest_candidate(flat) == 0.35
    near = np.array([0.230, 0.166, 0.150, 0.1459, 0.1465, 0.150, 0.155])  # 0.25 within 0.4 %, 0.35 6 % above
    assert weakest_candidate(near) == 0.25
    apart = np.array([0.1165, 0.1178, 0.128, 0.133, 0.136, 0.140, 0.144])  # 0.1 is 1.1 % above: not tied
    assert weakest_candidate(apart) == 0.05
    assert weakest_candidate(np.full(7, np.inf)) == 0.35  # no candidate parts any cells


def test_the_threshold_is_chosen_only_when_auto_and_irn_s_background_ask_for_it():
    assert RefineParams().chooses_threshold
    assert not RefineParams(background="power").chooses_threshold  # PSA's background has no threshold
    assert not RefineParams(bg_threshold=0.35).chooses_threshold
    with pytest.raises(ValueError, match="bg_threshold"):
        RefineParams(bg_threshold="always")


@pytest.fixture
def affinity_net() -> AffinityNet:
    torch.manual_seed(0)
    backbone = CAMNet(build_backbone("small"), 3, freeze_bn=False).eval().backbone
    return AffinityNet(backbone, LEVELS["small"], 4, AFFINITIES["boundary"][0])


def test_a_small_grid_walks_fewer_steps_in_proportion_to_its_area():
    params = RefineParams()  # 256 steps from a grid of 96 cells across
    assert params.steps_on((125, 94)) == params.steps_on((54, 80)) == 256  # VOC's 500x375, MSRC's 320x213
    assert params.steps_on((24, 24)) == 32  # a 96x96 image at stride 4
    assert params.steps_on((1, 1)) == 1
    assert RefineParams(walk_diagonal=0).steps_on((24, 24)) == 256


def test_the_affinity_network_learns_only_its_new_layers(affinity_net):
    features = affinity_net(torch.randn(2, 3, 20, 24))
    assert features.shape == (2, 1, 5, 6)
    trainable = {name.split(".", 1)[0] for name, p in affinity_net.named_parameters() if p.requires_grad}
    assert trainable == {"head"}
    affinity_net.train()
    assert not affinity_net.backbone.training


def _cams_store(manifest, folder: Path) -> ImageStore:
    """Each image's CAM: its ground truth's object, one map per tag."""
    store = ImageStore(folder / "cams.zarr")
    store.reset_unless("test")
    for items in manifest.splits.values():
        for item in items:
            store.write(item.id, (manifest.read_mask(item) > 0)[None].astype(np.float16), classes=list(item.labels))
    store.mark_complete(item.id for items in manifest.splits.values() for item in items)
    return store


def _labels_store(manifest, folder: Path) -> ImageStore:
    """Affinity labels that give each image's tag to every row from the top down to its object's
    last and a class it is not tagged with to the rest of its last column, and leave the rest
    unlabelled."""
    store = ImageStore(folder / "crf.zarr")
    store.reset_unless("test")
    for item in manifest.split("train"):
        labels = np.full((20, 24), IGNORE, dtype=np.uint8)
        bottom = np.flatnonzero(manifest.read_mask(item).any(axis=1)).max()
        labels[: bottom + 1] = item.labels[0] + 1
        labels[bottom + 1 :, -1] = (item.labels[0] + 1) % 3 + 1
        store.write(item.id, labels)
    store.mark_complete(item.id for item in manifest.split("train"))
    return store


def test_the_affinity_labels_complete_the_objects_the_walk_found():
    walked = np.array([[0, 1, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 0, 0, 2]], dtype=np.uint8)
    labels = np.array([[1, 1, 1, X, 1, 0, 5, 2, X, 2, 2, 2, 2, 2, 2]], dtype=np.uint8)
    kept = keep_foreground(walked, labels, np.array([1, 2]), share=0.25)
    # the region of 1 of which the walk found a third is kept whole; the one it did not reach
    # adds nothing, nor does a class the image is not tagged with (5); the labels' background
    # and their 255 leave the walk as it is; of the last region of 2 the walk found a sixth
    assert kept.tolist() == [[1, 1, 1, 0, 0, 0, 2, 2, 0, 0, 0, 0, 0, 0, 2]]
    assert keep_foreground(walked, labels, np.array([1, 2]), share=0.1)[0, 9:].tolist() == [2] * 6
    assert np.array_equal(keep_foreground(walked, labels, np.array([1, 2]), share=1.0), walked)


@pytest.mark.parametrize("keep", ["foreground", "none"])
def test_refined_labels_hold_only_background_and_the_image_s_tags(tiny_manifest, tmp_path, affinity_net, keep):
    cams, labels = _cams_store(tiny_manifest, tmp_path), _labels_store(tiny_manifest, tmp_path)
    store = ImageStore(tmp_path / "refined.zarr")
    store.reset_unless("test")
    params = RefineParams(log_steps=3, keep=keep, keep_share=0.1, crf=False)  # the object: a fifth of it or more
    written = refine_split(affinity_net, tiny_manifest, "train", cams, labels, store, params, 0.35,
                           torch.device("cpu"), progress=False)
    assert written == [item.id for item in tiny_manifest.split("train")]
    for item in tiny_manifest.split("train"):
        refined, _ = store.read(item.id)
        assert refined.dtype == np.uint8 and refined.shape == (20, 24)
        assert set(np.unique(refined)) <= {0, *(c + 1 for c in item.labels)}
        assert (refined[0] == item.labels[0] + 1).all() == (keep == "foreground")  # the walk alone misses the row
    assert score_labels(store, tiny_manifest, "train")["scored_images"] == 4


def test_held_scores_give_each_pixel_s_label_its_score_and_share_the_rest_among_the_image_s_labels():
    labels = np.array([[0, 0, 2, 2, 3]], dtype=np.uint8)
    scores = held_scores(labels, num_labels=4, score=0.9)
    assert scores.shape == (4, 1, 5) and np.allclose(scores.sum(axis=0), 1)
    assert np.allclose(scores[:, 0, 0], [0.9, 0, 0.05, 0.05]) and np.allclose(scores[:, 0, 4], [0.05, 0, 0.05, 0.9])
    assert np.array_equal(held_scores(np.full((2, 2), 2, np.uint8), 4, 0.9)[2], np.ones((2, 2)))  # alone: held


@pytest.mark.parametrize("backend", ["pydensecrf", "torch"])
def test_the_crf_after_the_walk_moves_its_labels_edge_onto_the_image_s(backend):
    rgb = np.full((1, 32, 32, 3), 40, dtype=np.uint8)
    rgb[0, :, 16:] = 220  # the object: the bright right half
    walked = np.zeros((32, 32), dtype=np.uint8)
    walked[:, 12:] = 2  # the walk's edge, on its grid of four pixels a cell, one cell to the left
    crf = RefineParams(crf_backend=backend).crf_params()
    scores = torch.from_numpy(held_scores(walked, 3, RefineParams().crf_score)[None])
    tags = [np.array([0, 1], dtype=np.float32)]
    with ThreadPoolExecutor(1) if backend == "pydensecrf" else nullcontext() as executor:
        (future,) = crf_labels(torch.from_numpy(rgb), scores, crf, tags, executor)
    expected = np.zeros((32, 32), dtype=np.uint8)
    expected[:, 16:] = 2
    assert np.array_equal(future.result(), expected)


def test_a_killed_walk_resumes_with_the_images_not_yet_written(tiny_manifest, tmp_path, affinity_net):
    cams, labels = _cams_store(tiny_manifest, tmp_path), _labels_store(tiny_manifest, tmp_path)
    store = ImageStore(tmp_path / "refined.zarr")
    store.reset_unless("test")
    first = tiny_manifest.split("train")[0].id
    store.write(first, np.zeros((20, 24), dtype=np.uint8))
    written = refine_split(affinity_net, tiny_manifest, "train", cams, labels, store, RefineParams(log_steps=2),
                           0.35, torch.device("cpu"), progress=False)
    assert first not in written and len(written) == 3
    assert refine_split(affinity_net, tiny_manifest, "train", cams, labels, store, RefineParams(log_steps=2),
                        0.35, torch.device("cpu"), progress=False) == []


def test_the_refined_store_records_its_settings_network_cams_and_the_labels_it_keeps(tiny_manifest, tmp_path):
    cams, labels = _cams_store(tiny_manifest, tmp_path), _labels_store(tiny_manifest, tmp_path)
    weights = tmp_path / "refine.pth"
    weights.write_bytes(b"trained")
    store = ImageStore(tmp_path / "refined.zarr")
    made = refined_made_from(tiny_manifest, "train", RefineParams(), weights, cams, labels)
    start(store, made)
    assert store.made_from["settings"]["refine.beta"] == 10.0
    assert set(store.made_from["inputs"]) == {"weights", "cams.zarr", "labels"}
    assert set(refined_made_from(tiny_manifest, "train", RefineParams(keep="none"), weights, cams,
                                 labels).inputs) == {"weights", "cams.zarr"}
    store.write("im0", np.zeros((20, 24), dtype=np.uint8))
    start(store, refined_made_from(tiny_manifest, "train", RefineParams(), weights, cams, labels))
    assert "im0" in store  # the same settings keep what was walked
    start(store, refined_made_from(tiny_manifest, "train", RefineParams(beta=12.0), weights, cams, labels))
    assert store.is_empty()  # another beta walks anew


def test_the_affinity_network_starts_from_its_seed_whatever_ran_before(tmp_path):
    classifier = ClassifierParams()
    save_checkpoint(build_classifier(classifier, 3), tmp_path / "classifier.pth")
    heads = []
    for draws in (1, 5):  # the process's random state before differs
        torch.rand(draws)
        net = build_affinity_net(classifier, 3, tmp_path / "classifier.pth", RefineParams())
        heads.append(net.head.state_dict())
    assert all(torch.equal(heads[0][name], heads[1][name]) for name in heads[0])
    assert not torch.equal(build_affinity_net(classifier, 3, tmp_path / "classifier.pth",
                                              RefineParams(seed=1)).head.state_dict()["mix.weight"],
                           heads[0]["mix.weight"])

"""The parameter files in presets/: every key is one the stages read, and the method's parameters
are the same everywhere; presets set the dataset, backbone, crops, steps, rates and scales."""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from pipeline.core.params import load_params
from pipeline.core.run import load_run
from pipeline.core.stage import DatasetParams
from pipeline.data.synth import read_data_params
from pipeline.method.cams import CamParams
from pipeline.method.prune import PruneParams
from pipeline.train.classifier import ClassifierParams
from pipeline.train.deeplab import DeepLabParams, SupervisedParams
from pipeline.train.refine import RefineParams
from pipeline.train.segment import SegmentParams

PRESETS = Path(__file__).resolve().parents[1] / "presets"
SECTIONS = {
    "dataset": lambda path: load_params(DatasetParams, "dataset", path),
    "data": read_data_params,
    "classifier": lambda path: load_params(ClassifierParams, "classifier", path),
    "cams": lambda path: load_params(CamParams, "cams", path),
    "prune": lambda path: load_params(PruneParams, "prune", path),
    "refine": lambda path: load_params(RefineParams, "refine", path),
    "run": load_run,
    "segment": lambda path: load_params(SegmentParams, "segment", path),
    "deeplab": lambda path: load_params(DeepLabParams, "deeplab", path),
    "supervised": lambda path: load_params(SupervisedParams, "supervised", path),
}
METHOD = ("mode", "dense_weight", "sigma_rgb", "sigma_xy", "energy_scale", "energy_tags", "cls_weight", "crf")
"""The segment stage's method parameters, which no preset changes but VOC's mode (the paper's end to end)."""
REFINE_METHOD = ("labels", "affinity", "stride", "radius", "beta", "log_steps", "walk_diagonal", "background",
                 "bg_threshold", "bg_power", "keep", "keep_share", "crf", "crf_score")
"""The refine stage's method parameters, the same in every preset; presets set its crops and schedule."""
ALL = sorted([PRESETS.parent / "params.yaml", *PRESETS.glob("*.yaml")])


@pytest.mark.parametrize("preset", sorted(PRESETS.glob("*.yaml")), ids=lambda path: path.stem)
def test_every_key_of_a_preset_is_a_parameter_of_a_stage(preset):
    sections = yaml.safe_load(preset.read_text())
    assert set(sections) <= set(SECTIONS) | {"storage", "overlays"}
    for section in set(sections) & set(SECTIONS):
        SECTIONS[section](preset)


def tracked_sections() -> set[str]:
    """The params.yaml sections dvc.yaml names: DVC refuses to run a stage whose section is missing."""
    text = (PRESETS.parent / "dvc.yaml").read_text()
    stages = yaml.safe_load(text)["stages"].values()
    named = {entry.split(".")[0] for stage in stages for entry in stage.get("params", []) if isinstance(entry, str)}
    return named | set(re.findall(r"\$\{(\w+)\.", text))


@pytest.mark.parametrize("preset", sorted(PRESETS.glob("*.yaml")), ids=lambda path: path.stem)
def test_a_preset_holds_every_section_the_pipeline_tracks(preset):
    assert tracked_sections() - set(yaml.safe_load(preset.read_text())) == set()


@pytest.mark.parametrize("preset", ALL, ids=lambda path: path.stem)
def test_a_params_file_holds_every_key_dvc_yaml_reads_from_it(preset):
    """DVC resolves ``${section.key}`` from the params file alone: a key left to its default would stop it."""
    sections = yaml.safe_load(preset.read_text())
    named = set(re.findall(r"\$\{(\w+)\.(\w+)\}", (PRESETS.parent / "dvc.yaml").read_text()))
    assert {("segment", "labels"), ("deeplab", "labels"), ("refine", "labels")} <= named
    assert [f"{section}.{key}" for section, key in sorted(named) if key not in (sections.get(section) or {})] == []


@pytest.mark.parametrize("preset", ALL, ids=lambda path: path.stem)
def test_every_params_file_keeps_the_refine_stage_s_method(preset):
    refine, default = asdict(load_params(RefineParams, "refine", preset)), asdict(RefineParams())
    assert {key: refine[key] for key in REFINE_METHOD} == {key: default[key] for key in REFINE_METHOD}


def test_the_voc_preset_holds_the_papers_settings():
    preset = PRESETS / "voc12.yaml"
    classifier = load_params(ClassifierParams, "classifier", preset)
    segment = load_params(SegmentParams, "segment", preset)
    prune = load_params(PruneParams, "prune", preset)
    assert (classifier.backbone, classifier.crop_size, classifier.freeze_bn) == ("resnet38", 448, True)
    assert (segment.mode, segment.crop_size, segment.batch_size, segment.steps) == ("end_to_end", 321, 4, 20000)
    assert (segment.lr, segment.momentum, segment.dense_weight) == (7e-4, 1e-5, 5e-8)  # momentum = RRM's wt_dec
    assert (classifier.momentum, classifier.weight_decay) == (5e-4, 5e-4)  # PSA's PolyOptimizer: momentum = wt_dec
    psa = (classifier.batch_size, classifier.lr, classifier.steps, classifier.resize_long, classifier.color_jitter,
           classifier.frozen)
    assert psa == (16, 0.1, 15 * (10582 // 16), (256, 512), (0.3, 0.3, 0.3, 0.1), ("conv1a", "b2", "b2_1", "b2_2"))
    assert segment.mining_scales == (1.0, 0.5, 1.5, 2.0) and segment.checkpoint is None
    assert prune == PruneParams()


@pytest.mark.parametrize("params", [PRESETS.parent / "params.yaml", PRESETS / "msrc.yaml"], ids=["default", "msrc"])
def test_the_synthetic_default_and_msrc_keep_the_methods_parameters(params):
    assert load_params(PruneParams, "prune", params) == PruneParams()
    segment, default = asdict(load_params(SegmentParams, "segment", params)), asdict(SegmentParams())
    assert {key: segment[key] for key in METHOD} == {key: default[key] for key in METHOD}


def test_the_msrc_preset_starts_from_imagenet_and_runs_both_references():
    preset = PRESETS / "msrc.yaml"
    classifier = load_params(ClassifierParams, "classifier", preset)
    assert (classifier.backbone, classifier.weights) == ("mobilenet_v2", "weights/mobilenet_v2-b0353104.pth")
    assert load_params(DeepLabParams, "deeplab", preset).enabled
    assert load_params(SupervisedParams, "supervised", preset).enabled


def test_the_coco_preset_is_the_voc_recipe_with_the_coco_classifier_schedule():
    voc, coco = PRESETS / "voc12.yaml", PRESETS / "coco14.yaml"
    for section, cls in (("prune", PruneParams), ("segment", SegmentParams), ("deeplab", DeepLabParams)):
        assert load_params(cls, section, coco) == load_params(cls, section, voc), section
    classifier = load_params(ClassifierParams, "classifier", coco)
    eps = (classifier.crop_size, classifier.resize_long, classifier.batch_size, classifier.steps)
    assert eps == (321, (256, 448), 16, 256500)  # EPS script/coco_cls.sh
    assert load_params(DatasetParams, "dataset", coco).manifest == "manifests/coco.json"


def test_the_msrc_preset_is_the_photo_preset_on_msrc_s_manifest():
    photos, msrc = (yaml.safe_load((PRESETS / name).read_text()) for name in ("photos.yaml", "msrc.yaml"))
    assert {section: value for section, value in msrc.items() if section != "dataset"} == {
        section: value for section, value in photos.items() if section != "dataset"}
    assert msrc["dataset"]["manifest"] == "manifests/msrc.json"

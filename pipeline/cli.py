"""`rrm`: the command line of the pipeline.

Every bad-input problem surfaces as one line, ``error: <file>: <problem>``, and exit status 2.
Heavy modules are imported inside each command so that ``rrm --help`` answers at once.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import click

from pipeline.core.errors import as_one_line
from pipeline.core.registry import STAGES, STORES


class _Group(click.Group):
    """A click group whose commands end in one line on stderr, not a traceback, on bad input, a
    refused permission or Ctrl-C (see :func:`pipeline.core.errors.as_one_line`)."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        return as_one_line(lambda: super(_Group, self).invoke(ctx))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Reliable Region Mining: pixel pseudo-labels from image-level tags.

    The usual way in is `dvc repro`, which runs the stages of dvc.yaml with params.yaml.
    These commands run the same stages one by one, build dataset manifests, generate the
    synthetic benchmark, and look at what the stages wrote.
    """


@main.command()
@click.option("--root", type=click.Path(path_type=Path),
              help="Folder the dataset is written to (VOC layout) [default: data.root, or data/synth].")
@click.option("--manifest", "manifest_path", type=click.Path(path_type=Path),
              help="Manifest file to write [default: data.manifest, or manifests/synth.json].")
@click.option("--params", "params_path", type=click.Path(path_type=Path), default=Path("params.yaml"),
              show_default=True, help="Read the generator's settings from the `data:` section of this file "
              "(if it exists); the options below override them.")
@click.option("--image-size", type=int, help="Side of the square images, in pixels.")
@click.option("--num-classes", type=int, help="Number of foreground classes (at most 20).")
@click.option("--train-images", type=int, help="Number of training images.")
@click.option("--val-images", type=int, help="Number of validation images.")
@click.option("--seed", type=int, help="Random seed; the same seed gives byte-identical files.")
def synth(root: Path | None, manifest_path: Path | None, params_path: Path, **overrides: int | None) -> None:
    """Generate the synthetic benchmark and its manifest.

    Objects whose class shows only on a small part, textured backgrounds that co-occur with
    some classes, and sharp colour boundaries: the effects RRM was designed for, small enough
    to run the whole pipeline on a laptop CPU.
    """
    from pipeline.data.synth import generate, read_data_params

    params, default_root, default_manifest = read_data_params(params_path, overrides)
    root = root or default_root
    manifest_path = manifest_path or default_manifest
    manifest, stats = generate(params, root, manifest_path)
    click.echo(f"wrote {sum(len(s) for s in manifest.splits.values())} images to {root} "
               f"and the manifest {manifest_path}")
    click.echo(_format_stats(stats))


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("data/textures"),
              show_default=True, help="Folder to write: images/, masks/, labels.csv, classes.txt.")
@click.option("--num-classes", type=int, default=8, show_default=True, help="Number of classes (at most 8).")
@click.option("--train-images", type=int, default=480, show_default=True, help="Number of training images.")
@click.option("--val-images", type=int, default=160, show_default=True, help="Number of validation images.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed; the same seed gives the same files.")
def textures(out: Path, **settings: int) -> None:
    """Generate the texture benchmark, a second synthetic dataset unlike `rrm synth`.

    The class shows in an object's texture (its colours are random), fading across the object;
    scenes co-occur with classes; images are rectangular JPEGs of several sizes. Written in the
    layout of `rrm manifest folder`, which the printed command then reads.
    """
    from pipeline.core.params import build_params
    from pipeline.data.textures import TextureParams, generate

    stats = generate(build_params(TextureParams, settings, "rrm textures"), out)
    _print_folder_command(out, sum(stats["images"].values()), "textures")


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("data/patches"),
              show_default=True, help="Folder to write: images/, masks/, labels.csv, classes.txt.")
@click.option("--num-classes", type=int, default=5, show_default=True, help="Number of classes (at most 5).")
@click.option("--train-images", type=int, default=480, show_default=True, help="Number of training images.")
@click.option("--val-images", type=int, default=120, show_default=True, help="Number of validation images.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed; the same seed gives the same files.")
def patches(out: Path, **settings: int) -> None:
    """Generate the patch benchmark, a third synthetic dataset.

    Animals whose bodies share one palette across the classes and whose class shows only in a
    small black-and-white patch on the flank; scenes co-occur with classes; 112x144 PNGs. Written
    in the layout of `rrm manifest folder`, which the printed command then reads.
    """
    from pipeline.core.params import build_params
    from pipeline.data.patches import PatchParams, generate

    stats = generate(build_params(PatchParams, settings, "rrm patches"), out)
    _print_folder_command(out, sum(stats["images"].values()), "patches")


def _print_folder_command(out: Path, images: int, name: str) -> None:
    """Say what was written and the `rrm manifest folder` command that reads it."""
    click.echo(f"wrote {images} images to {out}; its manifest:")
    click.echo(f"  rrm manifest folder --images {out}/images --labels {out}/labels.csv --masks {out}/masks "
               f"--classes \"$(cat {out}/classes.txt)\" --name {name}")


def _format_stats(stats: dict) -> str:
    return "\n".join(f"  {key}: {value}" for key, value in stats.items() if not isinstance(value, dict))


@main.group()
def manifest() -> None:
    """Build a dataset manifest (manifests/<name>.json) from a dataset on disk."""


_skip_bad_images = click.option(
    "--skip-bad", is_flag=True, help="Leave out the images (or masks) that do not decode and list them in "
    "<out>.rejects.json; without it the first one is an error. Every image is decoded either way.")


@manifest.command("voc12")
@click.option("--voc-root", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="The VOC2012 folder (with JPEGImages/, Annotations/, SegmentationClass/, ImageSets/).")
@click.option("--sbd-root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="SBD's dataset/ folder (train.txt, val.txt, cls/); adds the train_aug split.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("manifests/voc12.json"),
              show_default=True, help="Manifest file to write.")
@_skip_bad_images
def voc12(voc_root: Path, sbd_root: Path | None, out: Path, skip_bad: bool) -> None:
    """PASCAL VOC 2012 (+ SBD): splits train, val and train_aug.

    train_aug = (SBD train + SBD val + VOC train) - VOC val (10,582 images). Image-level labels
    come from the XML annotations, falling back to the masks.
    """
    from pipeline.data.screen import rejects_beside
    from pipeline.data.voc import build_voc12

    rejects = rejects_beside(out) if skip_bad else None
    built = build_voc12(voc_root, sbd_root, rejects)
    built.save(out)
    _report_manifest(built, out, rejects)


@manifest.command("coco")
@click.option("--coco-root", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="The COCO folder (with annotations/instances_{train,val}YEAR.json and {train,val}YEAR/).")
@click.option("--year", type=click.Choice(["2014", "2017"]), default="2014", show_default=True)
@click.option("--name", default="coco", show_default=True, help="Dataset name.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Manifest file to write [default: manifests/<name>.json].")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the class maps (masks/) and image links (images/) are written [default: data/<name>].")
@click.option("--keep-empty", is_flag=True, help="Keep the images without annotations, as background only.")
@click.option("--workers", type=int, help="Processes rasterising the masks [default: one per CPU core].")
@_skip_bad_images
def coco(coco_root: Path, year: str, name: str, out: Path | None, data_dir: Path | None, keep_empty: bool,
         workers: int | None, skip_bad: bool) -> None:
    """MS COCO 2014 or 2017: splits train and val, whichever annotation files are there.

    Tags are the categories of each image's instance annotations; the ground-truth class maps are
    rasterised once (resumable: a rerun writes only the missing ones), for scoring.
    """
    from pipeline.data.coco import build_coco
    from pipeline.data.screen import rejects_beside

    out = out or Path("manifests") / f"{name}.json"
    rejects = rejects_beside(out) if skip_bad else None
    built = build_coco(coco_root, data_dir or Path("data") / name, year, name, keep_empty, rejects, workers)
    built.save(out)
    _report_manifest(built, out, rejects)


@manifest.command("folder")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Folder of images.")
@click.option("--labels", "labels_csv", type=click.Path(path_type=Path), required=True,
              help="CSV with columns image, labels (class names separated by space, ';' or '|') "
              "and optionally split.")
@click.option("--masks", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of ground-truth label masks (<id>.png), used only for scoring.")
@click.option("--classes", help="Class names in index order, comma-separated; default: the sorted "
              "names found in the CSV.")
@click.option("--name", default="custom", show_default=True, help="Dataset name.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Manifest file to write [default: manifests/<name>.json].")
@_skip_bad_images
def folder(images: Path, labels_csv: Path, masks: Path | None, classes: str | None, name: str,
           out: Path | None, skip_bad: bool) -> None:
    """Any folder of images with a CSV of image-level labels."""
    from pipeline.data.folder import build_folder
    from pipeline.data.screen import rejects_beside

    class_list = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    out = out or Path("manifests") / f"{name}.json"
    rejects = rejects_beside(out) if skip_bad else None
    built = build_folder(images, labels_csv, masks, class_list, name, rejects)
    built.save(out)
    _report_manifest(built, out, rejects)


def _report_manifest(built, out: Path, rejects: Path | None) -> None:
    sizes = ", ".join(f"{name} {len(items)}" for name, items in built.splits.items())
    click.echo(f"wrote {out}: {built.num_classes} classes; {sizes}")
    per_class = ", ".join(f"{name} {count}" for name, count in built.images_per_class().items())
    click.echo(f"images per class: {per_class}")
    if rejects is not None:
        import json

        click.echo(f"left out {len(json.loads(rejects.read_text()))} bad image(s), listed in {rejects}")


@main.command()
@click.argument("name", type=click.Choice(STAGES))
@click.option("--params", "params_path", type=click.Path(path_type=Path), default=Path("params.yaml"),
              show_default=True, help="Parameters file.")
@click.option("--scheduler", help="crf only: address of a running dask scheduler (overrides run.scheduler).")
@click.option("--skip-bad", is_flag=True, help="Leave out the images (or masks) that do not decode and list them in "
              "rejects/NAME.json, instead of stopping at the first (overrides dataset.skip_bad).")
def stage(name: str, params_path: Path, scheduler: str | None, skip_bad: bool) -> None:
    """Run one pipeline stage directly, as `dvc repro` would (without DVC's bookkeeping)."""
    takes = STAGES[name].options
    if scheduler is not None and "scheduler" not in takes:
        raise click.UsageError("--scheduler is for the crf stage, which runs the dense CRFs")
    if skip_bad and "skip_bad" not in takes:
        raise click.UsageError("--skip-bad is for the stages that read the dataset's images")
    options = {"scheduler": scheduler, "skip_bad": skip_bad or None}
    main = importlib.import_module(STAGES[name].module).main
    main(params_path, **{option: value for option, value in options.items() if value is not None})


@main.command("dvc-yaml")
@click.option("--check", is_flag=True, help="Write nothing; exit 1 if dvc.yaml differs from what it would be.")
def dvc_yaml(check: bool) -> None:
    """Write dvc.yaml from the stage declarations (pipeline/core/registry.py) and the code each
    stage imports: run it after adding a stage, an input or an import to a stage's code."""
    from pipeline.core.dvcfile import DVC_FILE, render

    text = render()
    if check:
        if DVC_FILE.read_text() != text:
            raise click.ClickException(f"{DVC_FILE} is out of date: run `rrm dvc-yaml`")
        return
    DVC_FILE.write_text(text)
    click.echo(f"wrote {DVC_FILE}")


@main.command()
@click.option("--params", "params_path", type=click.Path(path_type=Path), default=Path("params.yaml"),
              show_default=True, help="Parameters file; the run's scores are in scores/ under its storage.root.")
@click.option("--scores", "scores_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder of the stages' scores files [default: scores/ under storage.root, or scores/ "
              "without a parameters file].")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON instead of a table.")
def report(params_path: Path, scores_dir: Path | None, as_json: bool) -> None:
    """The scores of the paper's ablation (percent) and the seconds each stage took.

    CAM mIoU on val and train, reliable-region precision and coverage, one-step mIoU with and
    without CRF, pseudo-label mIoU on train, two-step (DeepLab) mIoU, the fully supervised
    reference and two-step / supervised, read from scores/<stage>.json; a stage that has not
    run reads "not run".
    """
    import json

    from pipeline.core.params import load_params
    from pipeline.core.registry import SCORES
    from pipeline.core.store import StorageParams
    from pipeline.inspection.report import format_rows, read_scores, report_rows, rows_as_json

    if scores_dir is None:
        storage = load_params(StorageParams, "storage", params_path) if params_path.is_file() else StorageParams()
        scores_dir = storage.file(SCORES)
    rows = report_rows(read_scores(scores_dir))
    click.echo(json.dumps(rows_as_json(rows), indent=1) if as_json else format_rows(rows))


@main.command()
@click.option("--width", type=int, help="Characters a line may take [default: the terminal's].")
def experiments(width: int | None) -> None:
    """The DVC experiments of this project (`dvc exp show`) as one short table: each experiment,
    the parameters that differ between them, and the headline scores (percent) and seconds.

    CAM is the CAMs' val mIoU, prec / cov the reliable regions' precision and coverage, refined,
    pseudo the training split's refined and one-step labels, one-step and two-step the val mIoU
    of the two networks, seconds the stages' total. "-" where the run has no such score.
    """
    import shutil

    from pipeline.inspection.experiments import experiment_rows, format_table, read_experiments

    rows = experiment_rows(read_experiments(Path.cwd()))
    click.echo(format_table(rows, width or shutil.get_terminal_size().columns))


INSPECTION = Path("inspection")
"""Default folder of what the inspection commands write."""


def _project_options(command):
    """The options every inspection command shares: where the dataset and the stores are."""
    command = click.option("--artifacts", type=click.Path(file_okay=False, path_type=Path),
                           help="Folder of the stages' stores (cams.zarr, masks.zarr, ...) [default: "
                           "storage.artifacts of the parameters file].")(command)
    return click.option("--params", "params_path", type=click.Path(path_type=Path), default=Path("params.yaml"),
                        show_default=True, help="Parameters file; its `dataset:` section names the manifest and "
                        "the splits.")(command)


@main.command()
@click.argument("image_id")
@_project_options
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help=f"PNG file to write [default: {INSPECTION}/IMAGE_ID.png].")
@click.option("--scale", type=click.IntRange(min=1),
              help="Enlarge every panel this many times [default: the least that makes panels 192 pixels or more].")
def show(image_id: str, params_path: Path, artifacts: Path | None, out: Path | None, scale: int | None) -> None:
    """One image's maps and masks side by side in one PNG.

    Panels: the image; the CAM of each of its classes as a heat map; the reliable mask
    (unreliable pixels hatched grey) and the segmentation and DeepLab predictions of its split
    where those stages have run; the ground truth where it exists. A legend names the classes
    in the dataset's palette.
    """
    from pipeline.inspection.figures import image_figure
    from pipeline.inspection.project import open_project

    figure, notes = image_figure(open_project(params_path, artifacts), image_id, scale)
    out = out or INSPECTION / f"{image_id}.png"
    figure.save(out)
    for note in notes:
        click.echo(f"not shown: {note}")
    click.echo(f"wrote {out}: {', '.join(figure.titles)}")


@main.command()
@_project_options
@click.option("--split", "role", type=click.Choice(["train", "val"]), default="train", show_default=True,
              help="train: reliable masks (precision, coverage) and pseudo-labels (IoU); val: segmentation "
              "predictions (IoU).")
@click.option("--n", "count", type=click.IntRange(min=1), default=48, show_default=True, help="Rows to show.")
@click.option("--sort", "order", type=click.Choice(["worst", "best", "random"]), default="worst", show_default=True,
              help="worst: lowest IoU first (lowest precision where an image has no IoU).")
@click.option("--class", "class_name", help="Only images tagged with this class.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --sort random.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=INSPECTION / "gallery.html",
              show_default=True, help="HTML file to write.")
def gallery(params_path: Path, artifacts: Path | None, role: str, count: int, order: str, class_name: str | None,
            seed: int, out: Path) -> None:
    """A self-contained HTML page, one row per image with its thumbnails and figures.

    Each row: the image, its reliable mask, its prediction and its ground truth, with the
    precision and coverage of the reliable mask and the IoU of the prediction (the figures of
    `rrm stats` for that one image). Click a column header to sort by it.
    """
    from pipeline.core.io import atomic_open
    from pipeline.inspection.gallery import gallery_html, image_rows, sort_rows
    from pipeline.inspection.project import open_project

    project = open_project(params_path, artifacts)
    rows = sort_rows(list(image_rows(project, role, class_name)), order, seed)
    tagged = f", tagged {class_name}" if class_name else ""
    title = f"{project.manifest.name} {project.split(role)}: {min(count, len(rows))} of {len(rows)} images{tagged}, " \
            f"{order} first"
    page = gallery_html(project, role, rows[:count], title)
    with atomic_open(out) as handle:
        handle.write(page)
    for problem in (problem for row in rows for problem in row.damaged):
        click.echo(f"not scored: {problem}")
    click.echo(f"wrote {out}: {title}")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("settings", nargs=-1, required=True)
@_project_options
@click.option("--sample", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Images to read at most: a larger training split is sampled evenly.")
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path), default=Path(INSPECTION) / "sweep.png",
              show_default=True, help="The precision / coverage chart.")
def sweep(settings: tuple[str, ...], params_path: Path, artifacts: Path | None, sample: int, png: Path) -> None:
    """Precision and coverage of the reliable regions at each value of the rule's thresholds,
    from the CRFs the crf stage kept, in seconds and without retraining anything.

    SETTINGS: one or two of prune.cam_floor, prune.cam_quantile, prune.bg_threshold and
    prune.crf_confidence, each followed by its values; two settings make a grid:

        rrm sweep prune.cam_quantile 0.4 0.5 0.6 0.7
        rrm sweep prune.cam_quantile 0.5 0.7 prune.crf_confidence 0.7 0.9

    Prints the table (the params file's current setting marked *), per class in the JSON of
    plots/sweep.json (under storage.root), which `dvc plots show` draws beside plots/sweep_current.json,
    and the chart as a PNG. Without ground truth: each point's coverage of all pixels and each
    class's share of the labelled ones. The run's stores are only read.
    """
    from pipeline.core.errors import InputError
    from pipeline.core.io import write_json
    from pipeline.core.params import load_params
    from pipeline.core.registry import CRF_MAPS, SWEEP, SWEEP_CURRENT
    from pipeline.core.run import load_run
    from pipeline.inspection.project import open_project
    from pipeline.inspection.sweep import draw, format_table, grid, parse_axes, plot_rows
    from pipeline.inspection.sweep import sample as sampled
    from pipeline.inspection.sweep import sweep as run_sweep
    from pipeline.method.prune import PruneParams

    axes = parse_axes(settings)
    current = load_params(PruneParams, "prune", params_path)
    points = grid(current, axes)
    project = open_project(params_path, artifacts)
    maps = project.storage.store(CRF_MAPS)
    problem = project.problem(maps)
    if problem is not None:
        raise InputError(maps.path, problem)
    items = sampled(project.manifest.split(project.split("train")), sample)
    found = run_sweep(project.manifest, items, maps, points, load_run(params_path).local_workers())
    rows = [point.row(axes, project.manifest.label_names, current) for point in found]
    click.echo(f"{len(items)} of {len(project.manifest.split(project.split('train')))} training images")
    click.echo(format_table(rows, axes))
    plotted = list(plot_rows(rows, axes))
    write_json(project.storage.file(SWEEP.path), [{**plot, "per_class": row["per_class"]}
                                                 for plot, row in zip(plotted, rows, strict=True)])
    write_json(project.storage.file(SWEEP_CURRENT.path), [plot for plot, row in zip(plotted, rows, strict=True)
                                                         if row["current"]])
    png.parent.mkdir(parents=True, exist_ok=True)
    draw(rows, axes).save(png)
    click.echo(f"wrote {project.storage.file(SWEEP.path)}, {png}")


@main.command()
@_project_options
@click.option("--store", "names", multiple=True, help="Only this store (masks, cams.zarr, ...); repeat for more "
              "[default: every store of the run].")
@click.option("--repair", is_flag=True, help="Delete the damaged chunk files, so that each store's stage writes "
              "those images again when rerun.")
def verify(params_path: Path, artifacts: Path | None, names: tuple[str, ...], repair: bool) -> None:
    """Read back every image of the run's stores and list the damaged and missing ones per store.

    Damaged: its chunk file is cut short, garbled or another array's; missing: never written in
    full, or its chunk file is gone. Exits with 1 where any store has either. A stage rerun
    rewrites missing images and those damaged in a way it sees without decoding; --repair
    deletes every damaged chunk file, so that the rerun rewrites the others too.
    """
    from pipeline.inspection.project import open_project
    from pipeline.inspection.verify import check_store, format_checks, store_by_name
    from pipeline.inspection.verify import repair as delete_damaged

    try:
        stores = [store_by_name(name) for name in names] or list(STORES)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--store") from None
    project = open_project(params_path, artifacts)
    checks = [check_store(project, store) for store in stores]
    click.echo(format_checks(checks))
    if repair:
        click.echo(f"deleted {delete_damaged(project, checks)} damaged chunk file(s); rerun their stages "
                   "(`dvc repro`) to write them again")
    if any(check.problems for check in checks):
        raise SystemExit(1)


@main.command()
@_project_options
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON instead of tables.")
def stats(params_path: Path, artifacts: Path | None, as_json: bool) -> None:
    """Per class, for each stage's masks: labelled pixels, unreliable share, precision, coverage, IoU.

    Stages: the reliable masks (prune, train split), the pseudo-labels (segment, train), the
    segmentation and DeepLab predictions (val). Precision and coverage are those of
    metrics/prune.json; "unreliable" is the share of 255 pixels in the images tagged with the
    class. A stage that has not run says so.
    """
    import json

    from pipeline.inspection.project import open_project
    from pipeline.inspection.stats import all_stats, format_stats

    report = all_stats(open_project(params_path, artifacts))
    click.echo(json.dumps(report, indent=1) if as_json else format_stats(report))


@main.command()
@_project_options
@click.option("--against", required=True,
              help="The other version: a git revision or DVC experiment (its DVC-cached stores), a folder "
              "holding a copy of the stores, or one copied store keeping its name (e.g. old/masks.zarr).")
@click.option("--n", "count", type=click.IntRange(min=0), default=8, show_default=True,
              help="Images to draw: those whose masks changed most.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=INSPECTION / "diff",
              show_default=True, help="Folder of the pictures of the most changed images.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON instead of tables.")
def diff(params_path: Path, artifacts: Path | None, against: str, count: int, out: Path, as_json: bool) -> None:
    """Compare the masks with another version, e.g. before and after a threshold change.

    Prints each stage's per-class figures in both versions and the images whose masks changed
    most, and draws those images (`rrm show` panels, each mask beside its other version).
    """
    import json
    import tempfile

    from pipeline.inspection.diff import (
        against_artifacts,
        compare,
        format_comparison,
        version_label,
        write_comparison_figures,
    )
    from pipeline.inspection.project import open_project

    project = open_project(params_path, artifacts)
    label = version_label(against)
    with tempfile.TemporaryDirectory(prefix="rrm-against-") as workdir:
        other = project.with_artifacts(against_artifacts(against, Path(workdir)))
        result = compare(project, other, count)
        paths = write_comparison_figures(project, other, result, out, label)
    click.echo(json.dumps(result, indent=1) if as_json else format_comparison(result, label))
    if paths and not as_json:
        click.echo(f"wrote {len(paths)} pictures to {out}")

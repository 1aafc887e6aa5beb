"""`rrm`: the command line of the pipeline.

Every bad-input problem surfaces as one line, ``error: <file>: <problem>``, and exit status 2.
Heavy modules are imported inside each command so that ``rrm --help`` answers at once.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

from pipeline.errors import InputError

STAGES = ("data", "classifier", "cams", "prune", "segment", "deeplab")


class _Group(click.Group):
    """A click group that turns :class:`InputError` into one line on stderr."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except InputError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)


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
    from pipeline.synth import generate
    from stages.data import read_data_params

    params, default_root, default_manifest = read_data_params(params_path, overrides)
    root = root or default_root
    manifest_path = manifest_path or default_manifest
    manifest, stats = generate(params, root, manifest_path)
    click.echo(f"wrote {sum(len(s) for s in manifest.splits.values())} images to {root} "
               f"and the manifest {manifest_path}")
    click.echo(_format_stats(stats))


def _format_stats(stats: dict) -> str:
    return "\n".join(f"  {key}: {value}" for key, value in stats.items() if not isinstance(value, dict))


@main.group()
def manifest() -> None:
    """Build a dataset manifest (manifests/<name>.json) from a dataset on disk."""


@manifest.command("voc12")
@click.option("--voc-root", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="The VOC2012 folder (with JPEGImages/, Annotations/, SegmentationClass/, ImageSets/).")
@click.option("--sbd-root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="SBD's dataset/ folder (train.txt, val.txt, cls/); adds the train_aug split.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("manifests/voc12.json"),
              show_default=True, help="Manifest file to write.")
def voc12(voc_root: Path, sbd_root: Path | None, out: Path) -> None:
    """PASCAL VOC 2012 (+ SBD): splits train, val and train_aug.

    train_aug = (SBD train + SBD val + VOC train) - VOC val (10,582 images). Image-level labels
    come from the XML annotations, falling back to the masks.
    """
    from pipeline.voc import build_voc12

    built = build_voc12(voc_root, sbd_root)
    built.save(out)
    _report_manifest(built, out)


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
def folder(images: Path, labels_csv: Path, masks: Path | None, classes: str | None, name: str,
           out: Path | None) -> None:
    """Any folder of images with a CSV of image-level labels."""
    from pipeline.folder import build_folder

    class_list = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    built = build_folder(images, labels_csv, masks, class_list, name)
    out = out or Path("manifests") / f"{name}.json"
    built.save(out)
    _report_manifest(built, out)


def _report_manifest(built, out: Path) -> None:
    sizes = ", ".join(f"{name} {len(items)}" for name, items in built.splits.items())
    click.echo(f"wrote {out}: {built.num_classes} classes; {sizes}")


@main.command()
@click.argument("name", type=click.Choice(STAGES))
@click.option("--params", "params_path", type=click.Path(path_type=Path), default=Path("params.yaml"),
              show_default=True, help="Parameters file.")
@click.option("--scheduler", help="prune only: address of a running dask scheduler (overrides prune.scheduler).")
def stage(name: str, params_path: Path, scheduler: str | None) -> None:
    """Run one pipeline stage directly, as `dvc repro` would (without DVC's bookkeeping)."""
    if scheduler is not None and name != "prune":
        raise click.UsageError("--scheduler is for the prune stage")
    options = {} if scheduler is None else {"scheduler": scheduler}
    importlib.import_module(f"stages.{name}").main(params_path, **options)


@main.command()
@click.option("--metrics", "metrics_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("metrics"), show_default=True, help="Folder of the stages' metrics files.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON instead of a table.")
def report(metrics_dir: Path, as_json: bool) -> None:
    """The scores of the paper's ablation (percent) and the seconds each stage took.

    CAM mIoU on val and train, reliable-region precision and coverage, one-step mIoU with and
    without CRF, pseudo-label mIoU on train and two-step (DeepLab) mIoU, read from
    metrics/<stage>.json; a stage that has not run reads "not run".
    """
    import json

    from pipeline.report import format_rows, read_metrics, report_rows, rows_as_json

    rows = report_rows(read_metrics(metrics_dir, STAGES))
    click.echo(json.dumps(rows_as_json(rows), indent=1) if as_json else format_rows(rows))

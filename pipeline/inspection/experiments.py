"""DVC's experiments of a project as one short table: each experiment, the parameters that differ
between them, and the headline scores.

``dvc exp show`` prints every parameter (about ninety) and every DVC metric; a metric key found in
two files is named by its file (``metrics/segment.json:miou``), so the scores the pipeline is
judged by do not fit a terminal. This table reads the same data (``dvc exp show --json``) and
keeps what a threshold or a recipe is tried for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import InputError
from pipeline.core.params import PARAMS_FILE
from pipeline.core.registry import STAGES
from pipeline.inspection.report import measured


@dataclass(frozen=True)
class Column:
    """A headline score: its title, the stage whose metrics hold it and its key path there."""

    title: str
    stage: str
    key: tuple[str, ...]


COLUMNS = (Column("CAM", "cams", ("miou",)), Column("prec", "prune", ("precision",)),
           Column("cov", "prune", ("coverage",)), Column("refined", "refine", ("miou",)),
           Column("pseudo", "segment", ("pseudo", "miou")), Column("one-step", "segment", ("miou",)),
           Column("two-step", "deeplab", ("miou",)))
"""The scores of the table, in pipeline order (percent); the seconds of every stage follow, summed."""


@dataclass(frozen=True)
class Experiment:
    """One row: its name as DVC shows it (the workspace, a commit, or an experiment under its
    commit), its state where it has not finished, its parameters (flat, dotted keys) and each
    metrics file's contents by path."""

    name: str
    state: str
    params: Mapping[str, Any]
    metrics: Mapping[str, Mapping[str, Any]]


def read_experiments(root: Path) -> list[Experiment]:
    """The rows of ``dvc exp show --json`` in ``root``: every baseline, each followed by its
    experiments, newest first as DVC lists them."""
    done = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=root, capture_output=True,
                          text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise InputError(f"{root}: dvc exp show failed: {last}")
    return experiments(json.loads(done.stdout))


def experiments(shown: Sequence[Mapping[str, Any]]) -> list[Experiment]:
    """The rows of the document ``dvc exp show --json`` prints."""
    return [row for baseline in shown for row in _rows(baseline)]


def _rows(baseline: Mapping[str, Any]) -> list[Experiment]:
    rev = baseline["rev"]
    rows = [_experiment(baseline.get("name") or (rev if rev == "workspace" else rev[:7]), "", baseline)]
    for experiment in baseline.get("experiments") or []:
        state = (experiment.get("executor") or {}).get("state") or ""
        latest = experiment["revs"][0]
        rows.append(_experiment(f"└ {experiment.get('name') or latest['rev'][:7]}",
                                "" if state == "success" else state, latest))
    return rows


def _experiment(name: str, state: str, rev: Mapping[str, Any]) -> Experiment:
    data = rev.get("data") or {}
    params = {key: value for document in (data.get("params") or {}).values()
              for key, value in _flat(document.get("data") or {}).items()}
    metrics = {path: document.get("data") or {} for path, document in (data.get("metrics") or {}).items()}
    return Experiment(name, state or ("error" if rev.get("error") else ""), params, metrics)


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_params(rows: Sequence[Experiment]) -> list[str]:
    """The parameters whose values differ between those of ``rows`` that have any (a queued
    experiment has none yet), in params-file order."""
    known = [row for row in rows if row.params]
    keys = list(dict.fromkeys(key for row in known for key in row.params))
    return [key for key in keys if len({json.dumps(row.params.get(key), sort_keys=True) for row in known}) > 1]


def score(row: Experiment, column: Column) -> float | None:
    """``column``'s value in ``row`` (a ratio), None where the stage has no such number (not run,
    switched off, no ground truth)."""
    return measured(row.metrics.get(STAGES[column.stage].metrics_file.as_posix()), column.key)[0]


def seconds(row: Experiment) -> float | None:
    """The seconds of every stage of ``row`` that timed itself, summed; None where none did."""
    spent = [data["seconds"] for data in row.metrics.values() if isinstance(data.get("seconds"), (int, float))]
    return sum(spent) if spent else None


def experiment_rows(rows: Sequence[Experiment]) -> list[dict[str, str]]:
    """The table's cells, a mapping of header to text per row: ``Experiment``, each changed
    parameter (by its last name where that is unique among them), the :data:`COLUMNS` and
    ``seconds``."""
    changed = changed_params(rows)
    short = [key.rsplit(".", 1)[-1] for key in changed]
    headers = [name if short.count(name) == 1 else key for key, name in zip(changed, short, strict=True)]
    table = []
    for row in rows:
        cells = {"Experiment": f"{row.name} ({row.state})" if row.state else row.name}
        cells.update((header, _text(row.params.get(key))) for header, key in zip(headers, changed, strict=True))
        cells.update((column.title, _percent(score(row, column))) for column in COLUMNS)
        spent = seconds(row)
        cells["seconds"] = "-" if spent is None else f"{spent:.0f}"
        table.append(cells)
    return table


def _text(value: Any) -> str:
    return "-" if value is None else json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def format_table(rows: Sequence[Mapping[str, str]], width: int) -> str:
    """``rows`` as aligned text, the experiment left and the rest right; parameter columns that do
    not fit in ``width`` characters are named under the table instead."""
    if not rows:
        return f"no experiments: run `dvc exp run` (see the README) in a project with {PARAMS_FILE}"
    headers = list(rows[0])
    fixed = {"Experiment", "seconds", *(column.title for column in COLUMNS)}
    widths = {header: max(len(header), *(len(row[header]) for row in rows)) for header in headers}
    room = width - sum(widths[header] + 2 for header in headers if header in fixed)
    shown, hidden = [], []
    for header in headers:
        if header in fixed or widths[header] + 2 <= room:
            shown.append(header)
            room -= 0 if header in fixed else widths[header] + 2
        else:
            hidden.append(header)
    lines = [_line({header: header for header in shown}, widths), *(_line(row, widths, shown) for row in rows)]
    if hidden:
        lines.append(f"changed too, not shown at {width} columns: {', '.join(hidden)} (dvc exp show --only-changed)")
    return "\n".join(lines)


def _line(cells: Mapping[str, str], widths: Mapping[str, int], shown: Sequence[str] | None = None) -> str:
    """The ``shown`` cells (all by default) padded to ``widths``: the experiment left, the rest right."""
    return "  ".join(cells[header].ljust(widths[header]) if header == "Experiment" else
                     cells[header].rjust(widths[header]) for header in shown or cells).rstrip()

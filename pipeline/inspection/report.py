"""One table of what the stages measured, in the rows of the paper's ablation, and what they cost.

Every stage writes ``scores/<stage>.json`` with its scores (ratios in 0..1) and the wall time it
took (``seconds``); ``metrics/<stage>.json``, DVC's metrics, holds their headline. The report
reads the scores back: the scores as percentages with one decimal, as
the paper prints them, then the seconds of each stage and their total. A stage without a file
reads "not run"; a stage switched off (``{"enabled": false}``) reads "disabled"; a score its stage
could not compute reads "no ground truth" where no image it scores has a mask (``scored_images``
0 beside the score), else "n/a".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.core.io import read_json_object
from pipeline.core.registry import STAGES, Score

StageScores = Mapping[str, Mapping[str, Any] | None]
"""The scores file of each stage by stage name; None for a stage that has not run."""


SCORES = tuple((stage.name, score) for stage in STAGES.values() for score in stage.scores)
"""The report's rows, each stage's declared :class:`~pipeline.core.registry.Score` in pipeline order."""

RATIO = ("Two-step / supervised", "deeplab", "supervised")
"""The figure WSSS papers quote: the two-step mIoU as a share of the fully supervised one."""


@dataclass(frozen=True)
class Row:
    """One line of the report: ``value`` rounded for display, or None and ``status`` says why;
    ``settings`` the settings that made it (``name: value, ...``; empty where none is named)."""

    label: str
    stage: str
    value: float | None
    unit: str
    status: str
    settings: str = ""


def read_scores(scores_dir: Path) -> dict[str, dict[str, Any] | None]:
    """``scores_dir/<stage>.json`` of each stage that writes scores, in pipeline order; None where
    the file does not exist."""
    return {stage.name: _read_json(scores_dir / stage.scores_file.name) for stage in STAGES.values()
            if stage.scores_file is not None}


def _read_json(path: Path) -> dict[str, Any] | None:
    return read_json_object(path, "scores file") if path.is_file() else None


def _lookup(scores: Mapping[str, Any], key: tuple[str, ...]) -> Any:
    value: Any = scores
    for part in key:
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def measured(scores: Mapping[str, Any] | None, key: tuple[str, ...]) -> tuple[float | None, str]:
    """The number at ``key`` in a stage's scores and "ok", or None and why there is none."""
    if scores is None:
        return None, "not run"
    if scores.get("enabled") is False:
        return None, "disabled"
    value = _lookup(scores, key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None, "no ground truth" if _lookup(scores, (*key[:-1], "scored_images")) == 0 else "n/a"
    return float(value), "ok"


def _row(label: str, stage: str, value: float | None, status: str, unit: str, scale: float = 1.0) -> Row:
    return Row(label, stage, None if value is None else round(value * scale, 1), unit, status)


def _ratio(documents: StageScores) -> Row:
    """The :data:`RATIO` row: the first stage's mIoU over the second's, or why there is none."""
    label, numerator, denominator = RATIO
    (top, top_status), (bottom, bottom_status) = (measured(documents.get(stage), ("miou",))
                                                  for stage in (numerator, denominator))
    if top is None or bottom is None:
        return _row(label, numerator, None, top_status if top is None else bottom_status, "%")
    return _row(label, numerator, top / bottom if bottom else None, "ok" if bottom else "n/a", "%", 100.0)


def _settings(score: Score, scores: Mapping[str, Any] | None) -> str:
    """The :attr:`Score.settings` the stage's scores name, ``name: value, ...``."""
    return ", ".join(f"{key}: {scores[key]}" for key in score.settings if scores is not None and key in scores)


def _shown(score: Score, scores: Mapping[str, Any] | None) -> bool:
    """Whether the row is shown: always, but an optional one where its stage ran without the key."""
    return not (score.optional and scores is not None and scores.get("enabled") is not False
                and _lookup(scores, score.key) is None)


def report_rows(documents: StageScores) -> list[Row]:
    """The score rows (percent) with the two-step / supervised ratio, the seconds of every stage in
    ``documents``' order and their total."""
    scores = [replace(_row(s.label, stage, *measured(documents.get(stage), s.key), "%", 100.0),
                      settings=_settings(s, documents.get(stage)))
              for stage, s in SCORES if _shown(s, documents.get(stage))]
    scores.append(_ratio(documents))
    seconds = {stage: measured(data, ("seconds",)) for stage, data in documents.items()}
    times = [_row(f"Time: {stage}", stage, *measured, "s") for stage, measured in seconds.items()]
    spent = [value for value, _ in seconds.values() if value is not None]
    total = _row("Time: total", "", sum(spent), "ok", "s") if spent else _row("Time: total", "", None, "not run", "s")
    return scores + times + [total]


def format_rows(rows: Sequence[Row]) -> str:
    """The rows as an aligned two-column text table, each row's settings in brackets after its label."""
    cells = [(f"{row.label} [{row.settings}]" if row.settings else row.label,
              row.status if row.value is None else f"{row.value:.1f} {row.unit}") for row in rows]
    width = max(len(label) for label, _ in cells)
    value_width = max(len(value) for _, value in cells)
    return "\n".join(f"{label:<{width}}  {value:>{value_width}}" for label, value in cells)


def rows_as_json(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """The rows as JSON-ready dicts with the same rounded values as the table."""
    return [asdict(row) for row in rows]

"""The `run:` section: how the stages run on this machine, never what they write.

No stage lists the section among its DVC params, and no record of what a store or a network was
made from holds it (see :mod:`pipeline.core.provenance`): changing it between runs, or for one
rerun, reruns no stage and keeps every finished store and checkpoint. Whatever changes an output
belongs to a stage's own section instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.params import PARAMS_FILE, check_range, load_params

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class RunParams:
    loader_workers: int | None = None
    """DataLoader processes that read and augment the images (0: in the stage's own process).
    None: :meth:`loader_processes` picks by device."""
    workers: int | None = None
    """Local processes of the dense CRFs: pruning, end-to-end mining and the inference CRFs (each
    started clean, one thread each: the CRF holds the GIL). None: one per CPU core."""
    scheduler: str | None = None
    """A running dask scheduler's address (e.g. ``tcp://10.0.0.1:8786``): pruning and the inference
    CRFs run on its workers instead (which must see the same files); None: local processes."""
    chunk_size: int = 8
    """Images per pruning task, which spreads the scheduler's overhead per task over several images."""
    inference_batch: int = 8
    """Images of one size that go through the network together (CAMs, predictions)..."""
    batch_pixels: int = 120_000
    """...in passes of at most this many pixels, counted at each scale with the mirror images (an
    image larger than that goes alone). The default suits a CPU, where larger passes are slower;
    on a GPU raise it (e.g. 2000000)."""
    checkpoint_every: int = 100
    """Training steps between saved training states, from which a killed run resumes."""

    def __post_init__(self) -> None:
        if self.loader_workers is not None:
            check_range("loader_workers", self.loader_workers, 0)
        if self.workers is not None:
            check_range("workers", self.workers, 1)
        for name in ("chunk_size", "inference_batch", "batch_pixels", "checkpoint_every"):
            check_range(name, getattr(self, name), 1)

    def loader_processes(self, device: torch.device) -> int:
        """How many DataLoader processes read the images for a network on ``device``:
        ``loader_workers``, or else none on a CPU and one per core up to 8 on a GPU.

        On a CPU the network's threads already hold every core, and processes decoding and
        augmenting beside them only take turns with it (docs/scaling.md, "Running bigger"); reading in
        the stage's own process, between the steps, costs less than they slow it. A GPU's steps
        leave the cores free, and the images must come as fast as it takes them.
        """
        if self.loader_workers is not None:
            return self.loader_workers
        return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)

    def local_workers(self) -> int:
        """How many local CRF processes: ``workers``, or one per CPU core."""
        return self.workers or os.cpu_count() or 1


DEFAULT_RUN = RunParams()
"""The settings a library call runs with when given none."""


def load_run(params_path: str | Path = PARAMS_FILE) -> RunParams:
    """The `run:` section of the params file (all defaults where it has none)."""
    return load_params(RunParams, "run", params_path)

"""The training loop every trained stage shares.

Polynomial learning-rate decay, automatic mixed precision on CUDA, data parallel under
``torchrun`` (one process per GPU, or gloo processes on a CPU), atomic checkpoints with resume
after a kill, a progress bar with the running losses, a clear stop when a loss becomes NaN, and a
warning when the loss climbs back up after it fell (:func:`relapse`).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from pipeline.core.distributed import Distributed
from pipeline.core.io import atomic_open, fingerprint
from pipeline.core.params import check_range, check_scale_range
from pipeline.core.provenance import code_identity, dataset_identity
from pipeline.core.run import DEFAULT_RUN, RunParams
from pipeline.data.datasets import Augmentation
from pipeline.data.manifest import Manifest
from pipeline.models import param_groups


@dataclass(frozen=True)
class TrainingParams:
    """What every trained stage sets: its crops, its schedule, its optimiser (SGD with momentum).

    A stage's own parameters extend this class and may give other defaults. ``steps: 0`` means
    "evaluate the given checkpoint": only a stage whose parameters name a ``checkpoint`` (the
    classifier's) accepts it, and only with one given, so that an untrained network is never
    written over a trained one.
    """

    crop_size: int = 96
    scale_range: tuple[float, ...] = (0.9, 1.1)
    flip: bool = True
    batch_size: int = 16
    steps: int = 600
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    amp: bool = True
    deterministic: bool = False
    """Ask PyTorch for deterministic kernels while training (see :func:`deterministic_algorithms`):
    repeatable GPU runs at a speed cost. CPU runs are repeatable without it."""

    def __post_init__(self) -> None:
        for name in ("steps", "lr", "momentum", "weight_decay"):
            check_range(name, getattr(self, name), 0)
        check_range("batch_size", self.batch_size, 1)
        check_range("crop_size", self.crop_size, 8)
        check_scale_range("scale_range", self.scale_range)
        if self.steps == 0 and not getattr(self, "checkpoint", None):
            raise ValueError("steps=0 evaluates a trained `checkpoint`, and there is none to evaluate here: "
                             "it would write an untrained network over the trained one")

    def augmentation(self) -> Augmentation:
        """How the stage's training crops are drawn."""
        return Augmentation(self.crop_size, tuple(self.scale_range), self.flip)

    def optimizer(self, net: nn.Module) -> torch.optim.Optimizer:
        """SGD over PSA's four parameter groups (new layers at 10x, biases at 2x)."""
        return torch.optim.SGD(param_groups(net, self.lr, self.weight_decay), lr=self.lr, momentum=self.momentum)

    def loader(self, dataset: Dataset, ctx: Distributed, device: torch.device, run: RunParams) -> DataLoader:
        return make_loader(dataset, self.batch_size, run.loader_processes(device), ctx, self.seed, device)

    def loop(self, description: str, progress: bool, run: RunParams) -> LoopSettings:
        return LoopSettings(self.steps, run.checkpoint_every, amp=self.amp, deterministic=self.deterministic,
                            description=description, progress=progress)


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the message names the step."""


def poly_lr(base_lr: float, step: int, max_steps: int, power: float = 0.9) -> float:
    """PSA/DeepLab's polynomial decay: ``base * (1 - step / max_steps) ** power``."""
    return base_lr * (1.0 - step / max_steps) ** power


def set_poly_lr(optimizer: torch.optim.Optimizer, step: int, max_steps: int, power: float = 0.9) -> None:
    """Decay every parameter group from its own ``initial_lr`` (its multiplier included)."""
    for group in optimizer.param_groups:
        group["lr"] = poly_lr(group["initial_lr"], step, max_steps, power)


class EpochSampler(Sampler[int]):
    """A shuffle that depends only on (seed, epoch), shared out by rank, able to start mid-epoch.

    Resuming at step ``k`` then reads exactly the batches an uninterrupted run reads from step
    ``k`` on, on any number of processes that divides the data the same way.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.size // self.world_size

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        share = order[: len(self) * self.world_size][self.rank :: self.world_size]
        return iter(share[self.skip :].tolist())


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, ctx: Distributed, seed: int,
                device: torch.device) -> DataLoader:
    """A shuffling loader of whole batches; under torchrun each process reads its own share."""
    size = len(dataset)  # type: ignore[arg-type]
    if size // ctx.world_size < batch_size:
        raise ValueError(f"{size} images cannot fill a batch of {batch_size} on {ctx.world_size} process(es)")
    return DataLoader(dataset, batch_size=batch_size, sampler=EpochSampler(size, seed, ctx.rank, ctx.world_size),
                      num_workers=num_workers, pin_memory=device.type == "cuda", drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


def batches_from(loader: DataLoader, step: int) -> Iterator[Any]:
    """Batches forever, starting where step ``step`` of an uninterrupted run starts.

    Each epoch is announced to the sampler (its shuffle) and to the dataset (its per-epoch
    augmentation seed, if it has ``set_epoch``).
    """
    per_epoch = len(loader)
    epoch, offset = divmod(step, per_epoch)
    while True:
        loader.sampler.set_epoch(epoch, skip=offset * loader.batch_size)  # type: ignore[union-attr]
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)
        yield from loader
        epoch, offset = epoch + 1, 0


class Checkpoint:
    """The latest training state in one file, replaced atomically so a kill never corrupts it.

    The state carries the fingerprint of the settings it was trained with: a state left by a run
    with other parameters is not resumed from (training starts over instead).
    """

    def __init__(self, path: str | Path, fingerprint: str = "") -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint

    @classmethod
    def of_stage(cls, path: str | Path, stage: str, manifest: Manifest, split: str, *settings: Any) -> Checkpoint:
        """The training state of ``stage`` on ``manifest``'s ``split``, keyed by that split's
        images and tags (:func:`~pipeline.core.provenance.dataset_identity`), by ``settings``
        (parameters, the digests of its labels and of the weights it starts from) and by the digest
        of the code the stage runs: after DVC reruns a stage because any of them changed (a
        retagged image, a tweaked setting, an edit to its code), a state left by the earlier run is
        trained over, never resumed from."""
        return cls(path, fingerprint(dataset_identity(manifest, (split,)), *settings, code_identity(stage)))

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler | None, extra: dict[str, Any] | None = None) -> None:
        state = {"step": step, "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None,
                 "rng": torch.get_rng_state(), "fingerprint": self.fingerprint, "extra": extra or {}}
        with atomic_open(self.path, "wb") as handle:
            torch.save(state, handle)

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler | None) -> int:
        """Restore the saved state; returns the step to continue from (0 without a checkpoint)."""
        if not self.path.is_file():
            return 0
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        if state.get("fingerprint") != self.fingerprint:
            return 0
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        return int(state["step"])


def data_parallel(net: nn.Module, ctx: Distributed, device: torch.device, find_unused: bool = False) -> nn.Module:
    """``net`` in channels-last memory layout, wrapped for data-parallel training under torchrun
    (``net`` itself when run plainly).

    Channels-last weights make the convolutions run channels-last, which oneDNN trains faster on
    the CPU (bench/train_layout.py) and cuDNN's mixed-precision kernels expect; the parameters
    stay the same objects, so an optimiser built on ``net`` before or after holds them.
    ``find_unused``: some parameters get no gradient in a step (a head left out of the loss).
    """
    net.to(memory_format=torch.channels_last)
    if not ctx.enabled:
        return net
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(net, device_ids=device_ids, find_unused_parameters=find_unused)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


StepFn = Callable[[Any], dict[str, torch.Tensor]]
"""Computes the losses of one batch; the dict's ``"loss"`` entry is the one minimised."""


@contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """With ``enabled``, PyTorch's deterministic kernels in the block, and its previous mode after.

    On CUDA this makes cuDNN pick convolution algorithms without atomic additions and cuBLAS
    use a fixed workspace (``CUBLAS_WORKSPACE_CONFIG``, set here unless already set; it must be
    in place before the process's first cuBLAS call). Kernels that have no deterministic CUDA
    version, such as the backward pass of bilinear upsampling and ``scatter_add_`` along a
    dimension of a 2-D tensor (the lattice filter), only warn: they stay a source of run-to-run
    differences. On the CPU the kernels used here are deterministic already and the results
    are the same either way.
    """
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


@dataclass(frozen=True)
class LoopSettings:
    max_steps: int
    checkpoint_every: int = DEFAULT_RUN.checkpoint_every
    power: float = 0.9
    amp: bool = True
    deterministic: bool = False
    description: str = "train"
    progress: bool = True


WINDOW = 50
"""Steps per mean of a loss: the progress bar's running means and :func:`relapse`'s."""


@dataclass(frozen=True)
class Relapse:
    """Means of :data:`WINDOW` steps of a loss that fell and climbed back: the first window's,
    the lowest before the climb, the highest after it and the last, each with the step that
    ends its window (counted from the first step given)."""

    first: float
    lowest: float
    lowest_end: int
    peak: float
    peak_end: int
    last: float


def relapse(losses: Sequence[float], window: int = WINDOW) -> Relapse | None:
    """Where the mean of ``window`` consecutive steps of ``losses`` (one per step) climbed, at
    some point, above the lowest such mean before it by more than half of what the loss fell in
    all (its first window's mean less its lowest): the largest such climb. None if there is none,
    or with fewer than two windows of steps.

    A loss that falls and then climbs most of the way back has left what the network had learnt:
    a rate at the edge of stability does that, a dense energy outpulling the labels the one-step
    is trained on (docs/results/msrc.md, "The one-step's rate on an Intel Xeon"), and the loss
    may fall again later while the network stays far worse than it was at its lowest point."""
    if len(losses) < 2 * window:
        return None
    sums = [0.0]
    for value in losses:
        sums.append(sums[-1] + value)
    means = [(sums[end] - sums[end - window]) / window for end in range(window, len(sums))]
    fall = means[0] - min(means)
    lowest, climb = 0, (0.0, 0, 0)
    for index, mean in enumerate(means):
        lowest = index if mean < means[lowest] else lowest
        if mean - means[lowest] > climb[0]:
            climb = (mean - means[lowest], lowest, index)
    rise, low, peak = climb
    if fall <= 0 or rise <= fall / 2:
        return None
    return Relapse(means[0], means[low], low + window, means[peak], peak + window, means[-1])


def relapse_warning(description: str, losses: Sequence[float], start: int) -> str | None:
    """The warning of :func:`relapse` for the ``losses`` of steps ``start + 1`` on, in words."""
    found = relapse(losses)
    if found is None:
        return None

    def steps(end: int) -> str:
        return f"steps {start + end - WINDOW + 1}-{start + end}"

    return (f"{description}: the loss fell from {found.first:.3g} ({steps(WINDOW)}) to {found.lowest:.3g} "
            f"({steps(found.lowest_end)}), climbed back to {found.peak:.3g} ({steps(found.peak_end)}) and ended at "
            f"{found.last:.3g}: the network has left what it learnt; a lower rate (the stage's lr) keeps it")


def train(model: nn.Module, loader: DataLoader, step_fn: StepFn, optimizer: torch.optim.Optimizer,
          settings: LoopSettings, checkpoint: Checkpoint, ctx: Distributed, device: torch.device) -> dict[str, float]:
    """Run ``step_fn`` from the checkpointed step (or 0) to ``settings.max_steps``.

    Returns the mean of each loss over the last up to :data:`WINDOW` steps. Raises
    :class:`TrainingDiverged` with the step number when a loss is not finite; prints the
    :func:`relapse_warning` of the steps run, if any, to stderr.
    """
    use_amp = settings.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    start = checkpoint.load(model, optimizer, scaler)
    batches = batches_from(loader, start)
    model.train()
    recent: dict[str, list[float]] = {}
    history: list[float] = []
    bar = tqdm(total=settings.max_steps, initial=start, desc=settings.description,
               disable=not (settings.progress and ctx.is_main), dynamic_ncols=True)
    with deterministic_algorithms(settings.deterministic):
        for step in range(start, settings.max_steps):
            set_poly_lr(optimizer, step, settings.max_steps, settings.power)
            batch = next(batches)
            with torch.autocast(device.type, enabled=use_amp):
                losses = step_fn(batch)
            values = {name: float(value.detach()) for name, value in losses.items()}
            bad = [name for name, value in values.items() if not math.isfinite(value)]
            if bad:
                raise TrainingDiverged(f"{settings.description}: loss {bad[0]!r} became {values[bad[0]]} at step {step}"
                                       f" (last checkpoint: {checkpoint.path})")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(losses["loss"]).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                losses["loss"].backward()
                optimizer.step()
            history.append(values["loss"])
            for name, value in values.items():
                recent.setdefault(name, []).append(value)
                del recent[name][:-WINDOW]
            bar.update(1)
            bar.set_postfix({name: f"{sum(v) / len(v):.4g}" for name, v in recent.items()}, refresh=False)
            done = step + 1
            if ctx.is_main and (done % settings.checkpoint_every == 0 or done == settings.max_steps):
                checkpoint.save(done, model, optimizer, scaler)
    bar.close()
    warning = relapse_warning(settings.description, history, start) if ctx.is_main else None
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return {name: sum(v) / len(v) for name, v in recent.items()}

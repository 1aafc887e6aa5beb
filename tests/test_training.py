import itertools

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pipeline.train.loop import (
    Checkpoint,
    Distributed,
    EpochSampler,
    LoopSettings,
    TrainingDiverged,
    make_loader,
    poly_lr,
    relapse,
    train,
)

CPU = torch.device("cpu")


def _problem():
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(24, 3), torch.randn(24, 1))
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.2), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = make_loader(data, batch_size=5, num_workers=0, ctx=Distributed(), seed=3, device=CPU)

    def step(batch):
        x, y = batch
        return {"loss": nn.functional.mse_loss(model(x), y)}

    return model, optimizer, loader, step


def _run(tmp_path, name, stop_at=None, max_steps=11):
    """Train from the state saved in ``name``; with ``stop_at``, killed during step ``stop_at``."""
    model, optimizer, loader, step = _problem()
    calls = itertools.count()

    def step_or_die(batch):
        if next(calls) == stop_at:
            raise KeyboardInterrupt
        return step(batch)

    settings = LoopSettings(max_steps=max_steps, checkpoint_every=3, progress=False)
    train(model, loader, step_or_die, optimizer, settings, Checkpoint(tmp_path / name), Distributed(), CPU)
    return model


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    straight = _run(tmp_path, "a.pt")
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "b.pt", stop_at=8)
    assert torch.load(tmp_path / "b.pt", weights_only=False)["step"] == 6
    resumed = _run(tmp_path, "b.pt")
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_nan_loss_stops_with_the_step_number(tmp_path):
    model, optimizer, loader, _ = _problem()
    calls = []

    def step(batch):
        calls.append(1)
        loss = model(batch[0]).mean()
        return {"loss": loss * (float("nan") if len(calls) == 4 else 1.0)}

    with pytest.raises(TrainingDiverged, match="loss 'loss' became nan at step 3"):
        train(model, loader, step, optimizer, LoopSettings(max_steps=10, progress=False),
              Checkpoint(tmp_path / "c.pt"), Distributed(), CPU)


RELAPSING = [2.0 - step / 100 for step in range(100)] + [1.0] * 50 + [1.0 + (step + 1) / 50 for step in range(50)]
"""A loss that falls from 2 to 1 in 100 steps, stays there 50 and climbs back to 2 in 50."""


def test_a_loss_that_falls_and_climbs_back_is_a_relapse():
    falling = [2.0 - step / 100 for step in range(150)]  # 2.0 down to 0.51
    assert relapse(falling) is None
    assert relapse(falling[:99]) is None  # fewer than two windows of 50 steps: too soon to tell
    noisy = [value + (0.05 if step % 2 else -0.05) for step, value in enumerate(falling + [0.5] * 50)]
    assert relapse(noisy) is None  # a plateau at the lowest point is training, not a relapse
    found = relapse(RELAPSING)
    assert (found.lowest_end, found.peak_end) == (150, 200)
    assert (found.first, found.lowest, found.peak, found.last) == pytest.approx((1.755, 1.0, 1.51, 1.51))
    assert relapse(RELAPSING[:-25]) is None  # climbed back less than half of its fall, so far
    falling_again = relapse(RELAPSING + [2.0 - step / 100 for step in range(1, 81)])
    assert falling_again.lowest == pytest.approx(1.0) and falling_again.last == pytest.approx(1.445)
    assert falling_again.peak > falling_again.last  # down again at the end, as the one-step's collapse on MSRC


def test_training_whose_loss_climbs_back_warns_with_the_steps_and_the_rate(tmp_path, capsys):
    model, optimizer, loader, _ = _problem()
    losses = iter(RELAPSING)

    def step(batch):
        return {"loss": model(batch[0]).sum() * 0 + next(losses)}

    train(model, loader, step, optimizer, LoopSettings(max_steps=200, checkpoint_every=200, progress=False,
                                                       description="segment staged"),
          Checkpoint(tmp_path / "d.pt"), Distributed(), CPU)
    assert capsys.readouterr().err == (
        "warning: segment staged: the loss fell from 1.75 (steps 1-50) to 1 (steps 101-150), climbed back to 1.51 "
        "(steps 151-200) and ended at 1.51: the network has left what it learnt; a lower rate (the stage's lr) "
        "keeps it\n")


def test_poly_decay_and_per_group_multipliers(tmp_path):
    assert poly_lr(1.0, 0, 100) == 1.0
    assert poly_lr(1.0, 50, 100) == pytest.approx(0.5**0.9)
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [a], "lr": 0.01}, {"params": [b], "lr": 0.1}])
    seen = []

    def step(batch):
        seen.append([g["lr"] for g in optimizer.param_groups])
        return {"loss": (a + b).sum() * 0}

    loader = make_loader(TensorDataset(torch.zeros(4, 1)), 2, 0, Distributed(), 0, CPU)
    train(nn.ParameterList([a, b]), loader, step, optimizer, LoopSettings(max_steps=4, progress=False),
          Checkpoint(tmp_path / "d.pt"), Distributed(), CPU)
    assert seen[2] == pytest.approx([0.01 * 0.5**0.9, 0.1 * 0.5**0.9])


@pytest.mark.parametrize("momentum", [0.9, 5e-4, 0.0])
def test_every_group_takes_the_section_s_momentum_and_only_weights_decay(momentum):
    from pipeline.train.classifier import ClassifierParams, build_classifier

    params = ClassifierParams(momentum=momentum, weight_decay=5e-4, lr=0.01)
    optimizer = params.optimizer(build_classifier(params, num_classes=3))
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert {group["momentum"] for group in groups.values()} == {momentum}
    assert {name: (group["lr"], group["weight_decay"]) for name, group in groups.items()} == {
        "backbone weights": (0.01, 5e-4), "backbone biases": (0.02, 0.0),
        "new weights": (0.1, 5e-4), "new biases": (0.2, 0.0)}


def test_epoch_sampler_shards_cover_each_epoch_once_and_resume_mid_epoch():
    shards = [list(EpochSampler(10, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(10))
    sampler = EpochSampler(10, seed=1)
    full = list(sampler)
    sampler.set_epoch(0, skip=4)
    assert list(sampler) == full[4:]
    sampler.set_epoch(1)
    assert list(sampler) != full


def test_a_state_from_other_settings_is_not_resumed(tmp_path):
    model, optimizer, loader, step = _problem()
    Checkpoint(tmp_path / "e.pt", fingerprint="lr=0.1").save(5, model, optimizer, None)
    assert Checkpoint(tmp_path / "e.pt", fingerprint="lr=0.1").load(model, optimizer, None) == 5
    assert Checkpoint(tmp_path / "e.pt", fingerprint="lr=0.2").load(model, optimizer, None) == 0

"""The ``deterministic`` training switch: it changes no result on the CPU, whose kernels are
deterministic already, and puts PyTorch's mode back when training ends."""

import torch
from torch import nn
from torch.utils.data import TensorDataset

from pipeline.core.distributed import Distributed
from pipeline.core.run import RunParams
from pipeline.train.loop import Checkpoint, LoopSettings, TrainingParams, make_loader, train

CPU = torch.device("cpu")


def _train(tmp_path, deterministic: bool) -> tuple[nn.Module, list[bool]]:
    """A small regression trained 4 steps; also whether each step ran in deterministic mode."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(16, 3), torch.randn(16, 1))
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.2), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = make_loader(data, batch_size=4, num_workers=0, ctx=Distributed(), seed=1, device=CPU)
    modes = []

    def step(batch):
        modes.append(torch.are_deterministic_algorithms_enabled())
        x, y = batch
        return {"loss": nn.functional.mse_loss(model(x), y)}

    settings = LoopSettings(max_steps=4, deterministic=deterministic, progress=False)
    train(model, loader, step, optimizer, settings, Checkpoint(tmp_path / f"{deterministic}.pt"), Distributed(), CPU)
    return model, modes


def test_deterministic_training_gives_the_same_weights_on_the_cpu_and_restores_the_mode(tmp_path):
    plain, plain_modes = _train(tmp_path, deterministic=False)
    strict, strict_modes = _train(tmp_path, deterministic=True)
    assert plain_modes == [False] * 4 and strict_modes == [True] * 4
    assert not torch.are_deterministic_algorithms_enabled()
    for a, b in zip(plain.state_dict().values(), strict.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_the_switch_is_a_training_parameter_passed_to_the_loop():
    assert not TrainingParams().deterministic
    assert TrainingParams(deterministic=True).loop("classifier", False, RunParams()).deterministic

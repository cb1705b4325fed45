"""Activation checkpointing for any model (torch's checkpoint_wrapper), alone and combined with the cache:
exact with dropout on, in float64, against the full-batch loss drawing the same masks."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from gcbench.cache import Objective
from gcbench.cache.checkpointing import checkpoint_layers, has_checkpointed_layers, uncheckpoint_layers
from gcbench.cache.layers import repeated_layers
from gcbench.losses import InBatchSoftmax
from gcbench.measure.equivalence import check_strategy, compare, gradients
from gcbench.strategies import backward_in_order, make_strategy
from gcbench.verify import workload_config

F64 = 1e-12


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear, self.drop = nn.Linear(width, width), nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(torch.tanh(self.linear(x)))


class Tower(nn.Module):
    """A user's model: no checkpointing switch of its own, its blocks in a ModuleList."""

    def __init__(self, width: int = 6, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(4, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return x


def strategy_against_reference(strategy: str, tied: bool, wrap_with=None) -> float:
    """One step of ``strategy`` on Towers with dropout, against the same-mask full-batch reference."""
    order = []

    def run(role: str):
        torch.manual_seed(0)
        q = Tower().double()
        p = q if tied else Tower().double()
        if wrap_with is not None and role == "strategy":
            wrap_with(q)
            wrap_with(p)
        generator = torch.Generator().manual_seed(1)
        batches = [torch.randn(10, 4, generator=generator, dtype=torch.float64) for _ in range(2)]
        objective = Objective([q, p], InBatchSoftmax(0.5))
        torch.manual_seed(2)
        if role == "strategy":
            chosen = make_strategy(strategy, objective, 3)
            order.extend(chosen.encode_order(chosen.check_batches(batches)))
            loss = chosen.forward_backward(batches)
            assert has_checkpointed_layers(q) == (strategy != "cache" or wrap_with is not None)
            chosen.release()
        else:
            loss = backward_in_order(objective, batches, order, {})
        assert not any(isinstance(m, CheckpointWrapper) for m in q.modules()) or wrap_with is not None
        return gradients(list(objective.parameters())), float(loss)

    grads, loss = run("strategy")
    ref, ref_loss = run("reference")
    comparison = compare(grads, ref, loss, ref_loss)
    assert comparison.loss_diff <= F64
    return comparison.max_rel_err


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("strategy", ["checkpoint", "cache-checkpoint"])
def test_any_model_checkpointed_is_exact_with_dropout(strategy, tied):
    assert strategy_against_reference(strategy, tied) <= F64


def test_a_checkpoint_that_does_not_replay_its_rng_is_caught():
    """The control: checkpoints that draw fresh dropout masks in the recomputation give other gradients."""

    def careless(model: nn.Module) -> None:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

        for i, block in enumerate(model.blocks):
            model.blocks[i] = checkpoint_wrapper(
                block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=False
            )

    assert strategy_against_reference("cache", False, careless) > 1e-3


@pytest.mark.slow
def test_cache_checkpoint_on_gcbench_s_transformer_with_dropout():
    config = workload_config("dpr", 0.1)
    config = replace(config, model=replace(config.model, vocab=2000))
    comparison = check_strategy(config, "cache-checkpoint", 4, (3, 5), precision="float64", keep_graphs=0)
    assert comparison.passes(F64), comparison


def test_layers_found_wrapped_and_put_back():
    model = Tower()
    assert repeated_layers(model) == list(model.blocks)
    assert repeated_layers(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))) != []
    names = [n for n, _ in model.named_parameters()]
    assert checkpoint_layers(model) == 3 and checkpoint_layers(model) == 0  # twice wraps nothing more
    assert all(isinstance(b, CheckpointWrapper) for b in model.blocks)
    assert checkpoint_layers(model, ["Linear"]) == 1  # the embedding (the blocks' Linears are inside wrappers)
    assert uncheckpoint_layers(model) == 4 and [n for n, _ in model.named_parameters()] == names
    with pytest.raises(ValueError, match="no module of class 'Attention' in Tower"):
        checkpoint_layers(model, ["Attention"])

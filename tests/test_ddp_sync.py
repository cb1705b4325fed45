"""DDP-wrapped encoders all-reduce once per step, counted with a communication hook."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gcbench import GradCache


@pytest.fixture
def process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def counting_ddp(module: nn.Module, counter: list[int]) -> DDP:
    ddp = DDP(module)

    def hook(state, bucket):
        counter.append(bucket.index())
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    ddp.register_comm_hook(None, hook)
    return ddp


def loss(a, b):
    return (a @ b.T).logsumexp(1).mean()


@pytest.mark.parametrize("reuse", [True, False])
def test_two_encoders_sync_once_each(process_group, reuse):
    torch.manual_seed(0)
    calls_q, calls_p = [], []
    q, p = counting_ddp(nn.Linear(4, 3), calls_q), counting_ddp(nn.Linear(4, 3), calls_p)
    GradCache([q, p], loss, 2, reuse_last_graph=reuse)(torch.randn(8, 4), torch.randn(8, 4))
    assert len(calls_q) == 1 and len(calls_p) == 1  # one bucket each, reduced once, 4 chunks each


@pytest.mark.parametrize("reuse", [True, False])
def test_tied_encoder_syncs_once(process_group, reuse):
    torch.manual_seed(0)
    calls = []
    enc = counting_ddp(nn.Linear(4, 3), calls)
    GradCache([enc, enc], loss, 3, reuse_last_graph=reuse)(torch.randn(7, 4), torch.randn(7, 4))
    assert len(calls) == 1


def test_ddp_gradients_equal_plain_module(process_group):
    torch.manual_seed(0)
    plain = nn.Linear(4, 3)
    wrapped = counting_ddp(nn.Linear(4, 3), [])
    wrapped.module.load_state_dict(plain.state_dict())
    x, y = torch.randn(7, 4), torch.randn(7, 4)
    GradCache([plain, plain], loss, 3)(x, y)
    GradCache([wrapped, wrapped], loss, 3)(x, y)
    assert torch.allclose(plain.weight.grad, wrapped.module.weight.grad, atol=1e-7)


def test_accumulate_syncs_once_per_step(process_group):
    from gcbench.strategies import Objective, make_strategy

    torch.manual_seed(0)
    calls = []
    enc = counting_ddp(nn.Linear(4, 3), calls)
    strategy = make_strategy("accumulate", Objective([enc, enc], loss), 2)
    strategy.forward_backward([torch.randn(8, 4), torch.randn(8, 4)])  # four micro-batches
    assert len(calls) == 1

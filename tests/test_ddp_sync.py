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
    """DDP with a communication hook that counts all-reduces and keeps what each one would reduce."""
    ddp = DDP(module)
    ddp.reduced = []  # type: ignore[attr-defined]

    def hook(state, bucket):
        counter.append(bucket.index())
        ddp.reduced.append(bucket.buffer().clone())
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    ddp.register_comm_hook(None, hook)
    return ddp


def reduced_everything(ddp: DDP) -> bool:
    """The one all-reduce carried the whole step's gradient, not the part of the chunks before it."""
    total = torch.cat([p.grad.flatten() for p in ddp.module.parameters()])
    return len(ddp.reduced) == 1 and torch.allclose(ddp.reduced[0].sort().values, total.sort().values)


def loss(a, b):
    return (a @ b.T).logsumexp(1).mean()


@pytest.mark.parametrize("keep", [0, 1, 3, "all"])
def test_two_encoders_sync_once_each(process_group, keep):
    torch.manual_seed(0)
    calls_q, calls_p = [], []
    q, p = counting_ddp(nn.Linear(4, 3), calls_q), counting_ddp(nn.Linear(4, 3), calls_p)
    GradCache([q, p], loss, 2, keep_graphs=keep)(torch.randn(8, 4), torch.randn(8, 4))
    assert len(calls_q) == 1 and len(calls_p) == 1  # one bucket each, reduced once, 4 chunks each
    assert reduced_everything(q) and reduced_everything(p)


@pytest.mark.parametrize("keep", [0, 1, 3, "all"])
def test_tied_encoder_syncs_once(process_group, keep):
    torch.manual_seed(0)
    calls = []
    enc = counting_ddp(nn.Linear(4, 3), calls)
    GradCache([enc, enc], loss, 3, keep_graphs=keep)(torch.randn(7, 4), torch.randn(7, 4))
    assert len(calls) == 1 and reduced_everything(enc)


@pytest.mark.parametrize("keep", [0, 1, 2, 3, "all"])
def test_ddp_gradients_equal_plain_module(process_group, keep):
    torch.manual_seed(0)
    plain = nn.Linear(4, 3)
    wrapped = counting_ddp(nn.Linear(4, 3), [])
    wrapped.module.load_state_dict(plain.state_dict())
    x, y = torch.randn(7, 4), torch.randn(7, 4)
    GradCache([plain, plain], loss, 3, keep_graphs=keep)(x, y)
    GradCache([wrapped, wrapped], loss, 3, keep_graphs=keep)(x, y)
    assert torch.allclose(plain.weight.grad, wrapped.module.weight.grad, atol=1e-7)


@pytest.mark.parametrize("keep", [1, 2, 5, "all"])
def test_a_module_with_one_chunk_may_keep_its_syncing_graph(process_group, keep):
    """Queries fit one chunk, passages take four: every kept graph but the syncing one of a module with several."""
    torch.manual_seed(0)
    plain_q, plain_p = nn.Linear(4, 3), nn.Linear(4, 3)
    calls_q, calls_p = [], []
    q, p = counting_ddp(nn.Linear(4, 3), calls_q), counting_ddp(nn.Linear(4, 3), calls_p)
    q.module.load_state_dict(plain_q.state_dict())
    p.module.load_state_dict(plain_p.state_dict())
    x, y = torch.randn(2, 4), torch.randn(8, 4)
    GradCache([plain_q, plain_p], loss, 2, keep_graphs=keep)(x, y)
    GradCache([q, p], loss, 2, keep_graphs=keep)(x, y)
    assert len(calls_q) == 1 and len(calls_p) == 1 and reduced_everything(q) and reduced_everything(p)
    for a, b in ((plain_q, q.module), (plain_p, p.module)):
        assert torch.allclose(a.weight.grad, b.weight.grad, atol=1e-7)


def test_accumulate_syncs_once_per_step(process_group):
    from gcbench.strategies import Objective, make_strategy

    torch.manual_seed(0)
    calls = []
    enc = counting_ddp(nn.Linear(4, 3), calls)
    strategy = make_strategy("accumulate", Objective([enc, enc], loss), 2)
    strategy.forward_backward([torch.randn(8, 4), torch.randn(8, 4)])  # four micro-batches
    assert len(calls) == 1


@pytest.mark.parametrize("keep", [0, 1, "all"])
def test_the_syncing_chunk_goes_backward_when_the_loss_ignores_its_input(process_group, keep):
    """A tied encoder's last chunk belongs to an input the loss ignores: it still syncs, with zeros."""
    torch.manual_seed(0)
    calls = []
    enc = counting_ddp(nn.Linear(4, 3), calls)

    def ignores_the_second(a, b):
        return (a @ a.T).logsumexp(1).mean()

    GradCache([enc, enc], ignores_the_second, 3, keep_graphs=keep)(torch.randn(7, 4), torch.randn(7, 4))
    assert len(calls) == 1 and reduced_everything(enc)


def test_a_gradient_the_loss_leaves_out_is_zeros_of_the_tensors_kind(process_group):
    """The mean over ranks fills an unused tensor's gradient with zeros in its dtype (and on its device)."""
    from types import SimpleNamespace

    from gcbench.distributed.local import _MeanGradOverRanks

    ctx = SimpleNamespace()
    used, unused = torch.ones(2, 3, dtype=torch.float16), torch.ones(4, dtype=torch.float16)
    _MeanGradOverRanks.forward(ctx, None, used, unused)
    _, grad_used, grad_unused = _MeanGradOverRanks.backward(ctx, torch.ones(2, 3, dtype=torch.float16), None)
    assert grad_used.dtype == grad_unused.dtype == torch.float16 and grad_unused.device == unused.device
    assert torch.equal(grad_unused, torch.zeros(4, dtype=torch.float16))


def test_the_count_and_the_content_check_bite(process_group):
    """The controls of the checks above: chunks backpropagated one by one through DDP without ``no_sync``
    all-reduce once per chunk; syncing on the first chunk instead of the last reduces once, but only a part
    of the step's gradient."""
    torch.manual_seed(0)
    chunks = torch.randn(8, 4).split(2)
    calls: list[int] = []
    every_chunk = counting_ddp(nn.Linear(4, 3), calls)
    for chunk in chunks:
        every_chunk(chunk).pow(2).sum().backward()
    assert len(calls) == 4 and not reduced_everything(every_chunk)
    calls = []
    first_only = counting_ddp(nn.Linear(4, 3), calls)
    first_only(chunks[0]).pow(2).sum().backward()
    with first_only.no_sync():
        for chunk in chunks[1:]:
            first_only(chunk).pow(2).sum().backward()
    assert len(calls) == 1 and not reduced_everything(first_only)


@pytest.mark.parametrize("keep", [0, 1, "all"])
def test_reduce_every_chunk_all_reduces_each_backward_and_is_exact(process_group, keep):
    torch.manual_seed(0)
    plain = nn.Linear(4, 3)
    calls = []
    wrapped = counting_ddp(nn.Linear(4, 3), calls)
    wrapped.module.load_state_dict(plain.state_dict())
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    GradCache([plain, plain], loss, 2, keep_graphs=keep)(x, y)
    GradCache([wrapped, wrapped], loss, 2, keep_graphs=keep, reduce="chunk")(x, y)
    assert len(calls) == 8  # one bucket, 8 backwards
    assert torch.allclose(plain.weight.grad, wrapped.module.weight.grad, atol=1e-7)

"""GradCache hands back the step's representations: the values of a full forward, at no extra memory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gcbench import GradCache
from gcbench.cache import CachedStep
from gcbench.losses import InBatchSoftmax
from gcbench.measure.memory import storage_bytes
from gcbench.measure.tracker import MemoryTracker


def towers(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    query = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5)).double()
    passage = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5)).double()
    return query, passage


def data(batch: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (
        torch.randn(batch, 6, generator=generator, dtype=torch.float64),
        torch.randn(2 * batch, 6, generator=generator, dtype=torch.float64),
    )


@pytest.mark.parametrize("keep", [0, 1, "all"])
def test_step_returns_the_representations_of_a_full_forward(keep):
    query, passage = towers()
    queries, passages = data()
    out = GradCache([query, passage], InBatchSoftmax(), [3, 4], keep_graphs=keep).step(queries, passages)
    assert isinstance(out, CachedStep) and len(out.reps) == 2
    with torch.no_grad():
        expected = (query(queries), passage(passages))
    for rep, ref in zip(out.reps, expected):
        assert not rep.requires_grad
        assert torch.allclose(rep, ref, rtol=1e-12, atol=1e-14)
    assert torch.allclose(out.loss, InBatchSoftmax()(*expected), rtol=1e-12)


def test_step_gradients_equal_a_call():
    grads = []
    for use_step in (False, True):
        query, passage = towers()
        engine = GradCache([query, passage], InBatchSoftmax(), 3)
        (engine.step if use_step else engine)(*data())
        grads.append([p.grad.clone() for p in [*query.parameters(), *passage.parameters()]])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_hook_sees_the_tensors_the_step_returns_and_scores_need_no_forward():
    query, passage = towers()
    seen: list[tuple[torch.Tensor, ...]] = []
    scores: list[torch.Tensor] = []

    def metrics(reps: tuple[torch.Tensor, ...]) -> None:
        seen.append(reps)
        scores.append(reps[0] @ reps[1].T)  # in-batch scores, under no_grad: no graph

    forwards = []
    query.register_forward_hook(lambda *_: forwards.append(1))
    out = GradCache([query, passage], InBatchSoftmax(), 3, keep_graphs=0, on_reps=metrics).step(*data())
    assert len(seen) == 1 and len(forwards) == 2 * 3, "the hook adds no forward (3 chunks, encoded twice)"
    for hooked, returned in zip(seen[0], out.reps):
        assert hooked.data_ptr() == returned.data_ptr(), "the same storage, not a copy"
    assert not scores[0].requires_grad and scores[0].shape == (7, 14)


def measure(engine_call, tracked: MemoryTracker) -> tuple[int, int]:
    """(peak, bytes still held afterwards) of one call, over what was held before it."""
    with tracked:
        before = tracked.total
        tracked.reset_peak()
        result = engine_call()
        held = tracked.total - before
    del result
    return tracked.peak - before, held


def test_reps_back_cost_no_extra_allocation():
    queries, passages = data(12)
    outcomes = {}
    for mode in ("call", "hook", "step"):
        query, passage = towers()
        hook = (lambda reps: None) if mode == "hook" else None
        engine = GradCache([query, passage], InBatchSoftmax(), 4, keep_graphs=0, on_reps=hook)
        # A first step creates the .grad tensors, so the measured one allocates only what the step itself holds.
        engine(queries, passages)
        call = engine.step if mode == "step" else engine
        holder: list[CachedStep | torch.Tensor] = []
        tracked = MemoryTracker()
        peak, held = measure(lambda: holder.append(call(queries, passages)), tracked)
        outcomes[mode] = (peak, held, holder[0])
    call_peak, call_held, _ = outcomes["call"]
    assert outcomes["hook"][:2] == (call_peak, call_held), "a hook costs nothing"
    step_peak, step_held, step_out = outcomes["step"]
    assert isinstance(step_out, CachedStep)
    rep_bytes = storage_bytes(step_out.reps)
    assert rep_bytes == (12 + 24) * 5 * 8
    assert step_held - call_held == rep_bytes, "held afterwards: the representations' own storage, no copy"
    assert call_peak <= step_peak <= call_peak + rep_bytes


def test_on_reps_must_be_callable():
    with pytest.raises(TypeError, match="on_reps must be callable"):
        GradCache(nn.Linear(2, 2), lambda r: r.sum(), 1, on_reps=3)  # type: ignore[arg-type]

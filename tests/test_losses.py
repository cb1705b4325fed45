"""The built-in losses: tiled equals untiled, parts over rows sum to the whole, memory O(B·d + tile²).

The reference is always the untiled loss of the same module (a plain ``F.cross_entropy`` over the whole
score matrix); relative errors are normwise per tensor (max |a - b| / max |b|), as the gradient checks'.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode

from gcbench.cache import GradCache, contrastive_loss
from gcbench.losses import ContrastiveLoss, InBatchSoftmax, NTXent, SigmoidLoss, SymmetricInfoNCE, tiled_lse_sum
from gcbench.measure.tracker import MemoryTracker

MakeLoss = Callable[[float, int | None], ContrastiveLoss]
LOSSES: dict[str, MakeLoss] = {
    "dpr": lambda t, tile: InBatchSoftmax(t, tile_size=tile),
    "clip": lambda t, tile: SymmetricInfoNCE(t, tile_size=tile),
    "simclr": lambda t, tile: NTXent(t, tile_size=tile),
    "siglip": lambda t, tile: SigmoidLoss(t, -2.0, tile_size=tile),
}


def representations(name: str, batch: int, group: int, width: int, dtype: torch.dtype, seed: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    rows = [batch, batch * group if name == "dpr" else batch]
    return [torch.randn(n, width, generator=generator, dtype=dtype) for n in rows]


def loss_and_grads(loss: ContrastiveLoss, reps: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    leaves = [r.clone().requires_grad_() for r in reps]
    loss.zero_grad(set_to_none=True)
    value = loss(*leaves)
    value.backward()
    params = [p.grad if p.grad is not None else torch.zeros_like(p) for p in loss.parameters()]
    return value.detach(), [leaf.grad for leaf in leaves] + params  # type: ignore[misc]


def relative(a: Tensor, b: Tensor) -> float:
    scale = float(b.abs().max())
    return float((a - b).abs().max()) / scale if scale > 0 else float((a - b).abs().max())


def together(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.flatten() for t in tensors])


def tiled_vs_untiled(name: str, reps: list[Tensor], temperature: float, tile: int) -> tuple[float, float]:
    """(loss error, gradient error) of the tiled loss against the untiled one; the gradients of the
    representations and the loss's parameters together (a width-1 representation's true gradient is 0)."""
    dtype = reps[0].dtype
    untiled, tiled = LOSSES[name](temperature, None).to(dtype), LOSSES[name](temperature, tile).to(dtype)
    loss, grads = loss_and_grads(untiled, reps)
    tiled_loss, tiled_grads = loss_and_grads(tiled, reps)
    return relative(tiled_loss, loss), relative(together(tiled_grads), together(grads))


shapes = st.fixed_dictionaries(
    {
        "name": st.sampled_from(sorted(LOSSES)),
        "batch": st.integers(1, 24),
        "group": st.integers(1, 3),
        "width": st.integers(2, 9),  # width 1: a normalised representation has no gradient
        "tile": st.integers(1, 30),  # dividing the batch, not, larger than it
        "temperature": st.floats(0.03, 3.0),
        "seed": st.integers(0, 2**16),
    }
)


@given(shapes)
def test_tiled_equals_untiled_in_float64(case):
    reps = representations(case["name"], case["batch"], case["group"], case["width"], torch.float64, case["seed"])
    loss_error, grad_error = tiled_vs_untiled(case["name"], reps, case["temperature"], case["tile"])
    assert loss_error <= 1e-12 and grad_error <= 1e-12, (case, loss_error, grad_error)


@given(shapes)
def test_tiled_equals_untiled_in_float32(case):
    reps = representations(case["name"], case["batch"], case["group"], case["width"], torch.float32, case["seed"])
    loss_error, grad_error = tiled_vs_untiled(case["name"], reps, case["temperature"], case["tile"])
    assert loss_error <= 1e-5 and grad_error <= 1e-5, (case, loss_error, grad_error)


def _without_the_short_last_tile(size: int, tile_size: int) -> list[tuple[int, int]]:
    """A tiling bug on purpose: the last, short block of rows or columns left out."""
    return [(start, start + tile_size) for start in range(0, size - tile_size + 1, tile_size)]


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_a_tiled_loss_that_skips_a_tile_fails_the_comparison(monkeypatch, name, dtype, tolerance):
    """The controls of the two checks above: batch 9 in tiles of 4 leaves a short tile (SimCLR's 18 views
    too); a loss that forgets it is far outside either tolerance."""
    reps = representations(name, 9, 2, 5, dtype, 3)
    loss_error, grad_error = tiled_vs_untiled(name, reps, 0.3, 4)
    assert loss_error <= tolerance and grad_error <= tolerance
    monkeypatch.setattr("gcbench.losses.chunk_bounds", _without_the_short_last_tile)
    loss_error, grad_error = tiled_vs_untiled(name, reps, 0.3, 4)
    assert loss_error > 1e3 * tolerance or grad_error > 1e3 * tolerance, (loss_error, grad_error)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("tile", [None, 3])
def test_parts_over_rows_sum_to_the_whole(name, tile):
    """The rows of 3 ranks, each against every column: their parts add up to the batch's loss and gradients."""
    batch, world = 12, 3
    reps = representations(name, batch, 2, 5, torch.float64, 0)
    whole, grads = loss_and_grads(LOSSES[name](0.2, tile).double(), reps)
    loss = LOSSES[name](0.2, tile).double()
    leaves = [r.clone().requires_grad_() for r in reps]
    total = torch.zeros((), dtype=torch.float64)
    for rank in range(world):
        rows = [leaf[rank * len(leaf) // world : (rank + 1) * len(leaf) // world] for leaf in leaves]
        total = total + loss(*rows, columns=leaves, start=rank * batch // world)
    total.backward()
    parts = [leaf.grad for leaf in leaves] + [p.grad for p in loss.parameters()]
    assert relative(total.detach(), whole) <= 1e-12
    for a, b in zip(parts, grads):
        assert relative(a, b) <= 1e-12  # type: ignore[arg-type]


def test_parts_without_their_offset_are_not_the_loss():
    """The check bites: parts that all claim to start at row 0 pair rows with the wrong positives."""
    batch, world = 12, 3
    reps = representations("dpr", batch, 2, 5, torch.float64, 0)
    loss = InBatchSoftmax(0.2).double()
    whole = loss(*reps)
    wrong = sum(
        loss(*(r[rank * len(r) // world : (rank + 1) * len(r) // world] for r in reps), columns=reps, start=0)
        for rank in range(world)
    )
    assert relative(torch.as_tensor(wrong), whole) > 1e-3


def test_the_untiled_losses_are_the_textbook_ones():
    """Untiled, each loss is the formula it names (computed here from scratch, float64)."""
    q, p = representations("dpr", 6, 2, 4, torch.float64, 1)
    expected = torch.nn.functional.cross_entropy(q @ p.T / 0.5, torch.arange(6) * 2)
    assert torch.allclose(InBatchSoftmax(0.5)(q, p), expected, rtol=1e-14)
    x, y = representations("simclr", 5, 1, 4, torch.float64, 2)
    views = torch.nn.functional.normalize(torch.cat([x, y]), dim=-1)
    scores = (views @ views.T / 0.5).fill_diagonal_(-math.inf)
    expected = torch.nn.functional.cross_entropy(scores, torch.cat([torch.arange(5, 10), torch.arange(5)]))
    assert torch.allclose(NTXent(0.5).double()(x, y), expected, rtol=1e-14)
    # CLIP (Radford et al. 2021): cosine similarities times 1/temperature, cross-entropy over rows and columns.
    t, i = representations("clip", 5, 1, 4, torch.float64, 3)
    logits = torch.nn.functional.normalize(t, dim=-1) @ torch.nn.functional.normalize(i, dim=-1).T / 0.5
    labels = torch.arange(5)
    expected = (
        torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)
    ) / 2
    assert torch.allclose(SymmetricInfoNCE(0.5).double()(t, i), expected, rtol=1e-14)
    # SigLIP (Zhai et al. 2023): -1/N sum_ij log sigmoid(z_ij (t <x_i, y_j> + b)), z = 1 on the diagonal, else -1.
    logits = torch.nn.functional.normalize(t, dim=-1) @ torch.nn.functional.normalize(i, dim=-1).T / 0.5 - 2.0
    signs = 2 * torch.eye(5, dtype=torch.float64) - 1
    expected = -torch.nn.functional.logsigmoid(signs * logits).sum() / 5
    assert torch.allclose(SigmoidLoss(0.5, -2.0).double()(t, i), expected, rtol=1e-14)


def test_the_textbook_check_bites():
    """Its control: the formulas with one detail changed (SigLIP's bias of the wrong sign, CLIP one way
    only, DPR against the hard negative as the positive) are not what the losses compute."""
    t, i = representations("clip", 5, 1, 4, torch.float64, 3)
    logits = torch.nn.functional.normalize(t, dim=-1) @ torch.nn.functional.normalize(i, dim=-1).T / 0.5
    one_way = torch.nn.functional.cross_entropy(logits, torch.arange(5))
    assert not torch.allclose(SymmetricInfoNCE(0.5).double()(t, i), one_way, rtol=1e-6)
    signs = 2 * torch.eye(5, dtype=torch.float64) - 1
    wrong_bias = -torch.nn.functional.logsigmoid(signs * (logits + 2.0)).sum() / 5
    assert not torch.allclose(SigmoidLoss(0.5, -2.0).double()(t, i), wrong_bias, rtol=1e-6)
    q, p = representations("dpr", 6, 2, 4, torch.float64, 1)
    negative_first = torch.nn.functional.cross_entropy(q @ p.T / 0.5, torch.arange(6) * 2 + 1)
    assert not torch.allclose(InBatchSoftmax(0.5)(q, p), negative_first, rtol=1e-6)


@pytest.mark.parametrize("tile", [0, -1, 2.5, True])
def test_a_tile_size_is_a_positive_int_or_none(tile):
    with pytest.raises(ValueError, match="tile_size must be None"):
        NTXent(tile_size=tile)


def test_exclusions_are_for_row_sums():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="row sums only"):
        tiled_lse_sum(x, x, 1.0, 2, exclude=((0, 0, 4),), columns_too=True)


def test_autocast_leaves_the_tiled_loss_in_float32():
    """Under bf16 autocast the loss (as every strategy calls it) runs in float32, tiled as untiled; and
    through GradCache with a bf16 encoder the two agree to bf16's rounding of the encoder's gradients."""
    reps = representations("clip", 10, 1, 6, torch.float32, 0)
    plain = loss_and_grads(SymmetricInfoNCE(0.1), reps)

    def under_autocast(tile: int | None) -> tuple[Tensor, list[Tensor]]:
        loss = SymmetricInfoNCE(0.1, tile_size=tile)
        leaves = [r.clone().requires_grad_() for r in reps]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = contrastive_loss(loss, leaves, {})
        value.backward()
        return value.detach(), [leaf.grad for leaf in leaves] + [loss.logit_scale.grad]  # type: ignore[misc]

    for tile in (None, 3):
        loss, grads = under_autocast(tile)
        assert loss.dtype == torch.float32
        assert relative(loss, plain[0]) <= 1e-6 and relative(together(grads), together(plain[1])) <= 1e-5, tile
    torch.manual_seed(0)
    encoder = torch.nn.Linear(8, 6)
    inputs = [torch.randn(10, 8), torch.randn(10, 8)]
    results = []
    for tile in (None, 3):
        encoder.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = GradCache([encoder, encoder], NTXent(tile_size=tile), chunk_size=4)(*inputs)
        assert value.dtype == torch.float32
        results.append((value, encoder.weight.grad.clone()))  # type: ignore[union-attr]
    (loss, grad), (tiled_loss, tiled_grad) = results
    assert relative(tiled_loss, loss) <= 1e-6 and relative(tiled_grad, grad) <= 3e-2


def test_bf16_s_tolerance_still_catches_a_tiling_bug(monkeypatch):
    """The control of the 3e-2 above: the same bf16 run with a tile left out is
    outside it, in the encoder's gradient as in the loss."""
    torch.manual_seed(0)
    encoder = torch.nn.Linear(8, 6)
    inputs = [torch.randn(9, 8), torch.randn(9, 8)]  # 18 views in tiles of 4: a short one of 2

    def run(tile: int | None) -> tuple[Tensor, Tensor]:
        encoder.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = GradCache([encoder, encoder], NTXent(tile_size=tile), chunk_size=4)(*inputs)
        return value.detach(), encoder.weight.grad.clone()  # type: ignore[union-attr]

    loss, grad = run(None)
    monkeypatch.setattr("gcbench.losses.chunk_bounds", _without_the_short_last_tile)
    wrong_loss, wrong_grad = run(4)
    assert relative(wrong_loss, loss) > 3e-2 and relative(wrong_grad, grad) > 3e-2, (
        relative(wrong_loss, loss),
        relative(wrong_grad, grad),
    )


def peak_bytes(loss: ContrastiveLoss, reps: list[Tensor]) -> int:
    """What the loss's forward and backward hold above the representations (their gradients included)."""
    tracker = MemoryTracker()
    leaves = [r.clone().requires_grad_() for r in reps]
    tracker.register(leaves, "inputs")
    tracker.reset_peak()
    with tracker:
        loss(*leaves).backward()
    return tracker.result().total - sum(leaf.nbytes for leaf in leaves)


@pytest.mark.parametrize("name", ["clip", "simclr", "dpr", "siglip"])
def test_tiled_memory_grows_with_the_batch_not_its_square(name):
    """O(B·d + tile²): 8x the batch, the tiled loss's own memory grows at most about 8x (untiled: 64x).
    Under fake tensors, which give the real peak (the test below); every tile runs there too, so tiles of
    256 keep the count at 256."""
    width, tile = 16, 256

    def peak(batch: int, tile_size: int | None) -> int:
        with FakeTensorMode() as mode:
            reps = [mode.from_tensor(r) for r in representations(name, batch, 1, width, torch.float32, 0)]
            return peak_bytes(LOSSES[name](0.1, tile_size), reps)

    tiled = [peak(batch, tile) for batch in (512, 4096)]
    untiled = [peak(batch, None) for batch in (512, 4096)]
    assert tiled[1] <= 9 * tiled[0], tiled
    assert untiled[1] >= 40 * untiled[0], untiled
    assert tiled[1] * 10 < untiled[1], (tiled, untiled)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_under_fake_tensors_the_peak_is_the_real_one(name):
    """The estimate runs the loss under fake tensors, tile by tile as for real; the peak is the same to the byte."""
    reps = representations(name, 100, 2, 8, torch.float32, 0)  # tiles of 16: 7 per side, the last short
    real = peak_bytes(LOSSES[name](0.1, 16), reps)
    with FakeTensorMode() as mode:
        fake = peak_bytes(LOSSES[name](0.1, 16), [mode.from_tensor(r) for r in reps])
    assert fake == real


def allocator_peak_bytes(loss: ContrastiveLoss, reps: list[Tensor]) -> int:
    """The CPU allocator's peak over the loss's forward and backward, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    leaves = [r.clone().requires_grad_() for r in reps]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss(*leaves).backward()
    running = peak = 0
    events = (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return peak


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_the_tracker_sees_every_allocation_of_the_tiled_loss(name):
    """The dispatch tracker (the estimate's yardstick) and the CPU allocator agree on the tiled loss's peak
    to well within a tile: no op hides a tile-sized temporary from the estimate (``torch.logsumexp`` did)."""
    tile = 256
    reps = representations(name, 600, 2, 4, torch.float32, 0)
    loss = LOSSES[name](0.1, tile)
    loss(*[r.clone().requires_grad_() for r in reps]).backward()  # parameters' gradients exist, as in a step
    assert abs(allocator_peak_bytes(loss, reps) - peak_bytes(loss, reps)) < tile * tile * 4 / 4


def test_the_loss_memory_of_a_step_is_measured_as_the_strategy_calls_the_loss():
    """At the rows the loss sees at once (accumulate: one micro-batch), and predicted as measured."""
    from gcbench.estimate import Estimator
    from gcbench.measure.loss import loss_memory
    from gcbench.training import StepConfig, build_step
    from gcbench.workloads import ModelConfig, WorkloadConfig

    workload = WorkloadConfig(name="simclr", model=ModelConfig(kind="mlp", hidden=16, features=8), loss_tile=8)
    measured = {}
    for strategy in ("cache", "accumulate"):
        config = StepConfig(workload, strategy, 64, (16,))
        measured[strategy] = loss_memory(build_step(config, torch.device("cpu")))
        assert Estimator(workload, "float32", "cpu").predict(config).loss_peak_bytes == measured[strategy]
    assert 0 < measured["accumulate"] < measured["cache"]

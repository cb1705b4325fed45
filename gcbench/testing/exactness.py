"""Is a cached step exact? Two assertions for a user's own test suite.

:func:`assert_gradcache_exact` runs gcbench's :class:`~gcbench.GradCache` on the caller's encoders, loss
and batches; :func:`assert_step_exact` runs the caller's own step (their cached loss, their trainer's
step) instead. Both compare the gradients with the full-batch reference on copies of the modules, from
the same seed, so the caller's modules, gradients and random stream are left as they were.

The reference is the full-batch loss over representations encoded in the chunks the step's first pass
uses, every graph kept: it draws the dropout masks that pass draws (:mod:`gcbench.measure.equivalence`),
so what remains is rounding, or the step's own error.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gcbench.cache import Batch, GradCache, Objective, batch_size
from gcbench.cache.batching import module_devices
from gcbench.cache.engine import GetRep, KeepGraphs, as_chunk_sizes, as_encoder_list
from gcbench.device import PRECISIONS, autocast
from gcbench.measure.equivalence import GradComparison, compare, gradients
from gcbench.strategies import backward_in_order, chunk_order, whole_batches

# Normwise relative error allowed (max |g - ref| / max |ref|), by precision. Why each:
# - float64: the step sums the same products in another order (chunk-shaped matmuls, weight gradients
#   added chunk by chunk); that rounding is ~1e-16 a step and stays orders below 1e-10 for test-sized
#   models, while an algorithmic error (a lost negative, another dropout mask) is 1e-3 or more.
# - float32: epsilon 1.2e-7, and chunk-shaped and batch-shaped matmuls take different kernels and
#   summation orders: 1e-5 is ~100 epsilon (sentence-transformers' own tests allow 1e-4).
# - bf16 / fp16 under autocast: the reference itself rounds every matmul at the half type's epsilon
#   (7.8e-3 / 9.8e-4) and sums the chunks' weight gradients in half there, in float32 in a cached step;
#   a few epsilon of either.
TOLERANCE: dict[str, float] = {"float64": 1e-10, "float32": 1e-5, "bf16": 3e-2, "fp16": 3e-3, "pure-bf16": 3e-2}

StepFn = Callable[[list[nn.Module], Callable[..., Tensor], list[Batch]], Any]


@dataclass(frozen=True)
class WorstParameter:
    """The parameter whose gradient is furthest from the reference, and where."""

    name: str
    index: tuple[int, ...]
    got: float
    expected: float

    @property
    def error(self) -> float:
        return abs(self.got - self.expected)


@dataclass(frozen=True)
class ExactnessReport:
    """What a passing check measured (a failing one raises with the same figures)."""

    precision: str
    tolerance: float
    comparison: GradComparison
    worst: WorstParameter | None  # None: no parameter differs at all

    @property
    def passed(self) -> bool:
        return self.comparison.passes(self.tolerance)

    def message(self) -> str:
        c = self.comparison
        lines = [
            f"gradients differ from the full batch's ({self.precision}): max error {c.max_rel_err:.3e} of the "
            f"largest gradient (tolerance {self.tolerance:.0e}), cosine {c.cosine:.9f}",
            f"loss {c.loss:.10g} vs full batch {c.reference_loss:.10g} (difference {c.loss_diff:.3e})",
        ]
        if self.worst is not None:
            w = self.worst
            where = "[" + ", ".join(map(str, w.index)) + "]"
            lines.insert(
                1,
                f"largest error in {w.name}{where}: got {w.got:.10g}, expected {w.expected:.10g} "
                f"(difference {w.error:.3e})",
            )
        return "\n".join(lines)


def assert_gradcache_exact(
    encoders: nn.Module | Sequence[nn.Module],
    loss_fn: Callable[..., Tensor],
    batches: Sequence[Batch],
    *,
    chunk_size: int | Sequence[int] = 2,
    keep_graphs: KeepGraphs = 1,
    get_rep: GetRep | None = None,
    loss_kwargs: Mapping[str, Any] | None = None,
    precision: str | None = None,
    tolerance: float | None = None,
    seed: int = 0,
) -> ExactnessReport:
    """GradCache on these encoders, loss and batches gives the full batch's gradients; AssertionError if not.

    ``chunk_size``: an int or one per encoder (small, so that the batch splits). ``precision``: float64 or
    float32 (default: the parameters' dtype), bf16 or fp16 (the step and the reference both run under
    autocast). ``tolerance``: the normwise relative error allowed (default :data:`TOLERANCE`).
    """
    __tracebackhide__ = True  # pytest shows the caller's line, not this function's
    engine_options = {"keep_graphs": keep_graphs, "get_rep": get_rep}

    def gradcache_step(copies: list[nn.Module], loss: Callable[..., Tensor], step_batches: list[Batch]) -> Tensor:
        return GradCache(copies, loss, chunk_size, **engine_options)(*step_batches, **(loss_kwargs or {}))  # type: ignore[arg-type]

    GradCache(as_encoder_list(encoders), loss_fn, chunk_size, keep_graphs=keep_graphs, get_rep=get_rep)  # checks
    return assert_step_exact(
        gradcache_step,
        encoders,
        loss_fn,
        batches,
        chunk_size=chunk_size,
        get_rep=get_rep,
        loss_kwargs=loss_kwargs,
        precision=precision,
        tolerance=tolerance,
        seed=seed,
    )


def assert_step_exact(
    step: StepFn,
    encoders: nn.Module | Sequence[nn.Module],
    loss_fn: Callable[..., Tensor],
    batches: Sequence[Batch],
    *,
    chunk_size: int | Sequence[int] | None = None,
    get_rep: GetRep | None = None,
    loss_kwargs: Mapping[str, Any] | None = None,
    precision: str | None = None,
    tolerance: float | None = None,
    seed: int = 0,
) -> ExactnessReport:
    """``step(encoders, loss_fn, batches)`` accumulates the full batch's gradients; AssertionError if not.

    ``step`` gets copies of the encoders (a tied encoder stays one module) and of the loss, and the batches;
    it must leave the gradients in ``.grad`` (unscaled) and may return the loss. ``chunk_size``: the chunks
    its first pass encodes, input by input, so that the reference draws the same dropout masks; None: whole
    batches (right for a step without dropout, or one that encodes each input whole first). The other
    arguments as for :func:`assert_gradcache_exact`.
    """
    __tracebackhide__ = True
    if not callable(step):
        raise TypeError(f"step must be callable, got {type(step).__name__}")
    modules = as_encoder_list(encoders)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    batches = list(batches)
    if len(batches) != len(modules):
        raise ValueError(f"batches: got {len(batches)} batches for {len(modules)} encoders")
    sizes = [batch_size(b, f"batches[{i}]") for i, b in enumerate(batches)]
    chunks = as_chunk_sizes(chunk_size, len(modules)) if chunk_size is not None else None
    precision = precision if precision is not None else _precision_of(modules)
    if precision not in PRECISIONS:
        raise ValueError(f"precision: unknown value {precision!r}; choose from {', '.join(PRECISIONS)}")
    if tolerance is not None and not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}")
    tol = TOLERANCE[precision] if tolerance is None else tolerance
    device = next(iter(sorted(module_devices(modules[0]) or {torch.device("cpu")}, key=str)))
    order = chunk_order(sizes, chunks) if chunks is not None else whole_batches(sizes)

    results: list[tuple[list[Tensor], float | None]] = []
    names: list[str] = []
    cuda = [d.index or 0 for m in modules for d in module_devices(m) if d.type == "cuda"]
    with torch.random.fork_rng(devices=sorted(set(cuda))):
        for role in ("step", "reference"):
            copies, loss_copy = copy.deepcopy((modules, loss_fn))
            objective = Objective(copies, loss_copy, get_rep)
            parameters = objective.parameters()
            for p in parameters:
                p.grad = None
            torch.manual_seed(seed)
            with autocast(precision, device):
                if role == "step":
                    loss = step(copies, loss_copy, batches)
                else:
                    loss = backward_in_order(objective, batches, order, loss_kwargs or {})
            results.append((gradients(parameters), None if loss is None else float(loss)))
            names = parameter_names(objective)
    (grads, loss_value), (reference, reference_loss) = results
    assert reference_loss is not None
    comparison = compare(grads, reference, reference_loss if loss_value is None else loss_value, reference_loss)
    report = ExactnessReport(precision, tol, comparison, worst_parameter(names, grads, reference))
    if not report.passed or not math.isfinite(comparison.max_rel_err):
        raise AssertionError(report.message())
    return report


def parameter_names(objective: Objective) -> list[str]:
    """A name for each of ``objective.parameters()``: ``encoders[i].<name>`` or ``loss_fn.<name>``."""
    named: dict[int, str] = {}
    for i, encoder in enumerate(objective.encoders):
        for name, p in encoder.named_parameters():
            named.setdefault(id(p), f"encoders[{i}].{name}")
    if isinstance(objective.loss_fn, nn.Module):
        for name, p in objective.loss_fn.named_parameters():
            named.setdefault(id(p), f"loss_fn.{name}")
    return [named[id(p)] for p in objective.parameters()]


def worst_parameter(
    names: Sequence[str], grads: Sequence[Tensor], reference: Sequence[Tensor]
) -> WorstParameter | None:
    errors = [float((g - r).abs().max()) if g.numel() else 0.0 for g, r in zip(grads, reference)]
    if not errors or max(errors) == 0:
        return None
    k = max(range(len(errors)), key=errors.__getitem__)
    flat = int((grads[k] - reference[k]).abs().flatten().argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), grads[k].shape)) if grads[k].dim() else ()
    return WorstParameter(names[k], index, float(grads[k].flatten()[flat]), float(reference[k].flatten()[flat]))


def _precision_of(modules: Sequence[nn.Module]) -> str:
    dtypes = {p.dtype for m in modules for p in m.parameters()}
    if dtypes == {torch.float64}:
        return "float64"
    if dtypes <= {torch.float32, torch.float64}:
        return "float32"
    raise ValueError(f"precision: parameters are {sorted(map(str, dtypes))}; name it (float32, bf16, fp16)")

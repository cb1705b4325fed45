"""Gradient equivalence: a strategy's gradients against the full-batch loss's, mask for mask.

A full-batch forward draws other dropout masks than a chunked one, so comparing ``cache`` with a
plain full-batch step would mix rounding with mask differences. The reference here is the full-batch
loss over representations encoded *in the strategy's own order* with every graph kept, from the same
seed: it draws exactly the masks the strategy draws. What remains is the algorithm's own error:
rounding for ``cache`` and ``checkpoint``, the missing cross-micro-batch negatives for ``accumulate``.
With dropout off, the order changes nothing and the reference is one full-batch forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from gcbench.cache.engine import KeepGraphs
from gcbench.device import autocast, exact_float32, grad_scaler, param_dtype
from gcbench.strategies import EncodeStep, backward_in_order, make_strategy
from gcbench.workloads import WorkloadConfig, build_workload

REFERENCE = "full-batch loss, same encode order and dropout masks"
# A step whose scaled gradients overflow is skipped by a GradScaler, and comparing it says nothing;
# this moderate scale keeps fp16 gradients finite and still carries a scale through the cache.
COMPARISON_LOSS_SCALE = 2.0**8


@dataclass(frozen=True)
class GradComparison:
    """``max_rel_err`` is normwise: max |g - ref| / max |ref| over all parameters together.

    Per-parameter ratios would divide rounding noise by zero where the true gradient vanishes
    (an attention key bias has none: softmax ignores a shift shared by all keys).
    """

    max_abs_err: float
    max_rel_err: float
    cosine: float
    loss: float
    reference_loss: float

    @property
    def loss_diff(self) -> float:
        return abs(self.loss - self.reference_loss)

    def passes(self, tolerance: float) -> bool:
        return self.max_rel_err <= tolerance and self.loss_diff <= tolerance * max(1.0, abs(self.reference_loss))

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "loss_diff": self.loss_diff}


def gradients(parameters: Sequence[torch.nn.Parameter]) -> list[Tensor]:
    """Copies of the parameters' gradients, float64, zeros where a parameter got none."""
    return [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().double().clone() for p in parameters]


def compare(grads: Sequence[Tensor], reference: Sequence[Tensor], loss: float, reference_loss: float) -> GradComparison:
    if len(grads) != len(reference):
        raise ValueError(f"compare: {len(grads)} gradients against {len(reference)} reference gradients")
    flat, flat_ref = torch.cat([g.flatten() for g in grads]), torch.cat([r.flatten() for r in reference])
    max_abs = float((flat - flat_ref).abs().max())
    scale = float(flat_ref.abs().max())
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    cosine = float(torch.nn.functional.cosine_similarity(flat, flat_ref, dim=0, eps=1e-300))
    return GradComparison(max_abs, max_rel, cosine, loss, reference_loss)


def check_strategy(
    config: WorkloadConfig,
    strategy: str,
    batch_size: int,
    chunk_sizes: Sequence[int] | None = None,
    *,
    precision: str = "float32",
    device: torch.device | str = "cpu",
    seed: int = 0,
    reference_workload: WorkloadConfig | None = None,
    keep_graphs: KeepGraphs | None = None,
    chunk_tokens: Sequence[int] | None = None,
) -> GradComparison:
    """One step of ``strategy`` against the mask-consistent full-batch reference, same weights and data.

    ``reference_workload``: the reference's own config (the same weights: ``gcbench verify`` gives the
    untiled loss there, so that a tiled one is checked too); default ``config``.
    """
    device = torch.device(device)
    order: list[EncodeStep] = []
    trims: list[bool] = []  # whether the strategy pads its chunks to their own longest rows

    def run(role: str) -> tuple[list[Tensor], float]:
        built = config if role == "strategy" else reference_workload or config
        workload = build_workload(built, seed=seed, device=device, dtype=param_dtype(precision))
        batches = workload.batches(batch_size, seed=seed + 1, device=device, dtype=param_dtype(precision))
        objective = workload.objective
        for module in objective.modules():
            module.train()
        scaler = grad_scaler(precision, device, init_scale=COMPARISON_LOSS_SCALE)
        torch.manual_seed(seed + 2)
        with autocast(precision, device):
            if role == "strategy":
                chosen = make_strategy(strategy, objective, chunk_sizes, scaler, keep_graphs, chunk_tokens)
                order.extend(chosen.encode_steps(batches))
                trims.append(chosen.trims_padding)
                loss = chosen.forward_backward(batches)
            else:
                loss = backward_in_order(objective, batches, order, {}, scaler, trim_padding=any(trims))
        unscale = 1.0 / scaler.get_scale() if scaler is not None else 1.0
        return [g * unscale for g in gradients(objective.parameters())], float(loss)

    with exact_float32(precision, device):  # TF32 on a GPU would be the check's error, not the strategy's
        grads, loss = run("strategy")
        ref_grads, ref_loss = run("reference")
    return compare(grads, ref_grads, loss, ref_loss)

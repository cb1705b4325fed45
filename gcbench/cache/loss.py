"""The loss over all representations, always in float32 or wider.

Every strategy computes its loss through :func:`contrastive_loss`, so a mixed-precision run compares
like with like: half-precision representations are upcast and autocast is off inside the loss (a
softmax over thousands of logits in fp16 loses the signal, and some libraries crashed on fp16 dots).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

_HALF = (torch.float16, torch.bfloat16)


def contrastive_loss(loss_fn: Callable[..., Any], reps: Sequence[Tensor], loss_kwargs: Mapping[str, Any]) -> Tensor:
    """``loss_fn(*reps, **loss_kwargs)`` with half-precision reps upcast; checks it is a scalar tensor."""
    device_type = reps[0].device.type if reps else "cpu"
    with torch.autocast(device_type=device_type, enabled=False):
        wide = [rep.float() if rep.dtype in _HALF else rep for rep in reps]
        loss = loss_fn(*wide, **loss_kwargs)
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
    if loss.dim() != 0:
        raise ValueError(f"loss_fn must return a scalar tensor, got shape {tuple(loss.shape)}")
    return loss

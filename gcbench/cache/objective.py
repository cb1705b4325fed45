"""What is trained: one encoder per input (possibly the same one twice) and the loss over their representations."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from gcbench.cache.engine import GetRep, as_encoder_list


@dataclass
class Objective:
    """Encoders, the loss over their representations and how to pull a representation out of an output."""

    encoders: list[nn.Module]
    loss_fn: Callable[..., Tensor]
    get_rep: GetRep | None = None

    def __post_init__(self) -> None:
        self.encoders = as_encoder_list(self.encoders)

    def modules(self) -> list[nn.Module]:
        """Distinct modules holding parameters: each encoder once, then the loss if it is a module."""
        unique: dict[int, nn.Module] = {id(e): e for e in self.encoders}
        if isinstance(self.loss_fn, nn.Module):
            unique.setdefault(id(self.loss_fn), self.loss_fn)
        return list(unique.values())

    def parameters(self) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for module in self.modules():
            for p in module.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

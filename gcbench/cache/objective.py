"""What is trained: one encoder per input (possibly the same one twice) and the loss over their representations."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from gcbench.cache.batching import distinct
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
        return distinct([*self.encoders, *([self.loss_fn] if isinstance(self.loss_fn, nn.Module) else [])])

    def parameters(self) -> list[nn.Parameter]:
        return distinct(p for module in self.modules() for p in module.parameters())

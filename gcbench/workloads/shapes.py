"""Building a model under fake tensors: shapes and dtypes, no storage (the estimate, and checks of a user's factory)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.init
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode


@contextlib.contextmanager
def shapes_only() -> Iterator[FakeTensorMode]:
    """Fake tensors (shapes, no storage) for building a model, and an initialisation that needs no values.

    torch's ``trunc_normal_`` draws until every value is inside its bounds, a loop whose end depends on the
    values; under fake tensors that is an error, so it becomes a normal draw clamped to the bounds (the same
    shapes and dtypes, which is all that fake tensors keep).
    """
    with FakeTensorMode() as mode, value_free_init():
        yield mode


@contextlib.contextmanager
def value_free_init() -> Iterator[None]:
    """``trunc_normal_`` (ViT, ModernBERT and others use it) without its value-dependent loop (see shapes_only)."""
    original = torch.nn.init._no_grad_trunc_normal_

    def clamped(tensor: Tensor, mean: float, std: float, a: float, b: float, generator: Any = None) -> Tensor:
        with torch.no_grad():
            return tensor.normal_(mean, std, generator=generator).clamp_(a, b)

    torch.nn.init._no_grad_trunc_normal_ = clamped
    try:
        yield
    finally:
        torch.nn.init._no_grad_trunc_normal_ = original

"""What a batch is, how it splits into chunks and how an encoder is called on it.

A batch is a tensor, a mapping of names to tensors (``input_ids`` + ``attention_mask``, an HF
``BatchEncoding``) or a tuple/list of tensors. Every tensor in it shares the first dimension, the
batch dimension. Values that are not tensors (flags, strings) are passed to every chunk unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

Batch = Tensor | Mapping[str, Any] | Sequence[Any]


def _tensors(batch: Batch) -> Iterator[tuple[str, Tensor]]:
    if isinstance(batch, Tensor):
        yield "tensor", batch
    elif isinstance(batch, Mapping):
        for key, value in batch.items():
            if isinstance(value, Tensor):
                yield repr(key), value
    elif isinstance(batch, (tuple, list)):
        for index, value in enumerate(batch):
            if isinstance(value, Tensor):
                yield f"item {index}", value
    else:
        raise TypeError(f"a batch must be a tensor, a mapping or a tuple/list of tensors, got {type(batch).__name__}")


def batch_size(batch: Batch, name: str = "batch") -> int:
    """Size of the shared first dimension; ValueError naming ``name`` if the tensors disagree."""
    if not isinstance(batch, (Tensor, Mapping, tuple, list)):
        raise TypeError(
            f"{name}: a batch must be a tensor, a mapping or a tuple/list of tensors, got {type(batch).__name__}"
        )
    sizes: dict[str, int] = {}
    for key, tensor in _tensors(batch):
        if tensor.dim() == 0:
            raise ValueError(f"{name}: {key} is a 0-dim tensor and has no batch dimension")
        sizes[key] = tensor.shape[0]
    if not sizes:
        raise TypeError(f"{name}: holds no tensor")
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{key} has {size}" for key, size in sizes.items())
        raise ValueError(f"{name}: tensors disagree on batch size ({listed})")
    return next(iter(sizes.values()))


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Rows ``start:stop`` of every tensor (views, no copy); other values unchanged."""
    if isinstance(batch, Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return {key: value[start:stop] if isinstance(value, Tensor) else value for key, value in batch.items()}
    # A tuple or list (or a subclass) is built from an iterable; typing's Sequence declares no constructor.
    rebuild = cast("Callable[[Iterator[Any]], Batch]", type(batch))
    return rebuild(value[start:stop] if isinstance(value, Tensor) else value for value in batch)


def chunk_bounds(size: int, chunk_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(size)``; the last chunk may be shorter."""
    return [(start, min(start + chunk_size, size)) for start in range(0, size, chunk_size)]


def call_encoder(encoder: Callable[..., Any], batch: Batch) -> Any:
    """Mapping -> ``encoder(**batch)``, tuple/list -> ``encoder(*batch)``, tensor -> ``encoder(batch)``."""
    if isinstance(batch, Mapping):
        return encoder(**batch)
    if isinstance(batch, (tuple, list)):
        return encoder(*batch)
    return encoder(batch)


def batch_devices(batch: Batch) -> set[torch.device]:
    return {tensor.device for _, tensor in _tensors(batch)}


def module_devices(module: nn.Module) -> set[torch.device]:
    return {t.device for t in module.parameters()} | {t.device for t in module.buffers()}

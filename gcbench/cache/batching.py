"""What a batch is, how it splits into chunks and how an encoder is called on it.

A batch is any nested structure of tensors as ``torch.utils._pytree`` sees it: a tensor, a mapping of
names to tensors (``input_ids`` + ``attention_mask``; an HF ``BatchEncoding`` or any other mapping counts
as a dict), tuples and lists, to any depth. Every tensor in it shares the first dimension, the batch
dimension, and a chunk is that structure with every tensor sliced; values that are not tensors (flags,
strings) go to every chunk unchanged. The outermost level says how the encoder is called: a mapping as
keyword arguments, a tuple or list as positional ones, anything else as the one argument; so a model
whose ``forward`` takes one features mapping (a ``SentenceTransformer``) is fed ``(features,)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

Batch = Any  # a tensor, or a mapping, tuple or list (nested) of tensors and other values

T = TypeVar("T")


def _foreign_mapping(node: Any) -> bool:
    """A mapping pytree would take for a leaf (a ``BatchEncoding``, a ``UserDict``): read as a dict."""
    return isinstance(node, Mapping) and type(node) not in pytree.SUPPORTED_NODES


def _as_tree(batch: Batch) -> Batch:
    """``batch`` with every mapping pytree does not know as a dict, at any depth."""

    def plain(node: Any) -> Any:
        return {key: _as_tree(value) for key, value in node.items()} if _foreign_mapping(node) else node

    return pytree.tree_map(plain, batch, is_leaf=_foreign_mapping)


def tensors(batch: Batch) -> Iterator[tuple[str, Tensor]]:
    """Every tensor of ``batch`` and where it is (``['input_ids']``, ``[0]['pixel_values']``; ``tensor`` if bare)."""
    for path, leaf in pytree.tree_flatten_with_path(_as_tree(batch))[0]:
        if isinstance(leaf, Tensor):
            yield (pytree.keystr(path) or "tensor"), leaf


def batch_size(batch: Batch, name: str = "batch") -> int:
    """Size of the shared first dimension; ValueError naming ``name`` if the tensors disagree."""
    if not isinstance(batch, (Tensor, Mapping, tuple, list)) and type(batch) not in pytree.SUPPORTED_NODES:
        raise TypeError(
            f"{name}: a batch must be a tensor, a mapping or a tuple/list (nested) of tensors, "
            f"got {type(batch).__name__}"
        )
    sizes: dict[str, int] = {}
    for where, tensor in tensors(batch):
        if tensor.dim() == 0:
            raise ValueError(f"{name}: {where} is a 0-dim tensor and has no batch dimension")
        sizes[where] = tensor.shape[0]
    if not sizes:
        raise TypeError(f"{name}: holds no tensor")
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{where} has {size}" for where, size in sizes.items())
        raise ValueError(f"{name}: tensors disagree on batch size ({listed})")
    return next(iter(sizes.values()))


def map_tensors(fn: Callable[[Tensor], Any], batch: Batch) -> Batch:
    """``batch`` with ``fn`` applied to every tensor (mappings become dicts; tuples and lists keep their type)."""
    return pytree.tree_map_only(Tensor, fn, _as_tree(batch))


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Rows ``start:stop`` of every tensor (views, no copy); other values unchanged."""
    return map_tensors(lambda tensor: tensor[start:stop], batch)


def chunk_bounds(size: int, chunk_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(size)``; the last chunk may be shorter."""
    return [(start, min(start + chunk_size, size)) for start in range(0, size, chunk_size)]


def distinct(items: Iterable[T]) -> list[T]:
    """Each object once, by identity, in first-seen order: a tied encoder used for two inputs, a parameter
    shared by two modules (tensors compare by value, so a set or ``==`` would not do)."""
    unique: dict[int, T] = {}
    for item in items:
        unique.setdefault(id(item), item)
    return list(unique.values())


def call_encoder(encoder: Callable[..., Any], batch: Batch) -> Any:
    """Mapping -> ``encoder(**batch)``, tuple/list -> ``encoder(*batch)``, anything else -> ``encoder(batch)``."""
    if isinstance(batch, Mapping):
        try:
            return encoder(**batch)
        except TypeError as error:
            if hasattr(error, "add_note"):  # Python 3.11+
                error.add_note(
                    "gcbench called encoder(**batch): a mapping's keys become keyword arguments. If the encoder's "
                    "forward takes the mapping itself (a SentenceTransformer does), pass the batch as (batch,)."
                )
            raise
    if isinstance(batch, (tuple, list)):
        return encoder(*batch)
    return encoder(batch)


def batch_devices(batch: Batch) -> set[torch.device]:
    return {tensor.device for _, tensor in tensors(batch)}


def module_devices(module: nn.Module) -> set[torch.device]:
    return {t.device for t in module.parameters()} | {t.device for t in module.buffers()}

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
from torch._subclasses.fake_tensor import FakeTensor
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


# Variable lengths: padding trimmed per chunk, chunks formed by tokens ------------------------------------

Rows = slice | tuple[int, ...]  # a chunk's rows of its batch: a range, or the rows themselves (token chunks)


def _mask_holder(batch: Batch) -> Mapping[str, Any] | None:
    """The mapping of ``batch`` holding a 2-D ``attention_mask`` (the batch, or the first one inside a tuple)."""
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        return batch if isinstance(mask, Tensor) and mask.dim() == 2 else None
    if isinstance(batch, (tuple, list)):
        return next((found for item in batch if (found := _mask_holder(item)) is not None), None)
    return None


def has_mask(batch: Batch) -> bool:
    return _mask_holder(batch) is not None


def row_lengths(batch: Batch) -> list[int] | None:
    """Each row's padded extent (its last unmasked position + 1), from the attention mask; None without a mask,
    or under fake tensors unless the workload kept the lengths beside the mask (``gcbench_lengths``)."""
    holder = _mask_holder(batch)
    if holder is None:
        return None
    mask = holder["attention_mask"]
    kept = getattr(mask, "gcbench_lengths", None)
    if kept is not None:
        return [int(n) for n in kept.tolist()]
    if isinstance(mask, FakeTensor):
        return None
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return [int(n) for n in ((mask != 0).long() * positions).amax(1).tolist()]


def trim_padding(batch: Batch, width: int | None) -> Batch:
    """``batch`` with the padding beyond ``width`` columns cut off (views): every tensor of the mask's mapping
    as long as the mask in its second dimension. Right padding only, so positions do not move."""
    holder = _mask_holder(batch)
    if width is None or holder is None or holder["attention_mask"].shape[1] <= width:
        return batch
    full = holder["attention_mask"].shape[1]

    def cut(node: Any) -> Any:
        if node is holder:
            return {name: _cut(value, full, width) for name, value in node.items()}
        if isinstance(node, (tuple, list)):
            return type(node)(cut(item) for item in node)
        return node

    return cut(batch)


def _cut(value: Any, full: int, width: int) -> Any:
    sequence = isinstance(value, Tensor) and value.dim() >= 2 and value.shape[1] == full
    return value[:, :width] if sequence else value


def take_rows(batch: Batch, rows: Rows, lengths: list[int] | None) -> Batch:
    """The chunk ``rows`` of ``batch``, padded only to its own longest row (when the lengths are known)."""
    if isinstance(rows, slice):
        chunk = slice_batch(batch, rows.start, rows.stop)
        width = max(lengths[rows], default=None) if lengths is not None else None
    else:
        chunk = map_tensors(lambda tensor: tensor[torch.tensor(rows, device=tensor.device)], batch)
        width = max((lengths[r] for r in rows), default=None) if lengths is not None else None
    return trim_padding(chunk, width)


def token_chunks(lengths: list[int], budget: int, name: str = "chunk_tokens") -> list[tuple[int, ...]]:
    """Chunks of at most ``budget`` padded tokens (rows x the chunk's longest row), rows taken longest first so
    that each chunk holds rows of about one length; each chunk's rows in batch order. A ValueError naming
    ``name`` when a row alone is longer than the budget."""
    order = sorted(range(len(lengths)), key=lambda row: (-lengths[row], row))
    if order and lengths[order[0]] > budget:
        raise ValueError(f"{name}: a budget of {budget} tokens is smaller than the longest row ({lengths[order[0]]})")
    chunks: list[list[int]] = []
    longest = 0
    for row in order:
        if chunks and (len(chunks[-1]) + 1) * longest <= budget:
            chunks[-1].append(row)
        else:
            chunks.append([row])
            longest = lengths[row]
    return [tuple(sorted(chunk)) for chunk in chunks]


def token_lengths(batch: Batch, name: str) -> list[int]:
    """Tokens of each row for chunking by tokens: from the mask, or one per row for an input without one."""
    lengths = row_lengths(batch)
    if lengths is not None:
        return lengths
    if has_mask(batch):
        raise ValueError(f"{name}: the rows' lengths are unknown (an attention mask under fake tensors)")
    return [1] * batch_size(batch, name)

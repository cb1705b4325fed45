"""The built-in contrastive losses over in-batch negatives (public: ``from gcbench.losses import ...``).

Each is a module, so a learnable temperature (and SigLIP's bias) trains with the encoders. They derive
their targets from shapes alone, so they work unchanged on a micro-batch (the ``accumulate`` strategy).

**Tiled** (``tile_size=N``; ``None``, the default, computes the score matrix whole): the B x B score
matrix is never held. The forward goes over N x N tiles keeping one log-sum-exp per row (and per column
where the loss is symmetric); the backward recomputes each tile from the saved representations and those
statistics, as Inf-CL does (Cheng et al., 2024). Memory is O(B·d + N²) instead of O(B²), for one more
matrix product per tile. The result is the same loss and gradients up to rounding (tests hold it to
1e-12 relative in float64).

**Split by rows**: each loss is a sum of per-row terms of the score matrix divided by the global batch,
so rows can be shared out. ``loss(*rows, columns=every, start=s)`` is the part of the examples
``s, s+1, ...`` (``rows``) scored against every example (``columns``); over rows that partition the
batch the parts sum to ``loss(*every)``. On W ranks :class:`gcbench.distributed.LocalLoss` gives each
rank its own rows (open_clip's "local loss").
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gcbench.cache.batching import chunk_bounds

Scale = Tensor | float


class ContrastiveLoss(nn.Module, ABC):
    """A loss over the score matrix of a batch whose terms split by rows; ``tile_size`` as the module says.

    ``column_inputs``: the inputs whose representations serve as columns (the others are rows only),
    so that a caller sharing rows out over ranks gathers only those.
    """

    column_inputs: ClassVar[tuple[int, ...]]

    def __init__(self, tile_size: int | None = None) -> None:
        super().__init__()
        if tile_size is not None and (isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1):
            raise ValueError(f"tile_size must be None (untiled) or an int >= 1, got {tile_size!r}")
        self.tile_size = tile_size

    def forward(self, *rows: Tensor, columns: Sequence[Tensor | None] | None = None, start: int = 0) -> Tensor:
        """The batch's loss; with ``columns``, the part of the rows ``start, start+1, ...`` (see the module)."""
        return self.part(rows, rows if columns is None else columns, start)

    @abstractmethod
    def part(self, rows: Sequence[Tensor], columns: Sequence[Tensor | None], start: int) -> Tensor:
        """Sum of the terms of ``rows`` (examples from ``start`` on) against ``columns``, over the global count.

        ``columns`` holds every example's representations of the inputs in :attr:`column_inputs` (None
        elsewhere is allowed).
        """

    def extra_repr(self) -> str:
        return f"tile_size={self.tile_size}"


def _column(columns: Sequence[Tensor | None], index: int, name: str) -> Tensor:
    column = columns[index]
    if column is None:
        raise ValueError(f"{name}: the columns of input {index} are needed")
    return column


def _whole(rows: Sequence[Tensor], columns: Sequence[Tensor | None]) -> bool:
    """Whether the rows are the columns themselves: the whole batch in one process."""
    return all(r is c for r, c in zip(rows, columns))


def tiling_loss(loss_fn: object) -> ContrastiveLoss | None:
    """The gcbench loss that computes ``loss_fn`` in tiles: itself, or the one it wraps as ``.loss`` (the
    user workloads' default); None for any other function, which cannot tile."""
    for candidate in (loss_fn, getattr(loss_fn, "loss", None)):
        if isinstance(candidate, ContrastiveLoss):
            return candidate
    return None


class InBatchSoftmax(ContrastiveLoss):
    """DPR: each query against every passage of the batch; its positive is first of its group.

    Passages come in groups of ``passages // queries`` per query (positive, then hard negatives).
    """

    column_inputs = (1,)

    def __init__(self, temperature: float = 1.0, *, tile_size: int | None = None) -> None:
        super().__init__(tile_size)
        self.temperature = temperature

    def part(self, rows: Sequence[Tensor], columns: Sequence[Tensor | None], start: int) -> Tensor:
        queries, passages = rows
        if passages.shape[0] % queries.shape[0]:
            raise ValueError(
                f"InBatchSoftmax: {passages.shape[0]} passages do not split into groups for {queries.shape[0]} queries"
            )
        group = passages.shape[0] // queries.shape[0]
        every_passage = _column(columns, 1, "InBatchSoftmax")
        targets = (start + torch.arange(queries.shape[0], device=queries.device)) * group
        terms = softmax_terms(queries, every_passage, 1.0 / self.temperature, targets, self.tile_size)
        return terms / (every_passage.shape[0] // group)


class SymmetricInfoNCE(ContrastiveLoss):
    """CLIP: cosine similarities scaled by a learnable temperature, cross-entropy both ways."""

    column_inputs = (0, 1)

    def __init__(self, temperature: float = 0.07, *, tile_size: int | None = None) -> None:
        super().__init__(tile_size)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    def part(self, rows: Sequence[Tensor], columns: Sequence[Tensor | None], start: int) -> Tensor:
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        texts = F.normalize(rows[0], dim=-1)
        every_image = F.normalize(_column(columns, 1, "SymmetricInfoNCE"), dim=-1)
        total = every_image.shape[0]
        if rows[0].shape[0] == total:  # every row here: one score matrix, its rows and its columns
            return symmetric_terms(texts, every_image, scale, self.tile_size) / (2 * total)
        # Some rows: the rows of the texts' matrix, and of the images' (the columns of the texts')
        images = F.normalize(rows[1], dim=-1)
        every_text = F.normalize(_column(columns, 0, "SymmetricInfoNCE"), dim=-1)
        targets = start + torch.arange(texts.shape[0], device=texts.device)
        text_terms = softmax_terms(texts, every_image, scale, targets, self.tile_size)
        image_terms = softmax_terms(images, every_text, scale, targets, self.tile_size)
        return (text_terms + image_terms) / (2 * total)


class NTXent(ContrastiveLoss):
    """SimCLR: 2N views, each one's positive is the other view of its example, the rest negatives."""

    column_inputs = (0, 1)

    def __init__(self, temperature: float = 0.5, *, tile_size: int | None = None) -> None:
        super().__init__(tile_size)
        self.temperature = temperature

    def part(self, rows: Sequence[Tensor], columns: Sequence[Tensor | None], start: int) -> Tensor:
        first, second = rows
        n = first.shape[0]
        views = F.normalize(torch.cat([first, second]), dim=-1)
        if _whole(rows, columns):
            every_view = views
        else:
            every_view = F.normalize(torch.cat([_column(columns, 0, "NTXent"), _column(columns, 1, "NTXent")]), dim=-1)
        total = every_view.shape[0] // 2
        k = start + torch.arange(n, device=first.device)
        partners = torch.cat([total + k, k])
        own = ((0, start, n), (n, total + start, n))  # each view's own column, left out
        terms = softmax_terms(views, every_view, 1.0 / self.temperature, partners, self.tile_size, exclude=own)
        return terms / (2 * total)


class SigmoidLoss(ContrastiveLoss):
    """SigLIP: every text-image pair is its own binary decision (matching or not), no softmax over the batch.

    ``-sum_ij log sigmoid(z_ij * (t * <x_i, y_j> + b)) / N`` with ``z_ij`` 1 on the diagonal and -1 off it,
    a learnable temperature ``t = exp(logit_scale)`` (10 at the start) and a learnable bias (-10), as in
    Zhai et al. (2023). Tiled: the sum over all pairs as negatives, tile by tile, corrected on the diagonal
    (``-log sigmoid(l) = -log sigmoid(-l) - l``).
    """

    column_inputs = (1,)

    def __init__(self, temperature: float = 0.1, bias: float = -10.0, *, tile_size: int | None = None) -> None:
        super().__init__(tile_size)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        self.logit_bias = nn.Parameter(torch.tensor(float(bias)))

    def part(self, rows: Sequence[Tensor], columns: Sequence[Tensor | None], start: int) -> Tensor:
        every_image = _column(columns, 1, "SigmoidLoss")
        if rows[0].shape[0] != rows[1].shape[0]:
            raise ValueError(f"SigmoidLoss: {rows[0].shape[0]} texts against {rows[1].shape[0]} images; pairs needed")
        texts, images = F.normalize(rows[0], dim=-1), F.normalize(every_image, dim=-1)
        scale, bias = self.logit_scale.exp(), self.logit_bias
        targets = start + torch.arange(texts.shape[0], device=texts.device)
        if self.tile_size is None:
            logits = scale * texts @ images.T + bias
            signs = torch.where(_is_column(targets, images.shape[0]), 1.0, -1.0).to(logits.dtype)
            return -F.logsigmoid(signs * logits).sum() / images.shape[0]
        every_pair = tiled_negatives_sum(texts, images, scale, bias, self.tile_size)
        positives = scale * (texts * images[targets]).sum(-1) + bias
        return (every_pair - positives.sum()) / images.shape[0]


# The terms, whole or tiled --------------------------------------------------------------------------

Diagonal = tuple[int, int, int]  # (first row, first column, length): row r0 + k leaves out column c0 + k


def softmax_terms(
    rows: Tensor,
    columns: Tensor,
    scale: Scale,
    targets: Tensor,
    tile_size: int | None,
    exclude: Sequence[Diagonal] = (),
) -> Tensor:
    """``sum_i (logsumexp_j s_ij - s_i,targets[i])`` with ``s = scale * rows @ columns.T`` and the entries on
    the ``exclude`` diagonals left out. Whole: cross-entropy over the score matrix; tiled: :func:`tiled_lse_sum`."""
    if tile_size is None:
        scores = rows @ columns.T * scale
        if exclude:
            scores = scores.masked_fill(_diagonal_mask(scores, exclude), -math.inf)
        return F.cross_entropy(scores, targets, reduction="sum")
    lse_sum = tiled_lse_sum(rows, columns, scale, tile_size, exclude=exclude)
    return lse_sum - (rows * columns[targets]).sum() * scale


def symmetric_terms(rows: Tensor, columns: Tensor, scale: Scale, tile_size: int | None) -> Tensor:
    """Cross-entropy of each row and of each column of ``scale * rows @ columns.T``, the diagonal positive."""
    if tile_size is None:
        logits = scale * rows @ columns.T
        targets = torch.arange(rows.shape[0], device=rows.device)
        return F.cross_entropy(logits, targets, reduction="sum") + F.cross_entropy(logits.T, targets, reduction="sum")
    lse_sum = tiled_lse_sum(rows, columns, scale, tile_size, columns_too=True)
    return lse_sum - 2 * (rows * columns).sum() * scale


def _is_column(index: Tensor, width: int) -> Tensor:
    """``(len(index), width)``, True where the column is ``index[row]``."""
    return torch.arange(width, device=index.device)[None, :] == index[:, None]


def _diagonal_mask(scores: Tensor, diagonals: Sequence[Diagonal]) -> Tensor:
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    for first_row, first_column, length in diagonals:
        mask[first_row : first_row + length, first_column : first_column + length].diagonal().fill_(True)
    return mask


def _as_scale(scale: Scale, like: Tensor) -> Tensor:
    return scale if isinstance(scale, Tensor) else torch.tensor(scale, dtype=like.dtype, device=like.device)


def tiled_lse_sum(
    rows: Tensor,
    columns: Tensor,
    scale: Scale,
    tile_size: int,
    *,
    exclude: Sequence[Diagonal] = (),
    columns_too: bool = False,
) -> Tensor:
    """The sum over rows (and over columns, if ``columns_too``) of the log-sum-exp of ``scale * rows @
    columns.T``, over ``tile_size`` x ``tile_size`` tiles: the matrix is never held. Differentiable in
    ``rows``, ``columns`` and a tensor ``scale``; ``exclude``: diagonals left out (see :data:`Diagonal`)."""
    if columns_too and exclude:
        raise ValueError("tiled_lse_sum: exclusions are for row sums only")
    total: Tensor = _TiledLogSumExp.apply(rows, columns, _as_scale(scale, rows), tile_size, tuple(exclude), columns_too)
    return total


def tiled_negatives_sum(rows: Tensor, columns: Tensor, scale: Scale, bias: Scale, tile_size: int) -> Tensor:
    """``sum_ij -log sigmoid(-(scale * <rows_i, columns_j> + bias))`` (every pair as a negative), tile by tile."""
    total: Tensor = _TiledNegatives.apply(rows, columns, _as_scale(scale, rows), _as_scale(bias, rows), tile_size)
    return total


def _tiles(rows: Tensor, columns: Tensor, tile_size: int) -> list[tuple[slice, slice]]:
    """Every tile, row block by row block (the last block of each side may be shorter). Each tile runs in
    a method of its own, so its temporaries are gone before the next one's."""
    row_blocks = [slice(*bounds) for bounds in chunk_bounds(rows.shape[0], tile_size)]
    column_blocks = [slice(*bounds) for bounds in chunk_bounds(columns.shape[0], tile_size)]
    return [(i, j) for i in row_blocks for j in column_blocks]


def _full_precision(tensor: Tensor) -> contextlib.AbstractContextManager[Any]:
    """Tiles in the representations' own dtype, whatever autocast says around the loss (backward included);
    what runs over the tiles is kept in :func:`_accumulating` dtype."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def _accumulating(tensor: Tensor) -> torch.dtype:
    """float32 for half-precision representations: a running log-sum-exp (or sum) over many tiles in bf16
    keeps 8 bits of mantissa. Each tile's scores are made in the representations' dtype, then widened."""
    return torch.float32 if tensor.dtype in (torch.float16, torch.bfloat16) else tensor.dtype


def _logsumexp(scores: Tensor, dim: int) -> Tensor:
    """``scores.logsumexp(dim)``, overwriting ``scores``: no temporary of the tile's size (``torch.logsumexp``
    allocates one inside its kernel)."""
    top = scores.amax(dim, keepdim=True).nan_to_num_(neginf=0.0)  # a row left out whole stays -inf
    return scores.sub_(top).exp_().sum(dim).log_().add_(top.squeeze(dim))


def _score_tile(scaled_rows: Tensor, columns: Tensor, i: slice, j: slice, exclude: Sequence[Diagonal] = ()) -> Tensor:
    """Tile ``(i, j)`` of the scores; entries on an excluded diagonal are -inf (only tiles it crosses are touched)."""
    scores = scaled_rows[i] @ columns[j].T
    for first_row, first_column, length in exclude:
        # the tile's rows r with first_row <= r < first_row + length whose column first_column + r - first_row is in j
        low = max(first_row, i.start, first_row + j.start - first_column)
        high = min(first_row + length, i.stop, first_row + j.stop - first_column)
        if low < high:
            column = first_column + low - first_row - j.start
            tile_rows = slice(low - i.start, high - i.start)
            scores[tile_rows, column : column + high - low].diagonal().fill_(-math.inf)
    return scores


@dataclass(frozen=True)
class _LogSumExpTiles:
    """What every tile of the log-sum-exp needs: the scaled rows, the columns, the exclusions, and the
    running statistics (per row, and per column when there are any: an empty tensor otherwise)."""

    scaled_rows: Tensor
    columns: Tensor
    exclude: tuple[Diagonal, ...]
    row_lse: Tensor
    column_lse: Tensor

    def scores(self, i: slice, j: slice) -> Tensor:
        return _score_tile(self.scaled_rows, self.columns, i, j, self.exclude).to(self.row_lse.dtype)

    def forward_tile(self, i: slice, j: slice) -> None:
        scores = self.scores(i, j)
        if self.column_lse.numel():
            self.column_lse[j] = torch.logaddexp(self.column_lse[j], _logsumexp(scores.clone(), 0))
        self.row_lse[i] = torch.logaddexp(self.row_lse[i], _logsumexp(scores, 1))

    def backward_tile(self, i: slice, j: slice, sums: tuple[Tensor, Tensor]) -> None:
        scores = self.scores(i, j)
        by_column = (scores - self.column_lse[None, j]).exp_() if self.column_lse.numel() else None
        weights = scores.sub_(self.row_lse[i, None]).exp_()  # in place: the scores are not needed after this
        if by_column is not None:
            weights.add_(by_column)
        _add_tile(sums, weights, self.scaled_rows, self.columns, i, j)


class _TiledLogSumExp(torch.autograd.Function):
    """Forward: a running log-sum-exp per row (and column), tile by tile. Backward: each tile again, its
    softmax ``exp(s - lse)`` times the other side added to both sides' gradients. Rows are scaled once, up
    front (``rows * scale``: O(B·d)), so a tile costs one product and no pass to scale it."""

    @staticmethod
    def forward(
        ctx: Any,
        rows: Tensor,
        columns: Tensor,
        scale: Tensor,
        tile_size: int,
        exclude: tuple[Diagonal, ...],
        columns_too: bool,
    ) -> Tensor:
        with _full_precision(rows):
            tiles = _LogSumExpTiles(
                rows * scale,
                columns,
                exclude,
                rows.new_full((rows.shape[0],), -math.inf, dtype=_accumulating(rows)),
                rows.new_full((columns.shape[0] if columns_too else 0,), -math.inf, dtype=_accumulating(rows)),
            )
            for i, j in _tiles(rows, columns, tile_size):
                tiles.forward_tile(i, j)
            total = (tiles.row_lse.sum() + tiles.column_lse.sum()).to(rows.dtype)
        ctx.save_for_backward(rows, columns, scale, tiles.scaled_rows, tiles.row_lse, tiles.column_lse)
        ctx.tile_size, ctx.exclude = tile_size, exclude
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        rows, columns, scale, scaled_rows, row_lse, column_lse = ctx.saved_tensors
        with _full_precision(rows):
            tiles = _LogSumExpTiles(scaled_rows, columns, ctx.exclude, row_lse, column_lse)
            sums = (torch.zeros_like(rows, dtype=row_lse.dtype), torch.zeros_like(columns, dtype=row_lse.dtype))
            for i, j in _tiles(rows, columns, ctx.tile_size):
                tiles.backward_tile(i, j, sums)
        return _gradients(ctx, grad, rows, scale, *sums)


class _TiledNegatives(torch.autograd.Function):
    """Forward: ``-log sigmoid(-l)`` summed tile by tile. Backward: each tile again, ``sigmoid(l)`` times
    the other side added to both sides' gradients (``d/dl -log sigmoid(-l) = sigmoid(l)``)."""

    @staticmethod
    def forward(ctx: Any, rows: Tensor, columns: Tensor, scale: Tensor, bias: Tensor, tile_size: int) -> Tensor:
        with _full_precision(rows):
            scaled_rows = rows * scale
            total = rows.new_zeros((), dtype=_accumulating(rows))
            for i, j in _tiles(rows, columns, tile_size):
                _TiledNegatives.forward_tile(scaled_rows, columns, bias, i, j, total)
        ctx.save_for_backward(rows, columns, scale, bias, scaled_rows)
        ctx.tile_size = tile_size
        return total.to(rows.dtype)

    @staticmethod
    def forward_tile(scaled_rows: Tensor, columns: Tensor, bias: Tensor, i: slice, j: slice, total: Tensor) -> None:
        logits = _score_tile(scaled_rows, columns, i, j).to(total.dtype).add_(bias)
        total.sub_(F.logsigmoid(logits.neg_()).sum())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        rows, columns, scale, bias, scaled_rows = ctx.saved_tensors
        with _full_precision(rows):
            wide = _accumulating(rows)
            sums = (torch.zeros_like(rows, dtype=wide), torch.zeros_like(columns, dtype=wide))
            bias_grad = rows.new_zeros((), dtype=wide)
            for i, j in _tiles(rows, columns, ctx.tile_size):
                _TiledNegatives.backward_tile(scaled_rows, columns, bias, i, j, sums, bias_grad)
        rows_grad, columns_grad, scale_grad = _gradients(ctx, grad, rows, scale, *sums)[:3]
        bias_grad = (bias_grad * grad).to(bias.dtype) if ctx.needs_input_grad[3] else None
        return rows_grad, columns_grad, scale_grad, bias_grad, None

    @staticmethod
    def backward_tile(
        scaled_rows: Tensor,
        columns: Tensor,
        bias: Tensor,
        i: slice,
        j: slice,
        sums: tuple[Tensor, Tensor],
        bias_grad: Tensor,
    ) -> None:
        weights = _score_tile(scaled_rows, columns, i, j).to(bias_grad.dtype).add_(bias).sigmoid_()
        bias_grad.add_(weights.sum())
        _add_tile(sums, weights, scaled_rows, columns, i, j)


def _add_tile(
    sums: tuple[Tensor, Tensor], weights: Tensor, scaled_rows: Tensor, columns: Tensor, i: slice, j: slice
) -> None:
    """Add a tile's ``d loss / d s_ij`` (``weights``) times the other side to both sides' sums."""
    wide = weights.dtype  # the sums' (a no-op unless the representations are half precision)
    sums[0][i].addmm_(weights, columns[j].to(wide))  # d/d rows_i = scale * sum_j w_ij columns_j
    sums[1][j].addmm_(weights.T, scaled_rows[i].to(wide))  # d/d columns_j = sum_i w_ij scale * rows_i


def _gradients(
    ctx: Any, grad: Tensor, rows: Tensor, scale: Tensor, row_sums: Tensor, column_sums: Tensor
) -> tuple[Tensor | None, ...]:
    """``(d rows, d columns, d scale, None...)`` from ``row_sums`` (sum_j w_ij columns_j) and ``column_sums``
    (sum_i w_ij scale * rows_i): ``d/d scale = sum_ij w_ij <rows_i, columns_j> = <row_sums, rows>``."""
    scale_grad = ((row_sums * rows).sum() * grad).to(scale.dtype) if ctx.needs_input_grad[2] else None
    rows_grad, columns_grad = row_sums.mul_(scale * grad).to(rows.dtype), column_sums.mul_(grad).to(rows.dtype)
    return rows_grad, columns_grad, scale_grad, None, None, None

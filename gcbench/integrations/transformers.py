"""GradCache inside Hugging Face's ``Trainer`` loop (extra ``trainer``).

:class:`GradCacheTrainer` is a ``Trainer`` whose ``compute_loss`` encodes each input of the batch in
chunks and returns a loss whose backward (the Trainer's own ``accelerator.backward``) pushes the cache
into the model. So the Trainer keeps everything it does around a step: its autocast and accelerate's
GradScaler, the division by ``gradient_accumulation_steps`` and ``no_sync`` between accumulation
boundaries, clipping, scheduling, logging. Under DDP the gradients are all-reduced once per optimizer
step (see :mod:`gcbench.integrations.common`), however many chunks and micro-batches.

The model is called with each input's features as keyword arguments and returns its representation
(``get_rep`` pulls it out of an HF output); one model serves every input (a tied encoder) or routes on a
non-tensor value in the features (``{"input_ids": ..., "tower": "query"}``). The collator's batch maps
``inputs`` (the names, in the loss's order) to those features; any other key goes to ``loss_fn`` as a
keyword argument (``labels``). With ``remove_unused_columns`` (the default) the Trainer keeps the
columns named by ``inputs`` and by ``loss_fn``'s parameters.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from gcbench.cache.engine import GetRep, KeepGraphs
from gcbench.errors import UsageError
from gcbench.integrations.common import (
    GradientSync,
    cached_loss,
    check_chunk_size,
    check_inputs,
    check_keep,
    syncing,
    unwrap,
)
from gcbench.peers.extras import require

require("gcbench.integrations.transformers", "trainer", ["transformers", "accelerate"])

from transformers import Trainer  # noqa: E402  (after the check: a missing extra is one line)


class GradCacheTrainer(Trainer):
    """``Trainer(..., loss_fn=, chunk_size=, keep_graphs=, inputs=, get_rep=)``; every other argument is the Trainer's.

    ``loss_fn(*reps, **rest_of_batch)``: the loss over the whole batch's representations (a scalar).
    ``chunk_size``: rows encoded at once, an int or one per input; ``keep_graphs``: first-pass graphs kept
    (an int >= 0 or ``"all"``, see :class:`~gcbench.cache.GradCache`).
    """

    loss_is_scaled_for_ga = False  # the Trainer divides the loss by the accumulation steps

    def __init__(
        self,
        *args: Any,
        loss_fn: Callable[..., Tensor],
        chunk_size: int | Sequence[int] = 32,
        keep_graphs: KeepGraphs = 1,
        inputs: Sequence[str] = ("query", "passage"),
        get_rep: GetRep | None = None,
        **kwargs: Any,
    ) -> None:
        self.gradcache_inputs = check_inputs(inputs, loss_fn)
        if get_rep is not None and not callable(get_rep):
            raise UsageError(f"get_rep must be callable, got {type(get_rep).__name__}")
        self.gradcache_chunk_sizes = check_chunk_size(chunk_size, len(self.gradcache_inputs))
        self.gradcache_keep_graphs = check_keep(keep_graphs)
        self.gradcache_loss_fn = loss_fn
        self.gradcache_get_rep = get_rep
        super().__init__(*args, **kwargs)
        self.gradcache_sync: GradientSync | None = None

    def _set_signature_columns_if_needed(self) -> None:
        """The columns ``remove_unused_columns`` keeps: the inputs and what ``loss_fn`` takes, not the model's."""
        if self._signature_columns is None:
            try:
                taken = list(inspect.signature(self.gradcache_loss_fn).parameters)
            except (TypeError, ValueError):  # a builtin or C callable: no signature to read
                taken = []
            self._signature_columns = [  # type: ignore[assignment]
                *self.gradcache_inputs,
                *taken,
                "label",
                "label_ids",
                *self.label_names,
            ]

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Tensor | tuple[Tensor, dict[str, Any]]:
        missing = [name for name in self.gradcache_inputs if name not in inputs]
        if missing:
            raise KeyError(f"GradCacheTrainer: the batch has no {', '.join(missing)} (keys: {', '.join(inputs)})")
        batches = [inputs[name] for name in self.gradcache_inputs]
        rest = {key: value for key, value in inputs.items() if key not in self.gradcache_inputs}
        if syncing(model) and self.gradcache_sync is None:
            self.gradcache_sync = GradientSync(unwrap(model).parameters())
        loss, cache = cached_loss(
            [model] * len(batches),
            self.gradcache_loss_fn,
            batches,
            self.gradcache_chunk_sizes,
            self.gradcache_keep_graphs,
            get_rep=self.gradcache_get_rep,
            sync=self.gradcache_sync if syncing(model) else None,
            **rest,
        )
        return (loss, {"reps": cache.last_reps}) if return_outputs else loss

"""GradCache in a LightningModule, with manual optimization (extra ``lightning``).

Mix :class:`GradCacheMixin` into a ``LightningModule``, call :meth:`~GradCacheMixin.configure_gradcache` in
``__init__`` and define ``configure_optimizers`` (one optimizer); its ``training_step`` does one optimizer
step per batch. The loss goes through ``self.manual_backward``, so Lightning's precision plugin applies
(its GradScaler's scale reaches the cache, its autocast is re-entered for the second pass), and the
strategy's DDP reducer is held off (``no_sync`` on the strategy's model: manual optimization arms it in
``manual_backward``), so that no chunk's backward all-reduces; the gradients are averaged once per step,
after the last chunk, on the strategy's process group (see :mod:`gcbench.integrations.common`).
Lightning's DDP wraps the whole LightningModule, so the reference library's ``no_sync_except_last`` on the
encoders cannot work here, and flipping ``require_backward_grad_sync`` by hand is not needed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from gcbench.cache.engine import GetRep, KeepGraphs, as_encoder_list
from gcbench.errors import UsageError
from gcbench.integrations.common import GradientSync, cached_loss, check_chunk_size, check_inputs, check_keep
from gcbench.peers.extras import require

require("gcbench.integrations.lightning", "lightning", ["lightning"])


class GradCacheMixin:
    """``training_step`` = one cached optimizer step; ``self.log("train_loss", ...)`` each step.

    Mix in before ``lightning.LightningModule``: ``class MyModule(GradCacheMixin, LightningModule)``.
    """

    def configure_gradcache(
        self,
        encoders: nn.Module | Sequence[nn.Module],
        loss_fn: Callable[..., Tensor],
        chunk_size: int | Sequence[int] = 32,
        keep_graphs: KeepGraphs = 1,
        inputs: Sequence[str] = ("query", "passage"),
        get_rep: GetRep | None = None,
    ) -> None:
        """``encoders``: one module (tied) or one per input, submodules of this one; the batch maps ``inputs`` to
        each encoder's features (the rest goes to ``loss_fn``); ``chunk_size``/``keep_graphs`` as in GradCache."""
        inputs = check_inputs(inputs, loss_fn)
        try:
            modules = as_encoder_list(encoders)
        except TypeError as error:
            raise UsageError(str(error)) from None
        if len(modules) == 1:
            modules = modules * len(inputs)
        if len(modules) != len(inputs):
            raise UsageError(f"encoders: {len(modules)} for {len(inputs)} inputs ({', '.join(inputs)})")
        self.gradcache_encoders = modules
        self.gradcache_loss_fn = loss_fn
        self.gradcache_inputs = tuple(inputs)
        self.gradcache_chunk_sizes = check_chunk_size(chunk_size, len(inputs))
        self.gradcache_keep_graphs = check_keep(keep_graphs)
        self.gradcache_get_rep = get_rep
        self.gradcache_sync: GradientSync | None = None
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        module: Any = self  # a LightningModule
        if not hasattr(self, "gradcache_inputs"):
            raise RuntimeError("GradCacheMixin: call self.configure_gradcache(...) in __init__")
        optimizer = module.optimizers()
        batches = [batch[name] for name in self.gradcache_inputs]
        rest = {key: value for key, value in batch.items() if key not in self.gradcache_inputs}
        wrapped = module.trainer.strategy.model
        ddp = wrapped if isinstance(wrapped, DistributedDataParallel) else None
        if ddp is not None and self.gradcache_sync is None:
            self.gradcache_sync = GradientSync(module.parameters(), ddp.process_group)
        loss, _ = cached_loss(
            self.gradcache_encoders,
            self.gradcache_loss_fn,
            batches,
            self.gradcache_chunk_sizes,
            self.gradcache_keep_graphs,
            get_rep=self.gradcache_get_rep,
            sync=self.gradcache_sync,
            **rest,
        )
        with ddp.no_sync() if ddp is not None else contextlib.nullcontext():
            module.manual_backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        module.log("train_loss", loss, prog_bar=True)
        return loss

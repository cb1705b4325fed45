"""How long each row of a text input is: a distribution per input, capped at the input's length.

Real retrieval data is long-tailed: most passages are short and a few reach the cap, so a batch padded
to its longest row is mostly padding. A workload draws every row's real length from one of these
(``workload.query_lengths`` and ``workload.passage_lengths``, capped at ``query_length`` and
``passage_length``):

- ``fixed``: every row at the cap.
- ``uniform`` or ``uniform:LOW``: integers from LOW to the cap, equally likely (LOW defaults to half the
  cap, what gcbench drew before distributions existed).
- ``lognormal:MEDIAN:SIGMA``: ``round(exp(N(ln MEDIAN, SIGMA^2)))``, clipped to 1..cap (a capped log-normal).
- ``msmarco``: the capped log-normal :data:`MSMARCO` (see its note for where its numbers come from).

The lengths are drawn with real tensors even while the model runs under fake tensors (the estimate), from
the batch's generator, so a prediction and a measurement see the same lengths; the token ids come from a
generator seeded by that one, so drawing them (or not, under fake tensors) changes no later draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

KINDS = ("fixed", "uniform", "lognormal", "msmarco")


@dataclass(frozen=True)
class LengthDistribution:
    """One input's row lengths: ``kind`` with its parameters (``low``; ``median`` and ``sigma``)."""

    kind: str
    low: int | None = None
    median: float | None = None
    sigma: float | None = None

    def draw(self, rows: int, cap: int, generator: torch.Generator) -> Tensor:
        """``rows`` lengths in 1..cap (a real int64 tensor, under fake tensors too)."""
        with unset_fake_temporarily():
            if self.kind == "fixed":
                return torch.full((rows,), cap, dtype=torch.long)
            if self.kind == "uniform":
                low = self.low if self.low is not None else max(1, cap // 2)
                return torch.randint(low, cap + 1, (rows,), generator=generator)
            assert self.median is not None and self.sigma is not None
            normal = torch.randn(rows, generator=generator, dtype=torch.float64)
            drawn = torch.exp(math.log(self.median) + self.sigma * normal).round()
            return drawn.clamp(1, cap).to(torch.long)


# MS MARCO v1 passages (8,841,823 of them) average about 60 words ("avg ~60 words",
# https://nlpcitations-com.pages.dev/citations/ms-marco/). At about 1.3 WordPiece tokens per English word
# (an assumption, not measured here) that is a mean of about 78 tokens. The spread is an assumption too:
# sigma 0.6 (so one passage in 20 is over 2.7 times the median, one in 100 over 4 times). With a mean of
# 78 tokens and sigma 0.6, the median is 78 / exp(0.6^2 / 2) = 65 tokens.
MSMARCO = LengthDistribution("lognormal", median=65.0, sigma=0.6)


def parse_lengths(text: str, cap: int, key: str) -> LengthDistribution:
    """``text`` as a distribution, checked against ``cap``; a ValueError starting with ``key`` otherwise."""
    kind, _, rest = text.partition(":")
    parts = rest.split(":") if rest else []

    def bad(why: str) -> ValueError:
        return ValueError(f"{key}: {text!r} {why}")

    def number(part: str, what: str) -> float:
        try:
            value = float(part)
        except ValueError:
            raise bad(f"has {part!r} for {what}, not a number") from None
        if not math.isfinite(value):
            raise bad(f"has {part!r} for {what}, not a finite number")
        return value

    if kind not in KINDS:
        raise bad("is not a length distribution; choose from fixed, uniform[:LOW], lognormal:MEDIAN:SIGMA, msmarco")
    if kind in ("fixed", "msmarco"):
        if parts:
            raise bad(f"takes no parameters ({kind})")
        return MSMARCO if kind == "msmarco" else LengthDistribution("fixed")
    if kind == "uniform":
        if len(parts) > 1:
            raise bad("takes one parameter at most (uniform:LOW)")
        if not parts:
            return LengthDistribution("uniform")
        low = number(parts[0], "LOW")
        if low != int(low) or not 1 <= low <= cap:
            raise bad(f"needs LOW an integer from 1 to the cap {cap}")
        return LengthDistribution("uniform", low=int(low))
    if len(parts) != 2:
        raise bad("needs two parameters (lognormal:MEDIAN:SIGMA)")
    median, sigma = number(parts[0], "MEDIAN"), number(parts[1], "SIGMA")
    if median <= 0:
        raise bad("needs MEDIAN > 0")
    if sigma < 0:
        raise bad("needs SIGMA >= 0")
    return LengthDistribution("lognormal", median=median, sigma=sigma)


def with_lengths(batch: dict[str, Tensor], lengths: Tensor) -> dict[str, Tensor]:
    """A text tower's batch with each row's real length set: the mask ends at it (padding after, on the right).

    The lengths are kept on the mask (``gcbench_lengths``) for what must know them under fake tensors: the
    padding trimmed per chunk and the chunks formed by tokens (:mod:`gcbench.cache.batching`).
    """
    mask = batch["attention_mask"]
    if isinstance(mask, FakeTensor):  # shapes only: the values are the lengths kept beside it
        new_mask = torch.ones_like(mask)
    else:
        positions = torch.arange(mask.shape[1], device=mask.device)
        new_mask = (positions[None, :] < lengths.to(mask.device)[:, None]).to(mask.dtype)
    new_mask.gcbench_lengths = lengths  # type: ignore[attr-defined]
    return {**batch, "attention_mask": new_mask}

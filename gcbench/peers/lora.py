"""LoRA adapters on a Hugging Face model (``[model.lora]``, extra ``lora``: peft).

peft freezes the base weights and adds two low-rank matrices beside each target module; only those train,
so gradients and optimizer state shrink to the adapters' size, and GradCache, the sharded engines and
checkpointing see an ordinary module whose frozen parameters have no gradient. A target that names no
module of the model is refused before any work, naming the key (peft itself would only say so when the
model is built).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch._guards import detect_fake_mode

from gcbench.errors import UsageError
from gcbench.peers.extras import require
from gcbench.workloads.config import LoraConfig

LORA = "lora"
LORA_MODULES = ("peft",)


def check_targets(model: nn.Module, targets: Sequence[str], key: str = "model.lora.target_modules") -> None:
    """Each target must be some module's name or the last dotted parts of one (peft's rule)."""
    names = [name for name, _ in model.named_modules() if name]
    for target in targets:
        if not any(name == target or name.endswith(f".{target}") for name in names):
            leaves = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise UsageError(
                f"{key}: {target!r} matches no module of {type(model).__name__} (its linear layers: "
                f"{', '.join(leaves) or 'none'})"
            )


def apply_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """``model`` with LoRA adapters on ``config.target_modules``; the base weights frozen."""
    require("model.lora", LORA, LORA_MODULES)
    import peft

    check_targets(model, config.target_modules)
    if detect_fake_mode() is not None:  # gcbench estimate: peft cannot move its adapters onto fake parameters
        raise UsageError("model.lora: gcbench estimate does not cover LoRA models yet (sweep and verify do)")
    adapters = peft.LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,  # type: ignore[arg-type]  # annotated int, used as a number
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
    )
    return peft.get_peft_model(model, adapters)

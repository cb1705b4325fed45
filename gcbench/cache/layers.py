"""Where a model's repeated layers are: the units FSDP2 shards and activation checkpointing wraps.

A transformer keeps its blocks in one ``nn.ModuleList`` (``encoder.layer``, ``layers``, ``blocks``) of
modules of one class; the largest such list is taken for the model's layers. A model without one (a plain
``nn.Sequential``) has its parameter-holding children taken instead, looking through wrappers that hold
one child (a peft model calls its base model's forward directly, so a unit must lie inside it).
"""

from __future__ import annotations

from torch import nn


def repeated_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of the model's largest list of same-class layers, else its children that hold parameters."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            classes = {type(m) for m in module}
            if len(classes) == 1 and any(True for _ in module[0].parameters()):
                best = list(module)
    if best:
        return best
    holders = [child for child in model.children() if any(True for _ in child.parameters())]
    if len(holders) == 1 and not isinstance(holders[0], nn.ModuleList):
        return repeated_layers(holders[0])  # a wrapper around the model (peft's PeftModel, LoraModel): look inside
    return holders


def layers_of_class(model: nn.Module, names: list[str] | tuple[str, ...]) -> list[nn.Module]:
    """The modules whose class name is one of ``names``; a name that matches nothing is an error naming it."""
    found = [m for m in model.modules() if type(m).__name__ in names]
    missing = [n for n in names if not any(type(m).__name__ == n for m in found)]
    if missing:
        raise ValueError(f"no module of class {missing[0]!r} in {type(model).__name__}")
    return found

"""Random-number state of the CPU and of every accelerator a chunk touches.

GradCache encodes every chunk twice; dropout must draw the same masks both times. The reference
library restored only the generators of the devices its input tensors lived on, so a model on a GPU
fed by CPU tensors (or its functional API, which captured no device) replayed other masks and gave
silently wrong gradients. Here the caller names every device it uses: parameters, buffers and inputs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RngState:
    cpu: Tensor
    accelerators: tuple[tuple[torch.device, Tensor], ...]

    @classmethod
    def capture(cls, devices: Iterable[torch.device]) -> RngState:
        accelerators = []
        for device in sorted({d for d in devices if d.type != "cpu"}, key=str):
            module = torch.get_device_module(device.type)
            index = device.index if device.index is not None else module.current_device()
            accelerators.append((torch.device(device.type, index), module.get_rng_state(index)))
        return cls(torch.get_rng_state(), tuple(accelerators))

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in self.accelerators:
            torch.get_device_module(device.type).set_rng_state(state, device.index)

"""A CPU stand-in for the part of ``torch.cuda`` gcbench calls, as strict about its arguments as CUDA is.

No GPU has run gcbench's CUDA branches yet, so they are rehearsed here: :func:`install` replaces the
``torch.cuda`` functions gcbench uses (memory statistics, the peak reset, the memory fraction,
``empty_cache``, ``synchronize``, the generators' state, the device count and properties,
``set_device``) with versions that check their arguments as torch's own do (the same
``torch.cuda._utils._get_device_index`` with the same ``optional`` flag, the same type checks) and keep
simple allocator counters; a torch-function mode keeps every tensor "moved to CUDA" on the CPU, and
``nccl`` process groups become ``gloo`` ones. It is a rehearsal of the calls, not of the arithmetic:
autocast on ``cuda`` does nothing to CPU tensors and the generator states are kept apart from the
CPU's without driving any dropout.

The counters: bytes (in 512-byte blocks) of the storages behind the tensors that torch functions
return while a Python object holds them; a storage only C++ holds (saved for backward) is not counted.
They exist so the CUDA branches read numbers of the right kind, and so a memory fraction can be
enforced (an allocation past it raises ``torch.OutOfMemoryError`` as CUDA's allocator does); they are
no memory model.

``GCBENCH_CUDA_DOUBLE=1`` in the environment installs it when gcbench is imported, in every process
(sweep points, ranks, tune's candidates): ``experiments/gpu-check.sh --device cpu`` and the tests
use that. ``GCBENCH_CUDA_DOUBLE_MEMORY`` sets each device's total memory (default 16 GiB).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor
from torch.cuda._utils import _get_device_index
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_leaves

ENVIRONMENT = "GCBENCH_CUDA_DOUBLE"
BLOCK = 512  # the caching allocator's rounding
DEVICES = 2
RNG_STATE_BYTES = 16  # CUDA's Philox generator: seed and offset


@dataclass(frozen=True)
class DeviceProperties:
    """The fields of ``torch.cuda.get_device_properties`` that gcbench reads."""

    name: str
    total_memory: int
    major: int
    minor: int
    multi_processor_count: int


class _Allocator:
    """Per device: bytes held, their peak, what is reserved, and the enforced fraction."""

    def __init__(self, devices: int, total_memory: int) -> None:
        self.total_memory = total_memory
        self.allocated = [0] * devices
        self.peak = [0] * devices
        self.reserved = [0] * devices
        self.peak_reserved = [0] * devices
        self.fraction = [1.0] * devices
        self.current = 0
        self._holders: dict[int, list[int]] = {}  # data_ptr -> [device, bytes, python holders]
        self._lock = threading.Lock()

    def note(self, result: Any) -> None:
        for leaf in tree_leaves(result):
            if isinstance(leaf, torch.Tensor) and not isinstance(leaf, FakeTensor) and leaf.device.type == "cpu":
                self._hold(leaf)

    def _hold(self, tensor: torch.Tensor) -> None:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # fake, sparse or otherwise storage-less
            return
        key, size = storage.data_ptr(), -(-storage.nbytes() // BLOCK) * BLOCK
        if key == 0 or size == 0:
            return
        with self._lock:
            held = self._holders.get(key)
            if held is None:
                device = self.current
                cap = int(self.fraction[device] * self.total_memory)
                if self.allocated[device] + size > cap:
                    raise torch.OutOfMemoryError(
                        f"CUDA out of memory (gcbench's CUDA double). Tried to allocate {size} bytes; "
                        f"{self.allocated[device]} allocated, the process's fraction allows {cap}"
                    )
                held = self._holders[key] = [device, size, 0]
                self.allocated[device] += size
                self.peak[device] = max(self.peak[device], self.allocated[device])
                self.reserved[device] = max(self.reserved[device], self.allocated[device])
                self.peak_reserved[device] = max(self.peak_reserved[device], self.reserved[device])
            held[2] += 1
        weakref.finalize(tensor, self._let_go, key)

    def _let_go(self, key: int) -> None:
        with self._lock:
            held = self._holders.get(key)
            if held is None:
                return
            held[2] -= 1
            if held[2] == 0:
                del self._holders[key]
                self.allocated[held[0]] -= held[1]


def _on_cpu(value: Any) -> Any:
    if isinstance(value, torch.device) and value.type == "cuda":
        return torch.device("cpu")
    if isinstance(value, str) and value.split(":")[0] == "cuda":
        return "cpu"
    return value


class _KeepOnCpu(TorchFunctionMode):
    """Tensors asked for on ``cuda`` are made (or stay) on the CPU; every result is counted."""

    def __init__(self, allocator: _Allocator) -> None:
        super().__init__()
        self.allocator = allocator

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        if func is torch.device:  # the name of a device stays what it is; only tensors stay on the CPU
            return func(*args, **kwargs)
        if func is torch.Tensor.cuda:
            _get_device_index(args[1] if len(args) > 1 else kwargs.get("device"), optional=True)
            return args[0]
        if "device" in kwargs:
            kwargs["device"] = _on_cpu(kwargs["device"])
        if func is torch.Tensor.to or func is torch.Tensor.new_empty or func is torch.Tensor.new_zeros:
            args = tuple(_on_cpu(a) for a in args)
        else:
            args = tuple(_on_cpu(a) if isinstance(a, torch.device) else a for a in args)
        result = func(*args, **kwargs)
        self.allocator.note(result)
        return result


class CudaDouble:
    """The replaced functions, each checking its arguments as the real one does (torch 2.11-2.13)."""

    def __init__(self, devices: int = DEVICES, total_memory: int = 16 * 2**30) -> None:
        self.devices = devices
        self.allocator = _Allocator(devices, total_memory)
        self.rng_states = [bytes(RNG_STATE_BYTES) for _ in range(devices)]  # kept apart from any mode

    # --- devices
    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return self.devices

    def current_device(self) -> int:
        return self.allocator.current

    def _index(self, device: Any, optional: bool) -> int:
        """torch's own conversion, then the range check the driver would make."""
        index = _get_device_index(device, optional=optional)
        if not 0 <= index < self.devices:
            raise RuntimeError(f"CUDA error: invalid device ordinal {index} (the double has {self.devices})")
        return index

    def set_device(self, device: Any) -> None:
        index = _get_device_index(device)  # as torch.cuda.set_device: no optional
        if index >= 0:
            self.allocator.current = self._index(index, optional=False)

    def get_device_properties(self, device: Any = None) -> DeviceProperties:
        index = _get_device_index(device, optional=True)
        if index < 0 or index >= self.devices:
            raise AssertionError("Invalid device id")
        return DeviceProperties("gcbench CUDA double", self.allocator.total_memory, 9, 0, 132)

    def get_device_capability(self, device: Any = None) -> tuple[int, int]:
        props = self.get_device_properties(device)
        return props.major, props.minor

    def get_device_name(self, device: Any = None) -> str:
        return self.get_device_properties(device).name

    def synchronize(self, device: Any = None) -> None:
        self._index(device, optional=True)

    # --- the allocator
    def memory_allocated(self, device: Any = None) -> int:
        return self.allocator.allocated[self._index(device, optional=True)]

    def max_memory_allocated(self, device: Any = None) -> int:
        return self.allocator.peak[self._index(device, optional=True)]

    def memory_reserved(self, device: Any = None) -> int:
        return self.allocator.reserved[self._index(device, optional=True)]

    def max_memory_reserved(self, device: Any = None) -> int:
        return self.allocator.peak_reserved[self._index(device, optional=True)]

    def memory_stats(self, device: Any = None) -> dict[str, int]:
        index = self._index(device, optional=True)
        a = self.allocator
        return {
            "allocated_bytes.all.current": a.allocated[index],
            "allocated_bytes.all.peak": a.peak[index],
            "reserved_bytes.all.current": a.reserved[index],
            "reserved_bytes.all.peak": a.peak_reserved[index],
        }

    def reset_peak_memory_stats(self, device: Any = None) -> None:
        index = self._index(device, optional=True)
        self.allocator.peak[index] = self.allocator.allocated[index]
        self.allocator.peak_reserved[index] = self.allocator.reserved[index]

    def empty_cache(self) -> None:
        for index in range(self.devices):
            self.allocator.reserved[index] = self.allocator.allocated[index]

    def set_per_process_memory_fraction(self, fraction: Any, device: Any = None) -> None:
        if device is None:
            device = self.current_device()
        index = self._index(device, optional=False)  # torch calls _get_device_index(device): no optional
        if not isinstance(fraction, float):
            raise TypeError("Invalid type for fraction argument, must be `float`")
        if fraction < 0 or fraction > 1:
            raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~1")
        self.allocator.fraction[index] = fraction

    # --- generators
    def _rng_index(self, device: Any) -> int:
        if isinstance(device, str):
            device = torch.device(device)
        elif isinstance(device, int):
            device = torch.device("cuda", device)
        if not isinstance(device, torch.device) or device.type != "cuda":
            raise ValueError(f"Expected a cuda device, but got: {device}")
        return self._index(device.index if device.index is not None else self.current_device(), optional=False)

    def get_rng_state(self, device: Any = "cuda") -> torch.Tensor:
        state = self.rng_states[self._rng_index(device)]
        with _disable_current_modes(), torch._C.DisableTorchFunction():
            return torch.tensor(list(state), dtype=torch.uint8)

    def set_rng_state(self, new_state: Any, device: Any = "cuda") -> None:
        if not isinstance(new_state, torch.Tensor) or new_state.dtype != torch.uint8:
            raise TypeError(f"expected a torch.ByteTensor, but got {type(new_state).__name__}")
        index = self._rng_index(device)
        if new_state.numel() != RNG_STATE_BYTES:
            raise RuntimeError("RNG state is wrong size")
        with _disable_current_modes(), torch._C.DisableTorchFunction():
            self.rng_states[index] = bytes(new_state.tolist())

    def manual_seed(self, seed: int) -> None:
        self.rng_states[self.current_device()] = _seeded(seed)

    def manual_seed_all(self, seed: int) -> None:
        self.rng_states = [_seeded(seed) for _ in self.rng_states]

    # --- installing
    FUNCTIONS = (
        "is_available",
        "device_count",
        "current_device",
        "set_device",
        "get_device_properties",
        "get_device_capability",
        "get_device_name",
        "synchronize",
        "memory_allocated",
        "max_memory_allocated",
        "memory_reserved",
        "max_memory_reserved",
        "memory_stats",
        "reset_peak_memory_stats",
        "empty_cache",
        "set_per_process_memory_fraction",
        "get_rng_state",
        "set_rng_state",
        "manual_seed",
        "manual_seed_all",
    )


def _seeded(seed: int) -> bytes:
    return (int(seed) % 2**64).to_bytes(8, "little") + bytes(RNG_STATE_BYTES - 8)


_INSTALLED: list[tuple[CudaDouble, _KeepOnCpu, dict[str, Callable[..., Any]]]] = []  # at most one


def _gloo_for_nccl(init: Callable[..., Any]) -> Callable[..., Any]:
    def init_process_group(backend: Any = None, *args: Any, **kwargs: Any) -> Any:
        if backend == "nccl":
            backend = "gloo"
        kwargs.pop("device_id", None)
        return init(backend, *args, **kwargs)

    return init_process_group


def _barrier_checked(barrier: Callable[..., Any]) -> Callable[..., Any]:
    def checked(group: Any = None, async_op: bool = False, device_ids: Any = None) -> Any:
        if device_ids is not None and not (
            isinstance(device_ids, list) and all(isinstance(i, int) and 0 <= i < DEVICES for i in device_ids)
        ):
            raise TypeError("Invalid function argument: device_ids type should be List[int]")
        return barrier(group=group, async_op=async_op)

    return checked


def install(devices: int = DEVICES, total_memory: int | None = None) -> CudaDouble:
    """Put the double in place in this process (idempotent); :func:`uninstall` takes it out."""
    if _INSTALLED:
        return _INSTALLED[0][0]
    if total_memory is None:
        total_memory = int(os.environ.get("GCBENCH_CUDA_DOUBLE_MEMORY", str(16 * 2**30)))
    double = CudaDouble(devices, total_memory)
    saved: dict[str, Callable[..., Any]] = {}
    for name in CudaDouble.FUNCTIONS:
        saved[f"cuda.{name}"] = getattr(torch.cuda, name)
        setattr(torch.cuda, name, getattr(double, name))
    saved["dist.init_process_group"] = dist.init_process_group
    dist.init_process_group = _gloo_for_nccl(dist.init_process_group)
    saved["dist.barrier"] = dist.barrier
    dist.barrier = _barrier_checked(dist.barrier)
    mode = _KeepOnCpu(double.allocator)
    mode.__enter__()
    _INSTALLED.append((double, mode, saved))
    return double


def uninstall() -> None:
    if not _INSTALLED:
        return
    _, mode, saved = _INSTALLED.pop()
    mode.__exit__(None, None, None)
    for qualified, function in saved.items():
        owner, name = qualified.split(".")
        setattr(torch.cuda if owner == "cuda" else dist, name, function)


def installed() -> CudaDouble | None:
    return _INSTALLED[0][0] if _INSTALLED else None


def install_if_asked() -> None:
    if os.environ.get(ENVIRONMENT, "") not in ("", "0"):
        install()

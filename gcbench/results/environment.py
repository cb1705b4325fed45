"""Where a record was measured: versions, device, CPU, threads, git commit, time."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from gcbench.device import float32_settings, oversubscribed
from gcbench.peers import installed_versions
from gcbench.results.records import Environment
from gcbench.version import __version__

CHECKOUT = Path(__file__).resolve().parents[2]  # the repository root, when gcbench runs from a checkout


def git_commit() -> str | None:
    """The commit gcbench runs from, with ``-dirty`` when tracked code or config has changes; None when
    gcbench is not running from a git checkout of itself (an installed wheel).

    ``reports/`` does not count: regenerating a committed report rewrites it while the sweep runs."""
    if not (CHECKOUT / ".git").exists() or not (CHECKOUT / "pyproject.toml").is_file():
        return None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=CHECKOUT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)reports"],
            cwd=CHECKOUT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, git: str | None = None, malloc: str | None = None) -> Environment:
    """What a record measured on ``device`` says of where it was measured; ``git``: the sweep's commit;
    ``malloc``: what the process set in its allocator."""
    cpu = cpu_model()
    info: dict[str, Any] = {
        "gcbench": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "hostname": platform.node(),
        "load_average_1m": _load_average(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git,
        "malloc": malloc,
        "packages": installed_versions() or None,  # the optional extras' packages, where installed
        **float32_settings(),  # TF32 changes float32 results on a GPU: a check's tolerance depends on it
        "oversubscribed": oversubscribed(torch.get_num_threads()) if device.type == "cpu" else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=props.name,
            device_memory_bytes=props.total_memory,
            cuda=torch.version.cuda,
            driver=_nvidia_driver(),
        )
    else:
        info.update(device_name=cpu, device_memory_bytes=_host_memory())
    return Environment(**info)


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _host_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None

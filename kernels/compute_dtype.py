"""The dtype a model computes in on a device, when the user does not name one (`--dtype auto` on the command line).

bfloat16 halves memory traffic and is 2-3x faster than float32 where the hardware multiplies it natively: every CUDA GPU
we target, and x86 CPUs with AVX512-BF16 or AMX. Elsewhere torch emulates it: on an AVX2-only CPU (an AMD EPYC
Milan here, and most laptops) a 512x512 bfloat16 matmul took 201 ms against 1.5 ms in float32, so a model that
streams in real time in bfloat16 on one CPU crawls on another. Weights stay stored in bfloat16 either way; only the
compute dtype follows the machine.
"""

from __future__ import annotations

import functools
import platform
import time
from pathlib import Path

import torch

DTYPE_NAMES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64, "float16": torch.float16}


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first CPU's entries in Linux `/proc/cpuinfo` (empty where the system has no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags (x86 `flags`, Arm `Features`), or None where the system does not list them."""
    info = _cpuinfo()
    listed = info.get("flags", info.get("Features"))
    return None if listed is None else set(listed.split())


def cpu_name() -> str:
    """The CPU's model name where the system lists it, else the architecture, and whether its bf16 is native:
    benchmark results name the machine, and the dtype that is fast depends on the CPU."""
    name = _cpuinfo().get("model name") or platform.processor() or platform.machine()
    return f"{name} ({platform.machine()}, {'native' if cpu_has_fast_bf16() else 'emulated'} bf16)"


def _bf16_matmul_is_fast(size: int = 256, repeats: int = 3) -> bool:
    """Measured: is a bfloat16 matmul at most as slow as a float32 one? (emulated bf16 is tens of times slower, so
    the answer does not hang on timing noise)."""
    def seconds(dtype: torch.dtype) -> float:
        a = torch.randn(size, size).to(dtype)
        a @ a  # warm-up: the first call picks and prepares the kernel
        start = time.perf_counter()
        for _ in range(repeats):
            a @ a
        return time.perf_counter() - start

    return seconds(torch.bfloat16) <= seconds(torch.float32)


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively: from its flags on x86 Linux, measured elsewhere."""
    flags = _cpu_flags()
    if flags is not None and platform.machine().lower() in ("x86_64", "amd64"):
        if flags & {"avx512_bf16", "amx_bf16"}:
            return True
        if "avx512f" not in flags:  # AVX2 only: no oneDNN bf16 kernels at all
            return False
    return _bf16_matmul_is_fast()


def default_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """bfloat16 on GPUs and on CPUs that compute it natively, float32 on other CPUs."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return torch.bfloat16


def bf16_autocast_enabled(device: torch.device | str, choice: bool | None = None) -> bool:
    """Whether training autocasts to bfloat16 on `device`: `choice` when set, else where bfloat16 is native."""
    return default_dtype(device) == torch.bfloat16 if choice is None else bool(choice)

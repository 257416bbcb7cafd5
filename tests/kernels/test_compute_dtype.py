"""The compute dtype follows the machine: bfloat16 where it is native, float32 where the CPU emulates it."""

from __future__ import annotations

import pytest
import torch

from framecast.kernels import compute_dtype
from framecast.kernels.compute_dtype import bf16_autocast_enabled, cpu_has_fast_bf16, cpu_name, default_dtype
from framecast.models.errors import ConfigError
from framecast.stream.cli import resolve_dtype


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be a CPU with the given flags (x86 Linux) and a given measured answer."""
    def set_cpu(flags: set[str] | None, machine: str = "x86_64", measured: bool = False) -> None:
        cpu_has_fast_bf16.cache_clear()
        monkeypatch.setattr(compute_dtype, "_cpu_flags", lambda: flags)
        monkeypatch.setattr(compute_dtype.platform, "machine", lambda: machine)
        monkeypatch.setattr(compute_dtype, "_bf16_matmul_is_fast", lambda: measured)

    yield set_cpu
    cpu_has_fast_bf16.cache_clear()


@pytest.mark.parametrize(("flags", "machine", "measured", "fast"), [
    ({"avx2", "avx512f", "avx512_bf16"}, "x86_64", False, True),  # Cooper Lake, Zen 4: native, never measured
    ({"avx2", "avx512f", "amx_bf16"}, "x86_64", False, True),  # Sapphire Rapids
    ({"avx", "avx2", "fma"}, "x86_64", True, False),  # AVX2 only (Zen 3 here): no bf16 kernels, never measured
    ({"avx2", "avx512f"}, "x86_64", True, True),  # AVX512 without bf16: measured
    ({"fp", "asimd", "bf16"}, "aarch64", False, False),  # other architectures: measured
    (None, "arm64", True, True),  # no /proc/cpuinfo (macOS): measured
])
def test_fast_bf16_from_flags_on_x86_and_measured_elsewhere(cpu, flags, machine, measured, fast) -> None:
    cpu(flags, machine, measured)
    assert cpu_has_fast_bf16() is fast
    assert default_dtype("cpu") == (torch.bfloat16 if fast else torch.float32)
    assert bf16_autocast_enabled("cpu") is fast
    assert bf16_autocast_enabled("cpu", True) is True and bf16_autocast_enabled("cpu", False) is False
    assert cpu_name().endswith(f"({machine}, {'native' if fast else 'emulated'} bf16)")  # benchmarks name it


def test_gpus_compute_in_bf16_whatever_the_cpu(cpu) -> None:
    cpu({"avx2"})
    assert default_dtype("cuda") == torch.bfloat16 and default_dtype("cpu") == torch.float32


def test_the_measurement_tells_emulated_from_native_on_this_machine() -> None:
    # on this CPU the answer from its flags (where it has them) and the measured one agree
    if compute_dtype._cpu_flags() is not None and compute_dtype.platform.machine() == "x86_64":
        flags = compute_dtype._cpu_flags()
        if flags & {"avx512_bf16", "amx_bf16"} or "avx512f" not in flags:
            assert compute_dtype._bf16_matmul_is_fast() == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_dtype_flag_resolves_auto_and_refuses_cpu_float16(cpu) -> None:
    cpu({"avx2"})
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ConfigError, match="float16 on the CPU"):
        resolve_dtype("float16", "cpu")
    with pytest.raises(ConfigError, match="'half'"):
        resolve_dtype("half", "cpu")

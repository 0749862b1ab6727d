"""Which compute precision a CPU (or GPU) step uses: bf16 autocast only where the hardware does bf16 natively.

On a CPU without native bf16 (no AVX512_BF16 / AMX on x86, no BF16 on Arm) torch emulates it:
a matmul runs about 7x slower than in fp32 and a warm-start step 4-5x slower, so there fp32 is
the fast choice, not the slow one. The choice is a pure function of what the hardware reports,
so it can be tested with any capability string or flag set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

AutocastSetting = bool | Literal["auto"]

# /proc/cpuinfo flags (x86 `flags`, Arm `Features`) that mean bf16 arithmetic in hardware.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
# Values of torch.backends.cpu.get_cpu_capability() that imply native bf16.
NATIVE_BF16_CAPABILITIES = ("AVX512_BF16", "AMX")


@dataclass(frozen=True)
class Precision:
    bf16: bool
    reason: str

    @property
    def name(self) -> str:
        return "bf16-autocast" if self.bf16 else "fp32"


def cpu_has_native_bf16(capability: str | None, flags: frozenset[str] | set[str]) -> bool:
    cap = (capability or "").upper()
    return any(c in cap for c in NATIVE_BF16_CAPABILITIES) or bool(NATIVE_BF16_FLAGS & set(flags))


def choose_precision(
    setting: AutocastSetting, *, device: str, capability: str | None = None,
    flags: frozenset[str] | set[str] = frozenset(), cuda_bf16: bool = False,
) -> Precision:
    """bf16 autocast or fp32 for a step on ``device`` ("cpu" or "cuda").

    An explicit true/false is obeyed (with a warning in the reason when bf16 would be emulated);
    "auto" picks bf16 only where it is native: the CPU's capability/flags, or ``cuda_bf16``.
    """
    if device == "cuda":
        native, what = cuda_bf16, "GPU supports bf16" if cuda_bf16 else "GPU lacks bf16"
    else:
        native = cpu_has_native_bf16(capability, flags)
        found = sorted(NATIVE_BF16_FLAGS & set(flags))
        what = (f"CPU has native bf16 (capability {capability}, flags {' '.join(found) or 'none'})" if native
                else f"CPU has no native bf16 (capability {capability}, no avx512_bf16/amx_bf16 flag)")
    if setting == "auto":
        return Precision(native, f"auto: {what}")
    if setting is True:
        return Precision(True, "autocast_bf16=true" + ("" if native else f" although {what}: bf16 is emulated, slow"))
    if setting is False:
        return Precision(False, "autocast_bf16=false")
    raise ValueError(f"autocast setting must be true, false or 'auto', got {setting!r}")


def read_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first processor's flags (x86) or features (Arm); empty where /proc/cpuinfo is missing (macOS)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def detect_precision(setting: AutocastSetting, device: str = "cpu") -> Precision:
    """choose_precision with what this process's hardware reports."""
    import torch

    cuda_bf16 = device == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return choose_precision(
        setting, device=device, capability=torch.backends.cpu.get_cpu_capability(), flags=read_cpu_flags(),
        cuda_bf16=cuda_bf16,
    )

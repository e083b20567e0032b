"""x86 instruction sets that change int8 numerics, and how to reproduce one on another host.

int8 results depend on the ISA: without VNNI (AVX2 only, or AVX-512 without VNNI), u8 x s8 products are
summed pairwise in 16-bit registers and can saturate, so the same int8 model gives other outputs there
than on a VNNI CPU. A bundle is built for a deployment ISA (`options.isa` of the x86 CPU targets) and
judged on it: natively when the host has that ISA; where the host has more, with the runtime's own
kernels capped at that ISA when the runtime can be (OpenVINO's CPU plugin runs oneDNN, which reads
ONEDNN_MAX_CPU_ISA once per process: under AVX2 its int8 outputs on an AVX-512 VNNI host are bit-identical
to qemu-x86_64 -cpu Haswell's, at native speed, and AVX-512 without VNNI can be capped too), else under
`qemu-x86_64 -cpu <model>` (QEMU's user-mode emulator reproduces AVX2 int8 numerics exactly, not its
timing; it has no AVX-512, so AVX-512 cannot be emulated); otherwise on the host's ISA, said so.
"""

from __future__ import annotations

import functools
import shutil
from typing import Literal

from edgebundle.core.host import cpu_flags

ISA = Literal["host", "avx2", "avx512", "avx512-vnni"]
NAMES = ("avx2", "avx512", "avx512-vnni")  # ordered by what they include
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
# the QEMU CPU model whose instruction set is exactly the deployment ISA (user-mode TCG has no AVX-512)
EMULATED_BY = {"avx2": "Haswell"}
# oneDNN's ISA cap (ONEDNN_MAX_CPU_ISA) for each deployment ISA, and which host ISAs can be capped at which
ONEDNN_ENV = "ONEDNN_MAX_CPU_ISA"
ONEDNN_CAP = {"avx2": "AVX2", "avx512": "AVX512_CORE", "avx512-vnni": "AVX512_CORE_VNNI"}
_INCLUDES = {"avx2": {"avx2"}, "avx-vnni": {"avx2", "avx-vnni"}, "avx512": {"avx2", "avx512"},
             "avx512-vnni": {"avx2", "avx512", "avx512-vnni"}}


def isa_of(flags: frozenset[str] | set[str]) -> str:
    """The int8-relevant ISA class of a set of /proc/cpuinfo flags: avx512-vnni, avx-vnni (AVX-VNNI without
    AVX-512), avx512, avx2, or 'other' (no AVX2, or not x86)."""
    if "avx512f" in flags and "avx512_vnni" in flags:
        return "avx512-vnni"
    if "avx_vnni" in flags and "avx2" in flags:
        return "avx-vnni"
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return "other"


def host_isa() -> str:
    return isa_of(cpu_flags())


def has_vnni(isa: str) -> bool:
    """Whether int8 dot products on this ISA accumulate in 32 bits (no 16-bit saturation)."""
    return isa in ("avx512-vnni", "avx-vnni")


def deployment(isa: str) -> str:
    """The ISA a target's `isa` option stands for ('host': this machine's)."""
    return host_isa() if isa == "host" else isa


@functools.lru_cache(maxsize=1)
def qemu() -> str | None:
    """The user-mode x86-64 emulator's path, or None (apt-get install qemu-user)."""
    return shutil.which("qemu-x86_64") or shutil.which("qemu-x86_64-static")


def includes(host: str, target: str) -> bool:
    """Whether a CPU of ISA class `host` runs every instruction of `target`'s."""
    return target in _INCLUDES.get(host, set())


def exceeds(host: str, target: str) -> bool:
    """Whether ISA class `host` runs every instruction of `target`'s and more (an AVX-512 or AVX-VNNI CPU
    against avx2): the host's int8 may differ from the target's, so it is emulated or capped there."""
    return host != target and includes(host, target)


def cap_env(isa: str) -> dict[str, str]:
    """The environment that caps oneDNN's kernels (OpenVINO's CPU plugin) at deployment ISA `isa`."""
    return {ONEDNN_ENV: ONEDNN_CAP[deployment(isa)]}


def how_to_judge(isa: str, cap: str | None = None) -> tuple[str, str | None, str]:
    """(mode, qemu CPU model or oneDNN cap, why) for judging a bundle built for `isa` on this host: mode
    'native' (the host runs that ISA), 'capped' (the runtime's kernels capped at it: `cap` is 'onednn' for a
    runtime built on oneDNN), 'emulated' (qemu-x86_64 -cpu <model>) or 'host' (the deployment ISA cannot be
    reproduced here: judged on the host's ISA; `why` says so)."""
    host = host_isa()
    target = deployment(isa)
    if target == host:
        return "native", None, f"judged natively on {host}"
    if cap == "onednn" and target in ONEDNN_CAP and includes(host, target):
        return "capped", ONEDNN_CAP[target], (f"judged on {target} kernels: oneDNN capped at {ONEDNN_CAP[target]} "
                                              f"({ONEDNN_ENV}) on this {host} host")
    model = EMULATED_BY.get(target)
    if model and host != "other" and qemu():
        return "emulated", model, f"judged on {target} under qemu-x86_64 -cpu {model} (build host: {host})"
    if model and host != "other":
        return "host", None, (f"deployment ISA {target} not reproduced: qemu-x86_64 is not installed "
                              f"(apt-get install qemu-user); judged on this host's {host}")
    return "host", None, (f"deployment ISA {target} cannot be reproduced on this {host} host (QEMU emulates "
                          f"{', '.join(EMULATED_BY)} only); judged on {host}")

"""Host fingerprint: what a latency figure was measured on."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from importlib import metadata

ISA_FLAGS = (
    "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp",
    "sve", "i8mm",
)
TOOLS = ("edgebundle", "torch", "onnx", "onnxruntime", "onnxscript", "torch-pruning", "numpy",
         "openvino", "nncf", "tensorrt")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and model in ("", platform.machine(), platform.processor()):
                    model = val.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(val.split())
    except OSError:
        pass
    return model, frozenset(flags)


def cpu_flags() -> frozenset[str]:
    return _cpuinfo()[1]


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def tool_versions() -> dict[str, str]:
    out = {}
    for name in TOOLS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def fingerprint() -> dict:
    """CPU model, cores, ISA flags, OS and library versions, plus a short id of the hardware part."""
    model, flags = _cpuinfo()
    hw = {
        "cpu": model,
        "machine": platform.machine(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "isa": sorted(flags & set(ISA_FLAGS)),
    }
    hw_id = hashlib.sha256(json.dumps(hw, sort_keys=True).encode()).hexdigest()[:16]
    return {
        **hw,
        "id": hw_id,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": tool_versions(),
    }

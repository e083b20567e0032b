"""Host fingerprint: what a latency figure was measured on."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from importlib import metadata

from edgebundle.core.device_runner import cpuinfo, hardware, usable_cores

TOOLS = ("edgebundle", "torch", "onnx", "onnxruntime", "onnxscript", "torch-pruning", "numpy",
         "openvino", "nncf", "tensorrt")

_cpuinfo = functools.lru_cache(maxsize=1)(cpuinfo)


def cpu_flags() -> frozenset[str]:
    return _cpuinfo()[1]


def tool_versions() -> dict[str, str]:
    out = {}
    for name in TOOLS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def fingerprint() -> dict:
    """CPU model, cores, ISA flags, OS and library versions, plus a short id of the hardware part (the same
    record the device runner makes of a device)."""
    hw = hardware()
    return {
        **hw,
        "id": hardware_id(hw),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": tool_versions(),
    }


def hardware_id(hw: dict) -> str:
    """The short id of a fingerprint's hardware part: two figures with the same id ran on the same kind of CPU."""
    keys = ("cpu", "machine", "logical_cores", "usable_cores", "isa")
    return hashlib.sha256(json.dumps({k: hw.get(k) for k in keys}, sort_keys=True).encode()).hexdigest()[:16]


def _proc_stat() -> tuple[int, int] | None:
    """(steal, total) jiffies of all CPUs from /proc/stat, or None where it is not readable."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            parts = f.readline().split()
    except OSError:
        return None
    if not parts or parts[0] != "cpu":
        return None
    vals = [int(x) for x in parts[1:]]
    return (vals[7] if len(vals) > 7 else 0), sum(vals[:8])


def _cpu_mhz() -> float | None:
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq", encoding="ascii") as f:
            return round(int(f.read().strip()) / 1000.0, 1)
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return round(float(line.split(":")[1]), 1)
    except (OSError, ValueError):
        pass
    return None


class HostWatch:
    """The host's state while a figure is taken (pyperf's system checks, benchmark_app's warnings): load
    average against usable cores, steal time (where the kernel reports it) and CPU frequency (where readable).
    A figure taken with more runnable threads than cores (+0.5), or with over 10 % steal, is `contended`:
    it includes the neighbours' share of the CPU."""

    LOAD_MARGIN = 0.5
    MAX_STEAL_PCT = 10.0

    def __enter__(self) -> HostWatch:
        self._start = _proc_stat()
        self.state: dict = {}
        return self

    def __exit__(self, *exc) -> None:
        end = _proc_stat()
        steal = None
        if self._start is not None and end is not None and end[1] > self._start[1]:
            steal = round(100.0 * (end[0] - self._start[0]) / (end[1] - self._start[1]), 2)
        self.state = host_state(steal)


def host_state(steal_pct: float | None = None) -> dict:
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    cores = usable_cores()
    contended = bool((load is not None and load > cores + HostWatch.LOAD_MARGIN)
                     or (steal_pct is not None and steal_pct > HostWatch.MAX_STEAL_PCT))
    return {"load_1m": None if load is None else round(load, 2), "usable_cores": cores, "steal_pct": steal_pct,
            "cpu_mhz": _cpu_mhz(), "contended": contended}


def contention_text(state: dict | None) -> str:
    """'load 10.2 on 2 cores' for a contended state, '' otherwise."""
    if not state or not state.get("contended"):
        return ""
    parts = [f"load {state['load_1m']} on {state['usable_cores']} cores"] if state.get("load_1m") is not None else []
    if state.get("steal_pct") is not None and state["steal_pct"] > HostWatch.MAX_STEAL_PCT:
        parts.append(f"{state['steal_pct']:.0f} % steal")
    return ", ".join(parts)

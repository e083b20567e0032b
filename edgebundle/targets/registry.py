"""One registry of targets, filled by `@register_target` in each target module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pydantic import BaseModel


@dataclass(frozen=True)
class Capabilities:
    precisions: tuple[str, ...]
    needs_gpu: bool = False
    extra: str | None = None  # pip extra that installs the runtime, if optional
    runtime: str = ""  # the Python package the target runs on
    opens_onnx: bool = False  # `open` also runs a plain fp32 .onnx (for "vs fp32 on the same runtime")


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable[[], object]
    capabilities: Capabilities
    options_model: type[BaseModel]


_TARGETS: dict[str, Entry] = {}


def register_target(name: str, *, capabilities: Capabilities, options: type[BaseModel]):
    def deco(cls):
        if name in _TARGETS:
            raise ValueError(f"target '{name}' registered twice")
        cls.name = name
        cls.Options = options
        _TARGETS[name] = Entry(name, cls, capabilities, options)
        return cls

    return deco


def names() -> list[str]:
    return sorted(_TARGETS)


def lookup(name: str) -> Entry:
    if name not in _TARGETS:
        raise ValueError(f"unknown target '{name}'; available: {', '.join(names())}")
    return _TARGETS[name]

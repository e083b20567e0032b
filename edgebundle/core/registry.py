"""One registry of targets, filled by `@register_target` in each target module.

It sits in core so that the recipe schema can check target names and options. The built-in targets are
found the way plugins are: on the first lookup the `edgebundle.targets` package is imported by name
(each of its modules registers itself), so nothing in core imports a layer above it.
"""

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
BUILTIN_PACKAGE = "edgebundle.targets"


def _discover() -> None:
    import importlib

    importlib.import_module(BUILTIN_PACKAGE)


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
    _discover()
    return sorted(_TARGETS)


def lookup(name: str) -> Entry:
    if name not in _TARGETS:
        _discover()
    if name not in _TARGETS:
        raise ValueError(f"unknown target '{name}'; available: {', '.join(names())}")
    return _TARGETS[name]

"""One registry of targets, filled by `@register_target` in each target module; it lives with what it
registers.

The built-in targets register when the `edgebundle.targets` package is imported (`from edgebundle.targets
import registry` does that). Other packages add targets through the `edgebundle.targets` entry-point group
(each entry point names a module that registers its target on import), loaded on the first lookup of a
name that is not registered: a third-party target is a package, with no edit here.
"""

from __future__ import annotations

from edgebundle.core.plugins import load_entry_points

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
    isa_cap: str | None = None  # "onednn": the runtime's kernels can be capped at a deployment ISA (core.isa)


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable[[], object]
    capabilities: Capabilities
    options_model: type[BaseModel]


_TARGETS: dict[str, Entry] = {}
ENTRY_POINTS = "edgebundle.targets"


def _discover() -> None:
    load_entry_points(ENTRY_POINTS)


def register_target(name: str, *, capabilities: Capabilities, options: type[BaseModel]):
    def deco(cls):
        if name in _TARGETS and _TARGETS[name].factory.__qualname__ != cls.__qualname__:
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


def check_targets(recipe) -> None:
    """Every target the recipe names exists and its options pass the target's own model: one line naming
    the field otherwise (RecipeError, exit 2), before any work."""
    from pydantic import ValidationError

    from edgebundle.core.errors import RecipeError
    from edgebundle.core.recipe import format_validation_error

    for i, spec in enumerate(recipe.targets):
        try:
            entry = lookup(spec.name)
        except ValueError as e:
            raise RecipeError(f"invalid recipe: targets.{i}.name: {e}") from e
        try:
            entry.options_model.model_validate(spec.options)
        except ValidationError as e:
            raise RecipeError(format_validation_error(e, "", prefix=f"targets.{i}.options")) from e

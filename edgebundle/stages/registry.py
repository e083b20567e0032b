"""The stage registry: what each prepare stage declares about itself, read by the runner, which names no
stage.

The built-in stages register when `edgebundle.stages` is imported; other packages add stages through the
`edgebundle.stages` entry-point group (each entry point names a module that registers its stage on import).
The runner walks them in the order their declarations give (`after`, `before`), and validates the
recipe's `stages:` through them: a built-in stage's config is a field of the recipe's schema, another
stage's config is its own `Config` class, read from the recipe's `stages.<key>` mapping.
"""

from __future__ import annotations

from edgebundle.core.plugins import load_entry_points

from typing import Any

from pydantic import BaseModel, ValidationError

from edgebundle.core.errors import RecipeError
from edgebundle.core.recipe import Recipe, format_validation_error

ENTRY_POINTS = "edgebundle.stages"
_STAGES: dict[str, Any] = {}


def register_stage(cls):
    """Class decorator: one instance of the stage joins the registry under its `name`."""
    if cls.name in _STAGES and type(_STAGES[cls.name]).__qualname__ != cls.__qualname__:
        raise ValueError(f"stage '{cls.name}' registered twice")
    _STAGES[cls.name] = cls()
    return cls


def _discover() -> None:
    load_entry_points(ENTRY_POINTS)


def ordered() -> list[Any]:
    """Every registered stage, each after the stages it declares it runs after (and before those that declare
    it in `before`); among stages free to run, registration order. Names of stages not registered are ignored."""
    _discover()
    stages = list(_STAGES.values())
    deps = {s.name: {a for a in s.after if a in _STAGES} for s in stages}
    for s in stages:
        for b in s.before:
            if b in deps:
                deps[b].add(s.name)
    out: list[Any] = []
    done: set[str] = set()
    while len(out) < len(stages):
        ready = [s for s in stages if s.name not in done and deps[s.name] <= done]
        if not ready:
            left = sorted(set(deps) - done)
            raise ValueError(f"stages {', '.join(left)} declare a circle in their after/before")
        out.append(ready[0])
        done.add(ready[0].name)
    return out


def get(name: str) -> Any | None:
    _discover()
    return _STAGES.get(name)


def config_of(stage, recipe: Recipe) -> BaseModel | None:
    """The stage's validated config: the recipe schema's field for a built-in stage, else the stage's own
    `Config` read from `stages.<key>` (its defaults where the recipe does not name it)."""
    key = stage.key or stage.name
    if key in type(recipe.stages).model_fields:
        return getattr(recipe.stages, key)
    if stage.Config is None:
        return None
    return stage.Config.model_validate((recipe.stages.model_extra or {}).get(key) or {})


def check_stages(recipe: Recipe) -> None:
    """Every key of the recipe's `stages:` beyond the built-in ones names a registered stage and passes its
    `Config`: one line naming the field otherwise (RecipeError, exit 2), before any work."""
    by_key = {(s.key or s.name): s for s in ordered()}
    for key, value in (recipe.stages.model_extra or {}).items():
        stage = by_key.get(key)
        if stage is None or stage.Config is None:
            raise RecipeError(f"invalid recipe: unknown key 'stages.{key}' (stages: "
                              f"{', '.join(sorted({*type(recipe.stages).model_fields, *by_key}))})")
        try:
            stage.Config.model_validate(value or {})
        except ValidationError as e:
            raise RecipeError(format_validation_error(e, "", prefix=f"stages.{key}")) from e

"""The `Stage` protocol: one prepare step (load, prune, distill, cluster, export, ...) behind a small interface.

The runner (edgebundle.pipeline.runner) walks the registered stages in order, asks each whether the recipe
enables it, and runs it through the content-addressed cache: the key is the stage's name, its `config`,
the files of the artifacts it consumes (`inputs`) and its `extra` fingerprint. A stage writes its files
into the folder it is given and returns metrics; it never mutates an input artifact. The runner, not the
stage, records lineage, wraps a failure with the stages that ran before it, and under torchrun runs a
`collective` stage on every rank (the others on rank 0 only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol

import torch
from pydantic import BaseModel
from torch import nn

from edgebundle.core.artifact import Artifact
from edgebundle.core.data import Dataset
from edgebundle.core.modelio import load_structured
from edgebundle.core.recipe import Recipe


@dataclass
class StageContext:
    """What a stage may read: the recipe, the data, and the artifacts made so far."""

    recipe: Recipe
    dataset: Dataset
    example: tuple[torch.Tensor, ...]  # zeros of the input spec (MACs, tracing)
    device: torch.device
    source: str  # fingerprint of the model's source (factory file, kwargs, weights)
    artifacts: dict[str, Artifact] = field(default_factory=dict)  # by stage name
    student: Artifact | None = None  # the newest model artifact (teacher, then each model stage's output)
    # set by the pipeline: (context, the original model) -> a Pricer of candidates on the first target
    pricer: Callable[[StageContext, nn.Module], Pricer] | None = None
    work: Path | None = None  # the work folder (a stage's scratch files that outlive an interrupted run)

    @property
    def pretrained(self) -> bool:
        """Whether the teacher came with its weights (this recipe did not train it)."""
        return not self.artifacts["teacher"].metrics.get("trained")

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.recipe.inputs]

    def load(self, art: Artifact) -> nn.Module:
        return load_structured(self.recipe.model, self.recipe.base_dir, art.folder, self.recipe.limits.user_code_s)


class Pricer(Protocol):
    """Prices a candidate model on the recipe's first target (the pipeline's, since stages do not import
    targets): quantized as that target builds it, judged on the validation split against the original model,
    timed interleaved against the unpruned model built the same way."""

    target: str

    def price(self, model: nn.Module, check_fp32: bool = True) -> dict[str, Any]:
        """{'within', 'value', 'line', 'summary', 'speedup', 'speedup_ci95', 'p50_ms', 'base_p50_ms', 'precision'};
        `check_fp32`: a model whose fp32 outputs miss the budget is over budget without an int8 build
        ({'within', 'value', 'line', 'summary', 'fp32_over'}); off for the unpruned model (the reference)."""

    def close(self) -> None: ...


def dump(cfg) -> dict[str, Any]:
    """A pydantic config as it enters a cache key."""
    return cfg.model_dump(mode="json")


def without_defaults(cfg, *fields: str) -> dict[str, Any]:
    """A config as it enters a cache key, without the named fields while they hold their defaults (None for
    optional ones; fields added later: work folders prepared before them stay valid)."""
    d = dump(cfg)
    for f in fields:
        if f in d and getattr(cfg, f) == type(cfg).model_fields[f].get_default(call_default_factory=True):
            d.pop(f)
    return d


def model_key(spec) -> dict[str, Any]:
    """The model spec as it enters a cache key: the model.hf fields at their defaults are left out, so work
    folders prepared before those fields existed stay valid."""
    d = dump(spec)
    if hasattr(spec, "hf_fields"):
        for f in {"task", "pooling", "normalize"} - set(spec.hf_fields()):
            d.pop(f, None)
    else:  # an ensemble: each member likewise
        d["members"] = [model_key(m) for m in spec.members]
    return d


class Stage(Protocol):
    name: ClassVar[str]
    label: ClassVar[str]  # its progress line ("prune (Torch-Pruning)")
    key: ClassVar[str | None]  # its config's key under the recipe's `stages:` (None: the name)
    Config: ClassVar[type[BaseModel] | None]  # its config class (built-ins: a field of the recipe schema)
    after: ClassVar[tuple[str, ...]]  # stages that run before it when registered (its predecessors)
    before: ClassVar[tuple[str, ...]]  # stages it must run before
    collective: ClassVar[bool]  # runs on every torchrun rank (it trains with DDP); else rank 0 only
    makes_model: ClassVar[bool]  # its artifact is a model: the new student, and a lineage entry
    role: ClassVar[str | None]  # what build needs from prepare: "original" (the teacher), "onnx", "data"
    in_lineage: ClassVar[bool]  # its artifact enters every bundle's lineage
    compresses: ClassVar[str | None]  # it changes the model the user brought ("pruning"): judged end to end

    def one_output(self, recipe: Recipe) -> bool:
        """Whether, as the recipe configures it, it trains or ranks on one output (logits)."""

    def enabled(self, recipe: Recipe) -> bool: ...

    def config(self, ctx: StageContext) -> dict[str, Any]:
        """What of the recipe determines the result (enters the cache key)."""

    def inputs(self, ctx: StageContext) -> list[Artifact]:
        """The artifacts it consumes, in the order they enter the key."""

    def extra(self, ctx: StageContext) -> str:
        """Fingerprints of other inputs (data, model source) that enter the key; "" for none."""

    def run(self, ctx: StageContext, folder: Path) -> dict[str, Any]:
        """Write the artifact's files into `folder`; return its metrics."""


class StageBase:
    """The declarations' defaults, for a stage to inherit and override what differs."""

    label: ClassVar[str] = ""
    key: ClassVar[str | None] = None
    Config: ClassVar[type[BaseModel] | None] = None
    after: ClassVar[tuple[str, ...]] = ()
    before: ClassVar[tuple[str, ...]] = ()
    collective: ClassVar[bool] = False
    makes_model: ClassVar[bool] = False
    role: ClassVar[str | None] = None
    in_lineage: ClassVar[bool] = True
    compresses: ClassVar[str | None] = None

    def one_output(self, recipe: Recipe) -> bool:
        return False

    def inputs(self, ctx: StageContext) -> list[Artifact]:
        return [ctx.student] if ctx.student is not None else []

    def extra(self, ctx: StageContext) -> str:
        return ctx.dataset.fingerprint

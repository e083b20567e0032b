"""The small protocol every target implements: check availability, build, open a session.

The runner, not the target, owns evaluation, timing and bundling: a target only turns the verified
fp32 ONNX model (plus calibration data) into its runtime's artifact and knows how to run it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol

import numpy as np
from pydantic import BaseModel

from edgebundle.core.metrics import Contract
from edgebundle.core.data import Split
from edgebundle.core.recipe import Recipe, TargetSpec


@dataclass(frozen=True)
class BuildContext:
    recipe: Recipe
    spec: TargetSpec
    options: BaseModel  # the target's own validated options
    fp32_onnx: Path
    calibration: Split
    validation: Split  # held-out split for accuracy control (the recipe's val split; test stays unseen)
    workdir: Path  # empty folder the target writes its files into
    threads: int
    load_model: Callable[[], Any] | None = None  # the PyTorch student, for targets that start from PyTorch
    contract: Contract | None = None  # the recipe's metric and this target's budget (accuracy control uses it)
    train: Split | None = None  # the training split (quantization-aware training fine-tunes on it)

    def val_contract(self) -> Contract:
        """The contract accuracy control judges the validation split by (a plain default when none was given)."""
        if self.contract is not None:
            return self.contract
        from edgebundle.core.metrics import MetricSpec

        metric = "top1" if self.validation.labels is not None else "cosine"
        return Contract(metric, MetricSpec(name=metric), self.spec.max_accuracy_drop)

    def val_head(self, n: int) -> BuildContext:
        """The same context with only the first `n` validation inputs: candidates are compared on it cheaply."""
        return replace(self, validation=self.validation.head(n))

    def judge(self, reference: np.ndarray, out: np.ndarray):
        """The contract's verdict on `out` against `reference`, both over this context's validation inputs."""
        return self.val_contract().judge(reference, out, self.validation.labels)


@dataclass(frozen=True)
class Built:
    model_file: str  # relative to the workdir; what `open` loads
    files: tuple[str, ...]  # every file that goes into the bundle
    precision: str
    quantization: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)  # session settings to reproduce the timing
    notes: tuple[str, ...] = ()
    status: str = "complete"  # "pending": the runtime's own artifact could not be built on this machine
    eval_file: str | None = None  # pending: an ONNX file ONNX Runtime CPU evaluates accuracy with
    fp32_file: str | None = None  # the same runtime's fp32 artifact, for "vs fp32 on the same runtime"
    isa_neutral: str | None = None  # int8 whose integer arithmetic is the same on every x86 ISA: why (no emulation)


def int8_if_auto(opt):
    """precision 'auto' builds int8; the runner measures it against fp32 and may ship fp32 instead."""
    return opt.model_copy(update={"precision": "int8"}) if opt.precision == "auto" else opt


@dataclass
class Work:
    """What one build carries between its steps: the options (precision resolved), the session settings that
    go into `Built.runtime`, and the target's own intermediate state (a converted model, temporary files)."""

    opt: Any
    runtime: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)


class TargetBase:
    """The template `build` every runtime shares: resolve precision auto to int8 (the runner races it against
    fp32), `start` (convert or load), then `fp32` or `int8`, and `finish` always (temporary files go). A target
    fills these named steps; `build` itself is not overridden."""

    temporary: ClassVar[tuple[str, ...]] = ()  # workdir files `finish` removes, built or not

    def build(self, ctx: BuildContext) -> Built:
        work = self.start(ctx, int8_if_auto(ctx.options))
        try:
            return self.fp32(ctx, work) if work.opt.precision == "fp32" else self.int8(ctx, work)
        finally:
            self.finish(ctx, work)

    def start(self, ctx: BuildContext, opt) -> Work:
        return Work(opt, {"threads": ctx.threads})

    def fp32(self, ctx: BuildContext, work: Work) -> Built:
        raise NotImplementedError

    def int8(self, ctx: BuildContext, work: Work) -> Built:
        raise NotImplementedError

    def finish(self, ctx: BuildContext, work: Work) -> None:
        for name in self.temporary:
            (ctx.workdir / name).unlink(missing_ok=True)


class Session(Protocol):
    """An opened artifact (`with target.open(...) as s:`); optional features are declared in `features`
    (see edgebundle.core.session), never probed."""

    input_names: list[str]
    features: frozenset[str]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Session: ...

    def __exit__(self, *exc) -> None: ...


class Target(Protocol):
    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]]

    def unavailable_reason(self, options: BaseModel) -> str | None:
        """None when the runtime and device are present, else why not (shown to the user)."""

    def pending_reason(self, options: BaseModel | None) -> str | None:
        """None when this machine can build and time the runtime's own artifact; else why not: the target
        then prepares what it can (e.g. a Q/DQ model for a GPU engine) and returns Built(status="pending")."""

    def build(self, ctx: BuildContext) -> Built: ...

    def open(self, model_path: Path, *, threads: int, runtime: dict[str, Any]) -> Session: ...

"""What the pipeline hands back: a prepared work folder, one result per target, a run's results."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from edgebundle.core.artifact import Artifact
from edgebundle.core.data import Dataset
from edgebundle.core.modelio import load_structured
from edgebundle.core.recipe import Recipe


@dataclass
class Prepared:
    recipe: Recipe
    dataset: Dataset
    teacher: Artifact
    student: Artifact
    onnx: Artifact
    lineage: list[Artifact] = field(default_factory=list)

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.recipe.inputs]

    def made_by(self, stage: str) -> Artifact | None:
        """The lineage's artifact of `stage`, or None where that stage did not run."""
        return next((a for a in self.lineage if a.stage == stage), None)

    def load_teacher(self) -> nn.Module:
        return load_structured(self.recipe.model, self.recipe.base_dir, self.teacher.folder,
                               self.recipe.limits.user_code_s)

    def load_student(self) -> nn.Module:
        return load_structured(self.recipe.model, self.recipe.base_dir, self.student.folder,
                               self.recipe.limits.user_code_s)


@dataclass(frozen=True)
class BundleResult:
    target: str
    path: Path | None  # None: nothing written (failed, or rejected without keep_rejected)
    manifest: dict[str, Any] | None
    archive: Path | None = None  # OUT/<target>.tar.gz with --pack
    status: str = "complete"  # complete | pending | rejected | failed
    reason: str | None = None  # rejected or failed: one line that names the target
    error: BaseException | None = field(default=None, compare=False, repr=False)  # failed: the cause (--debug)

    @property
    def ok(self) -> bool:
        return self.status in ("complete", "pending")


@dataclass(frozen=True)
class RunResult:
    prepared: Prepared
    bundles: list[BundleResult]

    @property
    def ok(self) -> bool:
        """Every target produced a bundle within its budget."""
        return all(b.ok for b in self.bundles)


def recipe_digest(recipe: Recipe) -> str:
    return hashlib.sha256(recipe.model_dump_json(exclude={"base_dir", "output"}).encode()).hexdigest()



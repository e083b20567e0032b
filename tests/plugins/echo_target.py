"""A whole target in one file, outside the package: the fp32 ONNX model itself, run by ONNX Runtime CPU.
It registers on import; a package declares it through the `edgebundle.targets` entry-point group."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from edgebundle.core.session import OrtSession
from edgebundle.targets.base import BuildContext, Built, TargetBase, Work
from edgebundle.targets.registry import Capabilities, register_target


class EchoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    precision: Literal["fp32"] = "fp32"
    note: str = "echo"


@register_target("echo", capabilities=Capabilities(precisions=("fp32",), runtime="onnxruntime", opens_onnx=True),
                 options=EchoOptions)
class EchoTarget(TargetBase):  # the template build: fills its fp32 step (it has no int8)
    def unavailable_reason(self, options: EchoOptions | None = None) -> str | None:
        return None

    def pending_reason(self, options: EchoOptions | None = None) -> str | None:
        return None

    def fp32(self, ctx: BuildContext, work: Work) -> Built:
        shutil.copyfile(ctx.fp32_onnx, ctx.workdir / "model.onnx")
        return Built("model.onnx", ("model.onnx",), "fp32", {"tool": "copy"}, work.runtime, (work.opt.note,))

    def open(self, model_path: Path, *, threads: int, runtime: dict[str, Any]) -> OrtSession:
        return OrtSession(model_path, threads=threads)

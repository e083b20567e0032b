"""Frozen artifact records: which stage made which files from what, with which parameters."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ARTIFACT_FILE = "artifact.json"


def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Artifact:
    stage: str
    key: str
    folder: Path
    files: dict[str, str]  # file name -> sha256
    parents: tuple[str, ...]  # parent artifact keys
    config: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def path(self, name: str) -> Path:
        return self.folder / name

    def record(self) -> dict[str, Any]:
        """Lineage entry: which stage made which files from what, with which parameters."""
        return {"stage": self.stage, "key": self.key, "parents": list(self.parents), "config": self.config,
                "files": self.files, "metrics": self.metrics, "seconds": round(self.seconds, 3)}

    @classmethod
    def load(cls, folder: Path) -> Artifact:
        d = json.loads((folder / ARTIFACT_FILE).read_text())
        return cls(stage=d["stage"], key=d["key"], folder=folder, files=d["files"], parents=tuple(d["parents"]),
                   config=d["config"], metrics=d["metrics"], seconds=d.get("seconds", 0.0))

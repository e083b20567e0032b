"""Hugging Face `transformers` sequence classifiers from a local folder (`model: {hf: ./folder}`).

Offline only: `from_pretrained(..., local_files_only=True)`, so a missing file is an error here, never a
download. Eager attention is asked for, so the exported graph holds plain MatMul/Softmax attention that
ONNX Runtime's BERT fusions, NNCF and Torch-Pruning (whole heads of BertSelfAttention-style modules) all
understand. Needs the optional extra: `pip install edgebundle[hf]`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from edgebundle.core.errors import RecipeError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")


def _require_config(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise RecipeError(f"model.hf: {folder} has no config.json (save the model with save_pretrained)")


def folder_fingerprint(folder: Path) -> str:
    """Hash of the folder's config and weight files (names and bytes): the model's identity for the cache."""
    _require_config(folder)
    h = hashlib.sha256()
    for f in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


class SequenceClassifier(nn.Module):
    """Logits only, positional inputs (input_ids[, attention_mask]): the form export and the runtimes use."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def sequence_classifier(path: Path | str, **kwargs) -> SequenceClassifier:
    """Load AutoModelForSequenceClassification from `path` (offline); kwargs go to from_pretrained."""
    try:
        from transformers import AutoModelForSequenceClassification
    except ImportError as e:
        raise RecipeError("model.hf needs the transformers package: pip install edgebundle[hf]") from e
    path = Path(path)
    _require_config(path)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), local_files_only=True, attn_implementation="eager", **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise RecipeError(f"model.hf: could not load {path}: {type(e).__name__}: {e}") from e
    return SequenceClassifier(model).eval()

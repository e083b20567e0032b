"""Hugging Face `transformers` models from a local folder (`model: {hf: ./folder, task: ...}`).

Tasks: `sequence-classification` (logits, N x classes), `feature-extraction` (one sentence embedding per
input: mean over the attention mask or the CLS token, optionally L2-normalized, N x hidden),
`token-classification` (logits, N x tokens x classes), `image-classification` (pixel_values -> logits).

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

from edgebundle.core.errors import RecipeError, weights_problem

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


TASKS = ("sequence-classification", "feature-extraction", "token-classification", "image-classification")
_AUTO = {"sequence-classification": "AutoModelForSequenceClassification", "feature-extraction": "AutoModel",
         "token-classification": "AutoModelForTokenClassification",
         "image-classification": "AutoModelForImageClassification"}


class SequenceClassifier(nn.Module):
    """Logits only, positional inputs (input_ids[, attention_mask]): the form export and the runtimes use.
    Serves token classification too (logits per token)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class FeatureExtractor(nn.Module):
    """Sentence embeddings: the encoder's last hidden state pooled over real tokens (mean) or the first
    token (cls), optionally L2-normalized (what sentence-transformers' encode(normalize_embeddings=True)
    gives for mean-pooling models)."""

    def __init__(self, model: nn.Module, pooling: str = "mean", normalize: bool = False) -> None:
        super().__init__()
        self.model, self.pooling, self.normalize = model, pooling, normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            out = hidden[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            out = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(out, p=2.0, dim=-1) if self.normalize else out


class ImageClassifier(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def load(path: Path | str, task: str = "sequence-classification", *, pooling: str = "mean",
         normalize: bool = False, **kwargs) -> nn.Module:
    """The model for `task` from a local folder (offline; kwargs go to from_pretrained), wrapped so that it
    takes positional tensors and returns one tensor."""
    try:
        import transformers
    except ImportError as e:
        raise RecipeError("model.hf needs the transformers package: pip install edgebundle[hf]") from e
    if task not in TASKS:
        raise RecipeError(f"model.task: unknown task {task!r}; one of {', '.join(TASKS)}")
    path = Path(path)
    _require_config(path)
    auto = getattr(transformers, _AUTO[task])
    extra = {} if task == "image-classification" else {"attn_implementation": "eager"}
    try:
        model = auto.from_pretrained(str(path), local_files_only=True, **extra, **kwargs)
    except Exception as e:  # pickled weights refused by weights_only (UnpicklingError), a corrupt file, ...
        if "weights_only" in str(e) or "Weights only load failed" in str(e):
            raise RecipeError(f"model.hf: the weights in {path} cannot be loaded safely: {weights_problem(e)}") from e
        if not isinstance(e, (OSError, ValueError, KeyError)):
            raise RecipeError(f"model.hf: could not load {path} for {task}: {type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]}") from e
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if isinstance(e, ValueError) and "Unrecognized configuration class" in why:
            why = f"this model's class has no {task} head in transformers"
        raise RecipeError(f"model.hf: could not load {path} for {task}: {why or type(e).__name__}") from e
    if task == "feature-extraction":
        return FeatureExtractor(model, pooling, normalize).eval()
    if task == "image-classification":
        return ImageClassifier(model).eval()
    return SequenceClassifier(model).eval()


def sequence_classifier(path: Path | str, **kwargs) -> SequenceClassifier:
    """Load AutoModelForSequenceClassification from `path` (offline); kwargs go to from_pretrained."""
    return load(path, "sequence-classification", **kwargs)

"""The recipe: one YAML file, validated once, at the edge, into typed pydantic models.

Relative paths inside a recipe (weights, data folder, a `file.py:factory`) are resolved against the
recipe file's folder; the output folder is resolved against the current directory.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgebundle.core.metrics import MetricSpec
from edgebundle.core.errors import RecipeError

DTYPES = ("float32", "float16", "int64", "int32")
MAX_INPUT_ELEMENTS = 1 << 28  # 256 Mi elements per input: a memory guard against absurd shapes


MAX_EPOCHS = 100_000  # upper bounds where a typo would cost hours (or forever)
MAX_BATCH = 1 << 20
# a training batch: steps skip batches of one row (BatchNorm cannot learn from one), so 1 would train nothing
StepBatch = Annotated[int, Field(ge=2, le=MAX_BATCH)]
MAX_ITERATIONS = 10_000_000


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # no NaN/inf anywhere


class ModelSpec(Strict):
    factory: str | None = Field(None, description="'package.module:callable' or 'path/to/file.py:callable'")
    hf: Path | None = Field(None, description=(
        "instead of a factory: a Hugging Face transformers sequence-classification model saved in a local "
        "folder (config.json + weights; never downloaded); needs edgebundle[hf]"))
    task: Literal["sequence-classification", "feature-extraction", "token-classification",
                  "image-classification"] = Field("sequence-classification", description=(
        "model.hf only: which head and output; feature-extraction gives one pooled embedding per input"))
    pooling: Literal["mean", "cls"] = Field("mean", description="feature-extraction: mean over real tokens or CLS")
    normalize: bool = Field(False, description="feature-extraction: L2-normalize the embedding")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: Path | None = Field(
        default=None, description="state dict: .safetensors, or .pt/.pth loaded with weights_only=True"
    )

    @field_validator("factory")
    @classmethod
    def _factory_form(cls, v: str | None) -> str | None:
        if v is None:
            return v
        module, sep, attr = v.rpartition(":")
        if not sep or not module or not attr:
            raise ValueError(f"must be 'module:callable' (got {v!r})")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.factory is None) == (self.hf is None):
            raise ValueError("give exactly one of model.factory and model.hf")
        if self.factory is not None and self.hf_fields():
            raise ValueError(f"{', '.join(self.hf_fields())} apply to model.hf only")
        if self.task != "feature-extraction" and ("pooling" in self.hf_fields() or self.normalize):
            raise ValueError("pooling and normalize apply to task feature-extraction only")
        return self

    def hf_fields(self) -> list[str]:
        """The model.hf fields set away from their defaults (only these enter cache keys, so recipes written
        before they existed keep their keys)."""
        return [f for f in ("task", "pooling", "normalize") if getattr(self, f) != type(self).model_fields[f].default]


class EnsembleSpec(Strict):
    """Several models averaged into one graph (model averaging); each member trains on its own seed."""

    members: list[ModelSpec] = Field(min_length=2)
    mode: Literal["logits", "probs"] = Field("logits", description="average logits, or probabilities")
    weights: Path | None = Field(default=None, description="state dict of the whole ensemble (optional)")


class InputSpec(Strict):
    name: str
    shape: list[int] = Field(min_length=1)
    dtype: Literal["float32", "float16", "int64", "int32"] = "float32"
    dynamic_axes: dict[int, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> InputSpec:
        if any(d <= 0 for d in self.shape):
            raise ValueError(f"input '{self.name}': every dimension must be > 0 (got {self.shape})")
        n = 1
        for d in self.shape:
            n *= d
        if n > MAX_INPUT_ELEMENTS:
            raise ValueError(
                f"input '{self.name}': shape {self.shape} has {n} elements, above the limit of "
                f"{MAX_INPUT_ELEMENTS}"
            )
        for axis in self.dynamic_axes:
            if not 0 <= axis < len(self.shape):
                raise ValueError(f"input '{self.name}': dynamic axis {axis} is outside shape {self.shape}")
        first: dict[str, int] = {}  # one name is one size: axes that share it must agree
        for axis, label in sorted(self.dynamic_axes.items()):
            other = first.setdefault(label, axis)
            if self.shape[other] != self.shape[axis]:
                raise ValueError(f"input '{self.name}': dynamic axes {other} and {axis} share the name '{label}' "
                                 f"(one size) but have {self.shape[other]} and {self.shape[axis]} in shape "
                                 f"{self.shape}; give them different names")
        return self


class SplitSpec(Strict):
    train: float = Field(0.6, gt=0, lt=1)
    val: float = Field(0.2, gt=0, lt=1)
    test: float = Field(0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _sum(self) -> SplitSpec:
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1 (got {self.train + self.val + self.test:g})")
        return self


class ImageSpec(Strict):
    """kind=images: how each image becomes the input tensor (shorter side resized, center crop to the
    input's H x W, 0..1, then (x - mean) / std per channel)."""

    resize: int | None = Field(None, ge=1, le=16384, description="shorter side before the crop (default: the crop)")
    mean: list[float] | None = Field(None, min_length=1, max_length=3)
    std: list[float] | None = Field(None, min_length=1, max_length=3)
    layout: Literal["NCHW", "NHWC"] = "NCHW"

    @field_validator("std")
    @classmethod
    def _positive(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(x <= 0 for x in v):
            raise ValueError("every std must be > 0")
        return v


class TextSpec(Strict):
    """kind=text: .txt (one text per line, optional TAB label), .csv or .jsonl (named columns)."""

    text_column: str = "text"
    label_column: str | None = Field(None, description=".csv/.jsonl: the label column, if any")
    document_column: str = Field("document", description=(
        ".csv/.jsonl with data.group_by document: the column naming each row's document (rows of one document "
        "stay in one split)"))
    tokenizer: Path | None = Field(None, description="a local tokenizer folder (default: model.hf's folder)")


class DatasetsSpec(Strict):
    """kind=datasets: a Hugging Face `datasets` folder written by `save_to_disk` (a Dataset or a DatasetDict).
    Exactly one of text_column (tokenized as kind text), image_column (preprocessed as kind images, lazily)
    or columns (input name -> column, taken as arrays)."""

    split: str | None = Field(None, description="a DatasetDict's split (default: 'train', or its only split)")
    text_column: str | None = None
    image_column: str | None = None
    columns: dict[str, str] = Field(default_factory=dict)
    label_column: str | None = Field(None, description="integer or ClassLabel labels (class names recorded)")

    @model_validator(mode="after")
    def _one_kind(self) -> DatasetsSpec:
        given = [k for k in ("text_column", "image_column", "columns") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of text_column, image_column and columns")
        return self


class UnlabelledSpec(Strict):
    """More inputs of the data's kind, without labels, for distillation and the structure search only."""

    path: Path | None = Field(None, description="kind images: an image folder; kind text: a .txt, .csv or .jsonl "
                              "file")
    function: str | None = Field(None, description=(
        "kind function: 'module:fn' yielding batches as data.function does (its own preprocessing, optional "
        "'group' per input; without groups every input is its own)"))
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments to function")
    held_out: float = Field(0.2, ge=0, lt=1, description=(
        "share of its groups (image files, or folders with group_by folder; text rows, or documents) distillation "
        "never sees: the student's out-of-distribution check against the original: a student over budget there "
        "is rejected, even where the test split holds"))
    group_by: Literal["auto", "folder", "document"] = Field("auto", description=(
        "its groups: auto follows data.group_by (image files, or folders with group_by folder; text rows, or "
        "documents); folder: images, one group per folder holding the files; document: text, paragraphs"))


class DataSpec(Strict):
    kind: Literal["digits", "folder", "function", "images", "text", "datasets"] = "digits"
    path: Path | None = Field(default=None, description=(
        "kind=folder: folder of .npz (x, y) / .npy files; kind=images: image folder (class sub-folders or "
        "flat); kind=text: a .txt, .csv or .jsonl file; kind=datasets: a `datasets` save_to_disk folder"))
    function: str | None = Field(default=None, description="kind=function: 'module:fn' yielding batches")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="kind=function: keyword arguments to it")
    splits: SplitSpec = SplitSpec()
    seed: int = Field(0, ge=0, le=2**32 - 1)
    calibration_split: Literal["train", "val"] = "train"
    calibration_samples: int = Field(128, ge=1, le=100_000)
    max_eval_samples: int | None = Field(None, ge=10, le=10_000_000, description=(
        "at most this many samples in each of val and test (drawn once, kept in memory and in the work "
        "folder); the train split streams from the source, so a folder larger than memory needs this cap"))
    image: ImageSpec | None = None
    text: TextSpec | None = None
    datasets: DatasetsSpec | None = None
    group_by: Literal["auto", "none", "folder", "document"] = Field("auto", description=(
        "which inputs come from one source (crops or augmentations of one photo, frames of one video, sentences "
        "of one document): inputs of one group stay in one split and the verdict's interval resamples groups. "
        "auto: the groups a data function or .npz file gives ('group'), one per image file, one per text row; "
        "folder: images, one group per folder holding the files (frames stored one folder per video); "
        "document: text, one group per document (.txt: paragraphs split by blank lines; .csv/.jsonl: "
        "text.document_column); none: every input its own group"))

    unlabelled: UnlabelledSpec | None = Field(None, description=(
        "inputs without labels, of the same kind (images or text) and preprocessing, that distillation and the "
        "structure search learn from beside the training split; a share of them is held out as an "
        "out-of-distribution check"))

    @model_validator(mode="after")
    def _kind_fields(self) -> DataSpec:
        if self.kind in ("folder", "images", "text", "datasets") and self.path is None:
            raise ValueError(f"data.kind '{self.kind}' needs data.path")
        if self.image is not None and self.kind not in ("images", "datasets"):
            raise ValueError("data.image applies to kinds 'images' and 'datasets' only")
        if self.text is not None and self.kind not in ("text", "datasets"):
            raise ValueError("data.text applies to kinds 'text' and 'datasets' only")
        if (self.datasets is None) != (self.kind != "datasets"):
            raise ValueError("data.kind 'datasets' needs data.datasets (its columns), and data.datasets "
                             "applies to that kind only")
        if self.kind == "function" and not self.function:
            raise ValueError("data.kind 'function' needs data.function ('module:fn')")
        if self.group_by == "folder" and self.kind != "images":
            raise ValueError("data.group_by 'folder' applies to kind 'images' (a data function or .npz file gives "
                             "its groups as 'group')")
        if self.group_by == "document" and self.kind != "text":
            raise ValueError("data.group_by 'document' applies to kind 'text'")
        u = self.unlabelled
        if u is not None and self.kind not in ("images", "text", "function"):
            raise ValueError("data.unlabelled applies to kinds 'images', 'text' and 'function'")
        if u is not None and (self.kind == "function") != (u.function is not None):
            raise ValueError("data.unlabelled: kind 'function' takes unlabelled.function (a data function), kinds "
                             "'images' and 'text' take unlabelled.path")
        if u is not None and (u.path is None) == (u.function is None):
            raise ValueError("data.unlabelled: give exactly one of path and function")
        return self


class TrainStage(Strict):
    """Trains the teacher. 'auto': train only when the model has no weights (a weights file, or model.hf)."""

    enabled: bool | Literal["auto"] = "auto"
    epochs: int = Field(20, ge=1, le=MAX_EPOCHS)
    lr: float = Field(3e-3, gt=0)
    batch_size: StepBatch = 64
    weight_decay: float = Field(1e-4, ge=0)
    patience: int | None = Field(None, ge=1, le=MAX_EPOCHS, description=(
        "stop after this many epochs without a better validation score (the best checkpoint is kept either way); "
        "none: run every epoch"))
    group_by_length: bool = Field(True, description=(
        "text inputs with an attention mask: batches drawn from inputs of similar length, each cut after its "
        "longest real sequence where the model's outputs stay the same (as distill.group_by_length)"))


class PruneStage(Strict):
    enabled: bool = True
    importance: Literal["magnitude", "taylor", "lamp", "fpgm", "activation"] = Field("magnitude", description=(
        "which channels go: weight norms (magnitude, lamp, fpgm), Taylor (labels), or activation: a channel's "
        "contribution to the layers that read it, the norm of their weights on it times its spread on training "
        "inputs (no labels). EfficientNet-Lite1, 10 % of the unshared channels, compensated, before any "
        "distillation: magnitude kept 11 of 21 confident unseen crops, activation 19"))
    shared: bool = Field(True, description=(
        "also prune channels that several layers read (a residual stream: every block of a stage reads it); "
        "false prunes only channels one layer reads (the hidden channels of MBConv or FFN blocks). EfficientNet-"
        "Lite1, activation importance, compensated, before any distillation: 10 % of every channel kept 9 of 21 "
        "confident unseen crops, 10 % of the unshared ones 19 (20 %: 0 and 8)"))
    compensate: Literal["mean", "least_squares", "none"] = Field("mean", description=(
        "where training inputs exist, what a removed channel gave the layers that read it is given back. mean "
        "(default): its mean contribution goes into each reader's bias (uncompensated, the ReLU6 channels "
        "EfficientNet loses shift its blocks by up to 5 standard deviations). least_squares: a reader that mixes "
        "channels per position (a Linear, a 1x1 conv) is refitted, its weights on the kept channels and its bias "
        "the least-squares fit of its output before pruning on training inputs; other readers get the mean. "
        "all-MiniLM-L6-v2, a quarter of the FFN channels, before any distillation, cosine to the original on "
        "unseen sentences: mean 0.934 / min 0.653 with mean, 0.977 / 0.835 with least_squares; EfficientNet-"
        "Lite1, 20 / 30 % of the unshared channels, confident crops of unseen photos: 54 / 41 of 56 with mean, "
        "50 / 40 with least_squares. true: mean, false: none"))

    @field_validator("compensate", mode="before")
    @classmethod
    def _compensate_bool(cls, v: Any) -> Any:
        return {True: "mean", False: "none"}.get(v, v) if isinstance(v, bool) else v

    recenter: bool = Field(True, description=(
        "where training inputs exist, each BatchNorm keeps its original statistics, moved so that it standardizes "
        "its pruned input as it standardized the original one (mean and variance on 64 training inputs; one pass, "
        "in layer order). EfficientNet-Lite1, 20 / 30 / 40 % of the unshared channels, activation importance, "
        "compensated, before any distillation: 11 / 8 / 0 of 21 confident unseen crops without, 15 / 13 / 8 with"))
    ratio: float | Literal["auto"] = Field(0.5, description=(
        "fraction of channels removed per prunable layer; auto: the structure is searched (stage `search`): "
        "candidates are pruned, briefly distilled, quantized for the first target, judged on the validation "
        "split against the original model and timed against the unpruned int8 model; the fastest within "
        "budget is kept (none within budget: nothing is pruned)"))
    head_ratio: float = Field(0.0, ge=0, lt=1, description=(
        "fraction of attention heads removed per attention layer (whole heads: q, k and v together)"))
    depth_ratio: float = Field(0.0, ge=0, lt=1, description=(
        "fraction of the blocks of the model's largest ModuleList dropped whole (depth pruning, DistilBERT-style), "
        "for blocks that keep their input's shape. With compensation and training inputs, the blocks that go are "
        "chosen greedily (the one whose removal moves the output least on training inputs) and each run of "
        "dropped blocks is replaced by a bridge fitted to what it did: least_squares a linear map of the hidden "
        "state (ReplaceMe), mean a shift. all-MiniLM-L6-v2, two of six layers, before any distillation, cosine to "
        "the original on unseen sentences: 0.743 mean / 0.364 min dropped (blocks spread evenly, as with "
        "compensate none), 0.858 / 0.511 shifted, 0.930 / 0.488 with linear bridges"))
    input_scale: float = Field(1.0, gt=0, le=1, description=(
        "image models: the network sees its image inputs resized to this fraction of their height and width "
        "(whole pixels, bilinear); the bundle keeps its input shape and resizes inside (a Resize in front of the "
        "graph), so preprocessing is unchanged. A convolutional network's cost goes with the pixels it sees: "
        "EfficientNet-Lite1 at 0.87 (208 of 240 px) runs about 0.75 of its MACs. 1: unchanged"))
    search_minutes: float = Field(30.0, gt=0, le=7 * 24 * 60, description=(
        "ratio auto: the search's time bound; a candidate that would end past it (expected to take as long as the "
        "longest pruned candidate priced so far) is not started (its row says so)"))
    search_ratios: list[float] = Field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5], description=(
        "ratio auto: the channel ratios tried, in order ([]: none); models with attention also try head_ratio 0.25 "
        "and 0.5, models with blocks that keep their input's shape the depth ratios of search_depth_ratios"))
    search_depth_ratios: list[float] = Field(default_factory=lambda: [0.25, 0.33, 0.5], description=(
        "ratio auto, models with blocks that keep their input's shape: the depth ratios tried, mild to strong "
        "(of those that drop as many blocks, one; []: none); a gentler first one (0.15: 2 of 14 blocks) can hold "
        "where 0.25 does not"))
    search_input_scales: list[float] = Field(default_factory=list, description=(
        "ratio auto, image models: the input scales tried, mild to strong (e.g. [0.93, 0.87]); none by default"))
    search_samples: int | None = Field(None, ge=1, le=100_000_000, description=(
        "ratio auto: each candidate's short distillation learns from at most this many of the inputs distillation "
        "learns from (the same random ones for every candidate; null: all), so a search's cost does not grow with "
        "the data. EfficientNet-Lite1's search example, one epoch on all 2160 crops: about 12 of a candidate's "
        "15 minutes on 2 cores"))
    search_epochs: int = Field(2, ge=0, le=MAX_EPOCHS, description=(
        "ratio auto: epochs of distillation a candidate gets where its pruned start misses the budget, before it is "
        "judged again (0: none; a start that holds is not distilled)"))
    ignore: list[str] = Field(
        default_factory=list,
        description="module names (model.named_modules) left unpruned; the output layer always is",
    )
    global_pruning: bool = False
    iterative_steps: int = Field(1, ge=1, le=1000)
    round_to: int | Literal["auto"] | None = Field("auto", description=(
        "keep channel counts multiples of this; auto: 16 where every pruned layer keeps at least 16 channels, else 8 "
        "where every one keeps at least 8 (with shared: false, the layers whose channels are pruned) "
        "(SIMD-friendly widths: MobileNetV2 pruned 30 % ran 1.9x faster on ORT int8 with 8 than without)"))
    taylor_batches: int = Field(4, ge=1, le=10_000, description="batches of training data for Taylor gradients")

    @field_validator("ratio", mode="plain")
    @classmethod
    def _ratio_range(cls, v: Any) -> float | str:
        if v == "auto":
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError("must be 'auto' or a number >= 0 and < 1")
        if not math.isfinite(v):
            raise ValueError("Input should be a finite number")
        if not 0 <= v < 1:
            raise ValueError("must be 'auto' or a number >= 0 and < 1")
        return float(v)

    @field_validator("search_ratios", "search_depth_ratios", "search_input_scales")
    @classmethod
    def _search_ratio_range(cls, v: list[float]) -> list[float]:
        if any(not 0 < r < 1 for r in v):
            raise ValueError("every ratio must be > 0 and < 1")
        return v

    @property
    def searched(self) -> bool:
        return self.ratio == "auto"

    @property
    def cuts(self) -> bool:
        """Whether these settings (a fixed structure, not a search) change the model."""
        return not self.searched and (self.ratio > 0 or self.head_ratio > 0 or self.depth_ratio > 0
                                      or self.input_scale < 1)

    @field_validator("round_to")
    @classmethod
    def _positive_round_to(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1, 'auto' or null")
        return v


class DistillStage(Strict):
    enabled: bool = True
    dropout: Literal["auto", "on", "off"] = Field("auto", description=(
        "auto: off where the teacher came with its weights (its student starts close to it, as pruning with "
        "compensation leaves it), on where this recipe trained it. off: the student learns in eval mode except "
        "BatchNorm (no dropout, attention dropout included). all-MiniLM-L6-v2 with a quarter of its FFN channels "
        "refitted by least squares, two epochs at lr 3e-5 on the embedding loss alone: with dropout neither epoch "
        "beat the pruned start on validation (the start was kept), without it validation cosine rose both "
        "epochs (0.986, 0.988) and test cosine mean went 0.984 -> 0.986"))
    batchnorm: Literal["auto", "frozen", "train"] = Field("auto", description=(
        "auto: frozen where the teacher came with its weights, train where this recipe trained it (its "
        "statistics are this data's). frozen: BatchNorm layers keep the teacher's running statistics while the "
        "student learns (what a "
        "pretrained network's statistics, drawn from far more data than a recipe has, need: EfficientNet-Lite1 "
        "with 10 % of its unshared channels pruned, one epoch on crops of four photos, agreed with the original "
        "on 2 % of the confident validation crops with batch statistics, 71 % frozen); train: batch statistics, "
        "updated"))
    epochs: int = Field(30, ge=1, le=MAX_EPOCHS)
    lr: float = Field(3e-3, gt=0)
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.7, ge=0, le=1, description="weight of the KL term; 1 - alpha weighs CE on labels")
    batch_size: StepBatch = 64
    weight_decay: float = Field(1e-4, ge=0)
    patience: int | None = Field(None, ge=1, le=MAX_EPOCHS, description=(
        "stop after this many epochs without a better validation score (the best checkpoint is kept either way); "
        "none: run every epoch"))
    hidden_weight: float = Field(0.0, ge=0, description=(
        "weight of the hidden-state term: relative MSE between the student's and the teacher's block outputs "
        "(a learned linear map bridges pruned widths); 0 turns it off. The relative MSE is small next to the "
        "KL term (0.01-0.1 on the example encoder), so useful weights are around 10"))
    hidden_layers: list[str] | None = Field(None, description=(
        "module names whose outputs are matched; default: every block of the model's largest ModuleList"))
    augment: Literal["none", "auto"] = Field("none", description=(
        "auto: a new augmented view of each training input every epoch, the teacher's output computed on that "
        "view (images: random resized crop and flip; text: span cropping of input_ids with attention_mask)"))
    group_by_length: bool = Field(True, description=(
        "text inputs with an attention mask: batches drawn from inputs of similar length (Hugging Face Trainer's "
        "group_by_length), so that cutting each batch after its longest real sequence (done wherever the models' "
        "outputs stay the same) saves most of the padding; false: batches drawn at random"))
    loss: Literal["auto", "kl", "cosine", "mse"] = Field("auto", description=(
        "auto follows the recipe's metric: top1/agreement -> KL on softened logits (+ CE on labels), cosine -> "
        "1 - cosine of the outputs (embeddings), else relative MSE (regression); no labels needed"))


class ClusterStage(Strict):
    """Weight sharing: each layer's weights take `clusters` shared values (k-means); off by default."""

    enabled: bool = False
    clusters: int = Field(16, ge=2, le=256)
    min_params: int = Field(256, ge=1, description="only Conv/Linear layers with at least this many weights")
    sharing: Literal["per_channel_scaled", "per_layer"] = Field(
        "per_channel_scaled", description="per_channel_scaled survives per-channel int8; per_layer suits fp32")
    finetune_epochs: int = Field(0, ge=0, le=MAX_EPOCHS, description="fine-tune the centroids with the distillation loss")
    lr: float = Field(1e-3, gt=0)
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.7, ge=0, le=1)
    batch_size: StepBatch = 64


class ParitySpec(Strict):
    max_abs: float = Field(1e-3, gt=0)
    min_cosine: float = Field(0.9999, gt=0, le=1)
    samples: int = Field(64, ge=1, le=1_000_000)


class ExportStage(Strict):
    opset: int = Field(20, ge=17, le=23)
    parity: ParitySpec = ParitySpec()
    exporter: Literal["auto", "dynamo", "torchscript"] = Field("auto", description=(
        "torch.onnx's dynamo exporter, or its TorchScript one, whose graphs of Hugging Face BERT-style "
        "attention ONNX Runtime's transformer optimizer fuses (Attention, SkipLayerNorm, BiasGelu: faster "
        "fp32 and the QAttention int8 path); auto: torchscript (at opset 17, the one those fusions match) for "
        "models with such attention, else dynamo"))


class Stages(Strict):
    # the built-in stages' configs; any other key is a registered stage's own config, validated through the
    # stage registry (edgebundle.stages.registry.check_stages) before any work
    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)

    train: TrainStage = TrainStage()
    prune: PruneStage = PruneStage()
    distill: DistillStage = DistillStage()
    cluster: ClusterStage = ClusterStage()
    export: ExportStage = ExportStage()


class CalibrationSpec(Strict):
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    percentile: float = Field(99.999, gt=90, le=100)
    samples: int | None = Field(None, ge=1, description="overrides data.calibration_samples")


class MeasureSpec(Strict):
    batch: int = Field(1, ge=1, le=MAX_BATCH)
    warmup_min: int = Field(20, ge=1, le=1_000_000)
    warmup_max: int = Field(2000, ge=1, le=1_000_000)
    iterations: int = Field(300, ge=10, le=MAX_ITERATIONS)
    time_budget_s: float | None = Field(None, gt=0, description="stop early when this much time is spent")


class DeviceSpec(Strict):
    """The machine a target's bundle is measured and judged on: this one (`local`), one reached over SSH (the
    user's own OpenSSH client, so ~/.ssh/config, agents and jump hosts work), or a phone over adb."""

    ssh: str | None = Field(None, min_length=1, description="user@host, or a Host of ~/.ssh/config")
    port: int | None = Field(None, ge=1, le=65535)
    identity_file: Path | None = None
    ssh_options: list[str] = Field(default_factory=list, description=(
        "extra `-o` options for ssh and scp, e.g. StrictHostKeyChecking=accept-new"))
    adb: str | None = Field(None, min_length=1, description="the device's serial (adb devices)")
    runner: str | None = Field(None, description=(
        "adb: the runtime's benchmark binary on the device (executor_runner, onnxruntime_perf_test, benchmark_model)"))
    local: bool = False
    python: str = Field("python3", min_length=1, description="the device's Python (ssh, local)")
    workdir: str = Field("/tmp/edgebundle", min_length=1, description="a folder on the device for the files")
    timeout_s: float = Field(900.0, gt=0, le=24 * 3600, description="time limit of each command on the device")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.@:-]+$", description=(
        "the name its records carry (check --device NAME); default: the address"))

    @model_validator(mode="after")
    def _one_kind(self) -> DeviceSpec:
        kinds = [k for k, v in (("ssh", self.ssh), ("adb", self.adb), ("local", self.local or None)) if v]
        if len(kinds) != 1:
            raise ValueError("a device is one of {ssh: user@host}, {adb: SERIAL} or {local: true}"
                             + (f"; got {', '.join(kinds)}" if kinds else ""))
        if self.adb and not self.runner:
            raise ValueError("an adb device needs `runner:` (the runtime's benchmark binary on the device, e.g. "
                             "/data/local/tmp/executor_runner)")
        return self

    @property
    def kind(self) -> str:
        return "ssh" if self.ssh else "adb" if self.adb else "local"

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.ssh:
            return self.ssh + (f":{self.port}" if self.port else "")
        return self.adb if self.adb else "local"

    @classmethod
    def from_url(cls, url: str, runner: str | None = None) -> DeviceSpec:
        """`ssh://user@host[:port]`, `adb://SERIAL` (with `runner`, the benchmark binary on it) or `local` (the
        --device option)."""
        import re

        m = re.fullmatch(r"ssh://(?P<where>[^:/\s]+)(?::(?P<port>\d+))?/?", url)
        try:
            if m:
                return cls(ssh=m["where"], port=int(m["port"]) if m["port"] else None)
            if url.startswith("adb://") and len(url) > 6:
                if not runner:
                    raise RecipeError(f"--device {url}: an adb device needs the runtime's benchmark binary on it "
                                      "(--runner /data/local/tmp/executor_runner, or device: {adb: SERIAL, runner: "
                                      "PATH} in the recipe)")
                return cls(adb=url[6:].rstrip("/"), runner=runner, workdir="/data/local/tmp/edgebundle")
            if url == "local":
                return cls(local=True)
        except ValidationError as e:
            raise RecipeError(f"--device {url}: {e.errors()[0]['msg']}") from e
        raise RecipeError(f"--device {url}: not a device address; use ssh://user@host[:port], adb://SERIAL or "
                          "local")


class TargetSpec(Strict):
    name: str
    threads: int | None = Field(None, ge=1, le=1024, description="intra-op threads; default: usable cores")
    calibration: CalibrationSpec = CalibrationSpec()
    measure: MeasureSpec = MeasureSpec()
    max_accuracy_drop: float = Field(1.0, ge=0, allow_inf_nan=False, description=(
        "the budget of drop metrics (top1, agreement: points below fp32; a metric function: its own units)"))
    options: dict[str, Any] = Field(default_factory=dict, description=(
        "target-specific: validated by the target (edgebundle.targets.registry.check_targets) before any work"))
    device: DeviceSpec | None = Field(None, description=(
        "measure and judge the bundle on this device as well (ssh, adb or local); its verdict gates the bundle"))


class LimitsSpec(Strict):
    user_code_s: float = Field(600.0, ge=0.1, le=7 * 24 * 3600, description=(
        "time limit of each call into user code (model factory, data function, metric function, importing "
        "their module); a call that does not return in time ends the run with a line naming it"))


class Recipe(Strict):
    version: Literal[1] = 1
    name: str = Field("model", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    model: ModelSpec | EnsembleSpec
    inputs: list[InputSpec] = Field(min_length=1)
    outputs: list[str] = Field(default_factory=lambda: ["logits"], min_length=1)
    metric: MetricSpec = MetricSpec()
    data: DataSpec = DataSpec()
    stages: Stages = Stages()
    targets: list[TargetSpec] = Field(default_factory=lambda: [TargetSpec(name="ort-cpu")], min_length=1)
    limits: LimitsSpec = LimitsSpec()
    output: Path = Path("bundles")
    base_dir: Path = Field(Path("."), exclude=True, description="set by the loader: the recipe's folder")

    @field_validator("output", mode="before")
    @classmethod
    def _named(cls, v: Any) -> Any:
        if isinstance(v, str) and not v.strip():  # Path("") is the current folder: bundles among the user's files
            raise ValueError("empty; name the folder the bundles go to (e.g. bundles, or . for this folder)")
        return v

    @model_validator(mode="after")
    def _unique(self) -> Recipe:
        for what, names in (("input", [i.name for i in self.inputs]), ("output", self.outputs),
                            ("target", [t.name for t in self.targets])):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"duplicate {what} name(s): {', '.join(dup)}")
        clash = sorted({i.name for i in self.inputs} & set(self.outputs))
        if clash:
            raise ValueError(f"name(s) used for an input and an output: {', '.join(clash)}")
        if self.metric.output is not None and self.metric.output not in self.outputs:
            raise ValueError(f"metric.output '{self.metric.output}' is not among outputs: {', '.join(self.outputs)}")
        return self

    @property
    def judged_output(self) -> tuple[int, str]:
        """(index, name) of the output the metric judges."""
        name = self.metric.output or self.outputs[0]
        return self.outputs.index(name), name

    def resolve(self, p: Path) -> Path:
        return p if p.is_absolute() else (self.base_dir / p)

    def target(self, name: str) -> TargetSpec:
        """The recipe's settings for a target; a target the recipe does not list gets defaults (whether it
        exists is the target registry's to say: the pipeline's preflight)."""
        for t in self.targets:
            if t.name == name:
                return t
        return TargetSpec(name=name)


def format_validation_error(e: ValidationError, source: str, prefix: str = "") -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in (prefix, *err["loc"]) if x != "") or "(top level)"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}'")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}")
    return f"invalid recipe{' ' + source if source else ''}: " + "; ".join(parts)


def recipe_from_dict(data: Any, *, base_dir: Path = Path("."), source: str = "<dict>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"invalid recipe {source}: the top level must be a mapping, got {type(data).__name__}")
    if "base_dir" in data:
        raise RecipeError(f"invalid recipe {source}: unknown key 'base_dir'")
    try:
        return Recipe.model_validate({**data, "base_dir": base_dir})
    except ValidationError as e:
        raise RecipeError(format_validation_error(e, source)) from e


def load_recipe(path: str | Path | None = None) -> Recipe:
    """Load and validate a recipe file; `None` gives the embedded default."""
    if path is None:
        text = default_recipe_text()
        return recipe_from_dict(yaml.safe_load(text), base_dir=Path.cwd(), source="(embedded default)")
    p = Path(path)
    if p.is_dir():
        raise RecipeError(f"recipe {p} is a folder; give the recipe's .yaml file")
    if not p.is_file():
        raise RecipeError(f"recipe not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RecipeError(f"recipe {p} is not valid YAML: {first}") from e
    return recipe_from_dict(data, base_dir=p.resolve().parent, source=str(p))


def default_recipe_text() -> str:
    return resources.files("edgebundle.core").joinpath("default_recipe.yaml").read_text(encoding="utf-8")

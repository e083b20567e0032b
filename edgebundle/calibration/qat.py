"""Quantization-aware distillation with PT2E (torchao's `prepare_qat_pt2e` / `convert_pt2e`).

For a model that post-training quantization puts over its accuracy budget: the fp32 model is captured with
`torch.export` (dynamic batch), fake-quantized by the target's own PT2E quantizer (the scheme its int8
program runs), its observers calibrated on the calibration inputs, and then fine-tuned for a few epochs to
reproduce the fp32 model's outputs on the training inputs (no labels needed) with the loss the recipe's
metric calls for (KL on softened logits, cosine, relative MSE). The fp32 model stays the reference: the
bundle is judged against it, not against the fine-tuned weights.

Training starts where post-training quantization ends: each BatchNorm is folded into its convolution (frozen,
as `prepare_pt2e` folds it), and each observer of the target's PTQ scheme (histogram ranges for activations,
per-channel min/max for weights) is wrapped in a fake quantizer (`fake_quant_config`), calibrated in float on
the calibration inputs, then frozen: the weights learn the very grid the converted program uses, and with no
training the converted program is the post-training one. PT2E's own QAT path was measured on
EfficientNet-Lite's photo crops and not taken: with its moving-average min/max observers the network had
75 % top-1 agreement on all crops after a training epoch, where histogram PTQ has 90 %; its conv-BatchNorm
rewrite needs a train-mode capture (which bakes the network's random drop connect into the graph: 77 % on
validation crops untrained), matches ReLU but not ReLU6, and puts its pattern's eps (1e-5) in the place of
the layer's (1e-3 in these TF-ported BatchNorms) both while training and when folding at convert, so the
trained graph and the converted program computed different functions (79 % untrained).
The graph stays in eval mode while it trains. The epoch whose fake-quantized model scores best on the
validation inputs is converted (the untrained start counts as epoch -1): by the target's accuracy contract
first, then by the distillation loss against the fp32 outputs there. The contract alone ties whenever it
is already met (EfficientNet-Lite's confident crops agree 100 % from the start), and the untrained start
then stayed: 89.7 % agreement on all crops, where the epoch the distillation loss picks reaches 92.0 %.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgebundle.core import progress
from edgebundle.core.data import Split, iter_feeds
from edgebundle.core.distillation import soft_loss
from edgebundle.core.recipe import InputSpec


class QatOptions(BaseModel):
    """Quantization-aware distillation (edgebundle.calibration.qat): the static int8 program's weights
    fine-tuned under its own fake quantization to reproduce the fp32 student's outputs."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # no NaN/inf (recipe rule)

    enabled: Literal["auto", "on", "off"] = Field("auto", description=(
        "auto: when post-training int8 misses the budget on validation inputs; on: instead of post-training "
        "int8; off: never"))
    epochs: int = Field(3, ge=1, le=1000)
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate (small: the weights only adapt to the grid)")
    batch_size: int = Field(16, ge=2, le=4096)
    temperature: float = Field(2.0, gt=0, description="softens logits for the KL loss of class outputs")
    samples: int = Field(512, ge=2, le=10_000_000, description="at most this many training inputs")
    val_samples: int = Field(128, ge=1, le=10_000_000, description="validation inputs that pick the best epoch")
    patience: int | None = Field(None, ge=1, le=1000, description=(
        "stop after this many epochs without a better validation score (the best epoch is kept); unset: every epoch"))

    @field_validator("enabled", mode="before")
    @classmethod
    def _yaml_bool(cls, v: Any) -> Any:
        """YAML reads a bare on/off as true/false."""
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


@dataclass
class QatResult:
    model: Any  # the converted (int8 reference) GraphModule, dynamic batch
    best_epoch: int
    history: list[float] = field(default_factory=list)  # validation scores: the start, then each epoch
    distill_loss: list[float] = field(default_factory=list)  # validation distillation loss, likewise
    seconds: float = 0.0
    epochs_run: int = 0  # fewer than asked where patience stopped it


def _tensors(split: Split, names: list[str], rows: np.ndarray):
    import torch

    part = split.take(rows)
    return [torch.from_numpy(np.ascontiguousarray(part.inputs[n])) for n in names]


def _outputs(model, split: Split, specs: list[InputSpec], batch_size: int, output: int = 0):
    import torch

    outs = []
    with torch.no_grad():
        for feeds in iter_feeds(split, specs, batch_size):
            y = model(*(torch.from_numpy(np.ascontiguousarray(feeds[s.name])) for s in specs))
            outs.append((y[output] if isinstance(y, (tuple, list)) else y).float())
    return torch.cat(outs)


def _epoch(model, opt, train: Split, names: list[str], order: np.ndarray, batch_size: int, loss_of) -> None:
    """One pass over `train` in `order`, a step per batch on `loss_of(outputs, row numbers)`."""
    for i in range(0, len(order), batch_size):
        rows = order[i:i + batch_size]
        value = loss_of(model(*_tensors(train, names, rows)), rows)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()


def fake_quant_config(config):
    """A PT2E QuantizationConfig for QAT made from a post-training one: each (static) observer wrapped in a
    FakeQuantize, so training sees the quantization grid the PTQ observers choose."""
    from torchao.quantization.pt2e import FakeQuantize

    def wrap(spec):
        if spec is None or getattr(spec, "is_dynamic", False) or not hasattr(spec, "observer_or_fake_quant_ctr"):
            return spec
        return dataclasses.replace(spec, observer_or_fake_quant_ctr=FakeQuantize.with_args(
            observer=spec.observer_or_fake_quant_ctr))

    return dataclasses.replace(config, input_activation=wrap(config.input_activation),
                               output_activation=wrap(config.output_activation), weight=wrap(config.weight),
                               is_qat=True)


def capture(model, split: Split, specs: list[InputSpec]):
    """`torch.export` of the fp32 model with a dynamic batch axis (example: the split's first two inputs)."""
    import torch

    names = [s.name for s in specs]
    example = tuple(_tensors(split, names, np.arange(min(2, len(split)))))
    batch = torch.export.Dim("batch", min=1, max=4096)
    return torch.export.export(model, example, dynamic_shapes=tuple({0: batch} for _ in names))


def qat_pt2e(model, quantizer, train: Split, calibration: Split, validation: Split, specs: list[InputSpec], *,
             val_reference: np.ndarray, score: Callable[[np.ndarray], float], output: int = 0, loss: str,
             epochs: int, lr: float, batch_size: int, temperature: float, seed: int,
             patience: int | None = None, fold_quantize: bool = True) -> QatResult:
    """Fine-tune `model` (eval mode, fp32) under `quantizer`'s fake quantization to match its own fp32
    outputs on `train` (output number `output` of several). On `validation`, whose fp32 outputs are
    `val_reference`, `score(outputs)` rates the fake-quantized model (higher is better) and the distillation
    loss breaks ties. With `patience`, stops after that many epochs without a better (score, loss). Returns the
    best epoch's converted model (`fold_quantize` as convert_pt2e takes it: litert-torch's converter needs
    the weights' quantize ops kept)."""
    import torch
    from torchao.quantization.pt2e import (allow_exported_model_train_eval, disable_fake_quant, disable_observer,
                                           enable_fake_quant, move_exported_model_to_eval)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
    from torchao.quantization.pt2e.utils import _fuse_conv_bn_  # what prepare_pt2e does first

    t0 = time.perf_counter()
    names = [s.name for s in specs]
    torch.manual_seed(seed)
    model = copy.deepcopy(model).eval()
    reference = _outputs(model, train, specs, 64, output)
    captured = capture(model, train, specs).module()
    _fuse_conv_bn_(captured)  # see the module's note: BatchNorm frozen, folded as post-training int8 folds it
    prepared = prepare_qat_pt2e(captured, quantizer)
    move_exported_model_to_eval(prepared)
    allow_exported_model_train_eval(prepared)
    prepared.apply(disable_fake_quant)  # calibrate in float, as post-training quantization does
    _outputs(prepared, calibration, specs, batch_size)
    prepared.apply(enable_fake_quant)
    prepared.apply(disable_observer)  # the grid stays the calibrated one
    params = [p for p in prepared.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = np.random.default_rng(seed)

    val_ref = torch.from_numpy(np.asarray(val_reference, dtype=np.float32))

    def rate() -> tuple[float, float]:
        out = _outputs(prepared, validation, specs, batch_size, output)
        return float(score(out.numpy())), float(soft_loss(loss, out, val_ref, temperature))

    s, lo = rate()
    history, losses = [s], [lo]
    best: tuple[tuple[float, float], int, dict] = ((s, -lo), -1, copy.deepcopy(prepared.state_dict()))
    for epoch in range(epochs):
        _epoch(prepared, opt, train, names, gen.permutation(len(train)), batch_size,
               lambda out, rows: soft_loss(loss, out[output] if isinstance(out, (tuple, list)) else out,
                                           reference[torch.from_numpy(rows)], temperature))
        s, lo = rate()
        history.append(s)
        losses.append(lo)
        if (s, -lo) > best[0]:
            best = ((s, -lo), epoch, copy.deepcopy(prepared.state_dict()))
        progress.report("epoch", epoch=epoch + 1, epochs=epochs, metric="qat val score", value=s, best=best[0][0])
        if patience is not None and epoch - best[1] >= patience:
            break
    prepared.load_state_dict(best[2])
    return QatResult(convert_pt2e(prepared, fold_quantize=fold_quantize), best[1], history, losses,
                     time.perf_counter() - t0, len(history) - 1)

"""Structured channel pruning with Torch-Pruning: channels are removed, tensor shapes really shrink.

Torch-Pruning traces the model's dependency graph, so coupled layers (a conv, its BatchNorm, the next
layer's input channels, residual additions) are pruned together. Attention layers it is told about lose
whole heads (the same heads from q, k and v); the module's head count is updated afterwards so its
reshapes still hold.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from edgebundle.core import progress
from edgebundle.core.errors import RecipeError, StageError
from edgebundle.core.data import Split
from edgebundle.core.modelio import image_inputs, macs, scaled_size, set_input_size
from edgebundle.stages.depth import drop_blocks, output_cost, ridge_solve
from edgebundle.stages.training import batches as training_batches, in_order
from edgebundle.core.recipe import PruneStage


@dataclass(frozen=True)
class PruneReport:
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    ignored: list[str]
    layers: dict[str, list[int]]  # module name -> [before, after] output channels/features
    round_to: int | None
    heads: dict[str, list[int]]  # attention module name -> [before, after] heads
    blocks: dict[str, list[int]] | None = None  # depth pruning: block list name -> the original indices kept
    recentred: int = 0  # BatchNorm layers whose statistics follow their pruned inputs (`recenter`)
    input_size: tuple[int, int] | None = None  # input_scale: the (height, width) the network sees

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before


def count(model: nn.Module, example: tuple[torch.Tensor, ...]) -> tuple[int, int]:
    """(MACs, params) at the example inputs' shape (MACs: core.modelio.macs), counted in eval mode (a
    training-mode forward would move BatchNorm statistics); the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        return macs(model, example), int(sum(p.numel() for p in model.parameters()))
    finally:
        model.train(was_training)


def failing_layer(model: nn.Module, example: tuple[torch.Tensor, ...]) -> str | None:
    """None when the model runs on `example`; else which layer raised and what: forward hooks note the
    innermost module whose forward began and did not return."""
    started: list[str] = []
    handles = []
    for name, mod in model.named_modules():
        if name:
            handles.append(mod.register_forward_pre_hook(lambda _m, _i, n=name: started.append(n)))
            handles.append(mod.register_forward_hook(lambda _m, _i, _o, n=name: started.remove(n)
                                                     if n in started else None))
    try:
        with torch.no_grad():
            model(*example)
        return None
    except Exception as e:  # whatever a layer with mismatched shapes raises
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = f"layer '{started[-1]}' ({type(dict(model.named_modules())[started[-1]]).__name__})" if started \
            else "the model's own forward"
        return f"{where} raised {type(e).__name__}: {first}"
    finally:
        for h in handles:
            h.remove()


def _importance(name: str, stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] | None = None
                ) -> tp.importance.Importance:
    if name == "activation":
        return ActivationImportance(stats or {})
    if name == "magnitude":
        return tp.importance.MagnitudeImportance(p=2)
    if name == "taylor":
        return tp.importance.TaylorImportance()
    if name == "lamp":
        return tp.importance.LAMPImportance(p=2)
    return tp.importance.FPGMImportance(p=2)


def _reads_channels(layer: nn.Module, prune_fn) -> bool:
    """Whether a dependency prunes the input channels of a layer that mixes them (a Linear, or a conv that is
    not grouped): the layers whose weights on a channel say what it contributes."""
    if prune_fn == tp.prune_linear_in_channels:  # bound methods: equal, not identical
        return isinstance(layer, nn.Linear)
    return (prune_fn == tp.prune_conv_in_channels and isinstance(layer, nn.modules.conv._ConvNd)
            and layer.groups == 1 and not layer.transposed)


def _readers(group) -> int:
    """How many layers that mix channels (Linears, ungrouped convs) read the group's channels."""
    return sum(1 for dep, _ in group if _reads_channels(dep.layer, dep.pruning_fn))


def _channel_weights(layer: nn.Module) -> torch.Tensor:
    """[input channels, outputs x kernel] weights of a Linear or an ungrouped conv."""
    return layer.weight.data.transpose(0, 1).flatten(1)


class ActivationImportance(tp.importance.GroupMagnitudeImportance):
    """A channel's contribution to the layers that read it: the norm of their weights on it times its standard
    deviation on training inputs (`stats`: layer -> per-input-channel mean and std). Data-aware and label-free;
    with compensation (the mean stays, `compensate`) the spread is what removing the channel loses. Groups
    that no measured layer reads fall back to weight magnitude."""

    def __init__(self, stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__(p=2, group_reduction="mean", normalizer="mean")
        self.stats = stats

    @torch.no_grad()
    def __call__(self, group):
        imps, roots = [], []
        for i, (dep, idxs) in enumerate(group):
            layer = dep.layer
            if layer not in self.stats or not _reads_channels(layer, dep.pruning_fn):
                continue
            w = _channel_weights(layer)[idxs]
            imps.append(w.norm(dim=1) * self.stats[layer][1][idxs])
            roots.append(group[i].root_idxs)
        if not imps:
            return super().__call__(group)
        return self._normalize(self._reduce(imps, roots), self.normalizer)


def _gone(n: int, idxs) -> torch.Tensor:
    """[n] mask of the channels Torch-Pruning removes (`idxs`: their current positions)."""
    gone = torch.zeros(n, dtype=torch.bool)
    gone[torch.as_tensor(idxs, dtype=torch.long)] = True
    return gone


def _bias(layer: nn.Module) -> torch.Tensor:
    """The layer's bias, made (zeros) where it was built without one."""
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype))
    return layer.bias.data


def _pointwise(layer: nn.Module) -> bool:
    """A layer that mixes channels the same way at every position: a Linear, or an ungrouped 1x1 conv."""
    if isinstance(layer, nn.Linear):
        return True
    return (isinstance(layer, nn.modules.conv._ConvNd) and layer.groups == 1 and not layer.transposed
            and all(k == 1 for k in layer.kernel_size))


# training rows (at least) that a least-squares refit measures its Gram matrices on: all-MiniLM-L6-v2, a
# quarter of the FFN channels refitted from 256 sentences: cosine mean 0.967 / min 0.746 on unseen sentences;
# from 1200: 0.978 / 0.842
STATS_ROWS = 1024
# the widest input a least-squares refit takes (its Gram matrix, in float64, is that squared)
MAX_GRAM_CHANNELS = 4096


def input_stats(model: nn.Module, train: Split, names: list[str], batches: int, batch_size: int,
                grams: dict[nn.Module, torch.Tensor] | None = None
                ) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """Per-input-channel mean and standard deviation of every Linear and conv over the first `batches` training
    batches (convs: over batch and space; Linears: over every leading dimension). With `grams`, also fills it
    with each Linear's and 1x1 conv's mean outer product of its input with a constant 1 appended: E[x x^T]
    over every position, (channels + 1) squared."""
    sums: dict[nn.Module, list] = {}

    def hook(m, args):
        x = args[0].detach().double()
        x = x.transpose(0, 1).flatten(1) if isinstance(m, nn.modules.conv._ConvNd) else x.reshape(-1, x.shape[-1]).T
        s = sums.setdefault(m, [0.0, 0.0, 0, 0.0])
        s[0], s[1], s[2] = s[0] + x.sum(1), s[1] + (x * x).sum(1), s[2] + x.shape[1]
        if grams is not None and _pointwise(m) and x.shape[0] <= MAX_GRAM_CHANNELS:
            x1 = torch.cat([x, torch.ones(1, x.shape[1], dtype=x.dtype)])
            s[3] = s[3] + x1 @ x1.T

    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    handles = [m.register_forward_pre_hook(hook) for m in layers]
    order = [idx for idx in in_order(len(train), batch_size)[:batches] if len(idx) >= 1]
    try:
        with torch.no_grad():
            for xs in training_batches(train, names, order):
                model(*xs)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for m, (a, b, n, g) in sums.items():
        mean = a / n
        out[m] = (mean.float(), (b / n - mean * mean).clamp_min(0).sqrt().float())
        if grams is not None and torch.is_tensor(g):
            grams[m] = g / n
    return out


class Compensation:
    """What removed channels gave the layers that read them, given back before Torch-Pruning removes them.
    `mean`: each reader's bias gets a removed channel's mean contribution (its weights on the channel, summed
    over the kernel, times the channel's mean on training inputs), so the reader's average output stays.
    `least_squares`: a reader that mixes channels per position (a Linear, a 1x1 conv) is refitted: its weights
    on the kept channels and its bias become the least-squares fit of its output before the removal, on the
    training inputs (from the Gram matrix of its inputs; the regression AIMET's channel pruning runs per conv);
    the kept channels take over what the removed ones carried where they correlate. Other readers get the
    mean. Readers are tracked by original channel, so a layer pruned by several groups stays consistent."""

    # of the mean diagonal, added to the kept channels' Gram matrix. all-MiniLM-L6-v2 hardly minds (a quarter of
    # the FFN refitted from 1024 sentences: cosine mean 0.9771 at 1e-8, 0.9770 at 1e-3); EfficientNet-Lite1's
    # 1x1 convs do: 20 % of the unshared channels kept 0 of 56 confident unseen crops at 1e-8, 50 at 1e-3
    RIDGE = 1e-3

    def __init__(self, stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]],
                 grams: dict[nn.Module, torch.Tensor]) -> None:
        self.stats, self.grams = stats, grams
        self.kept: dict[nn.Module, torch.Tensor] = {}  # reader -> the original input channels it still reads

    @torch.no_grad()
    def apply(self, group) -> None:
        """Before `group.prune()`."""
        for dep, idxs in group:
            layer = dep.layer
            if layer not in self.stats or not _reads_channels(layer, dep.pruning_fn) or not len(idxs):
                continue
            kept = self.kept.get(layer, torch.arange(_channel_weights(layer).shape[0]))
            gone = _gone(len(kept), idxs)
            if layer in self.grams:
                self._refit(layer, kept, gone)
            else:
                self._mean(layer, kept, gone)
            self.kept[layer] = kept[~gone]

    def _mean(self, layer: nn.Module, kept: torch.Tensor, gone: torch.Tensor) -> None:
        outputs = layer.weight.shape[0]
        w = _channel_weights(layer)[gone].reshape(int(gone.sum()), outputs, -1).sum(2)  # [removed, outputs]
        _bias(layer).add_((w * self.stats[layer][0][kept[gone]].to(w.dtype)[:, None]).sum(0))

    def _refit(self, layer: nn.Module, kept: torch.Tensor, gone: torch.Tensor) -> None:
        g = self.grams[layer]
        rows = torch.cat([kept, torch.tensor([g.shape[0] - 1])])  # the channels it reads now, and the constant
        stay = torch.cat([~gone, torch.tensor([True])])
        g = g[rows][:, rows]
        outputs, bias = layer.weight.shape[0], _bias(layer)
        w = torch.cat([layer.weight.data.reshape(outputs, -1).T, bias[None]]).double()  # [inputs + 1, outputs]
        gkk = g[stay][:, stay]
        fit = torch.zeros_like(w)  # the bias is not pulled to zero: the output's mean on these inputs stays exact
        fit[stay] = ridge_solve(gkk, g[stay] @ w, self.RIDGE)
        layer.weight.data.copy_(fit[:-1].T.reshape(layer.weight.shape))
        bias.copy_(fit[-1])


# rows of training inputs one re-centring pass sees, as one batch (its activations are all in memory at once)
RECENTER_ROWS = 64


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats and m.running_mean is not None]


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (dimension 1) mean and variance over every other dimension."""
    v, mu = torch.var_mean(x.detach().float(), dim=[d for d in range(x.dim()) if d != 1], correction=0)
    return mu, v


class Recentring:
    """BatchNorm statistics that follow pruning. Before: each BatchNorm's input moments on training inputs and
    its running statistics. While Torch-Pruning removes channels: which of the original channels each keeps.
    After (`apply`): one forward pass in which each BatchNorm, in order, takes statistics that standardize its
    moved input as the original ones standardized the original input (same output mean and variance on these
    inputs; upstream layers already corrected). Pretrained statistics stay where pruning did not move them;
    re-estimating them from a few training inputs instead loses what the original data taught them."""

    def __init__(self, model: nn.Module, xs: list[torch.Tensor]) -> None:
        self.xs, self.layers = xs, _batchnorms(model)
        self.before: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self.running = {m: (m.running_mean.clone(), m.running_var.clone()) for m in self.layers}
        self.kept = {m: torch.arange(m.num_features) for m in self.layers}
        self._forward(model, lambda m, args: self.before.__setitem__(m, _moments(args[0])))

    def removed(self, group) -> None:
        """Before `group.prune()`: its BatchNorms lose these channels."""
        for dep, idxs in group:
            m = dep.target.module
            if m in self.kept and len(idxs):
                self.kept[m] = self.kept[m][~_gone(len(self.kept[m]), idxs)]

    def apply(self, model: nn.Module) -> int:
        def reset(m, args):
            mu, v = _moments(args[0])
            k = self.kept[m]
            (mu0, v0), (rm0, rv0) = self.before[m], self.running[m]
            # the input standardized as the original's was: (x - mean) / scale keeps its mean and variance
            scale = ((v + m.eps) / (v0[k] + m.eps)).clamp(0.25, 4.0).sqrt()
            m.running_var.copy_((rv0[k] + m.eps) * scale ** 2 - m.eps)
            m.running_mean.copy_(mu - (mu0[k] - rm0[k]) * scale)

        self._forward(model, reset)
        return len(self.layers)

    def _forward(self, model: nn.Module, hook) -> None:
        handles = [m.register_forward_pre_hook(hook) for m in self.layers]
        try:
            model.eval()
            with torch.no_grad():
                model(*self.xs)
        finally:
            for h in handles:
                h.remove()


def _recentring(model: nn.Module, cfg: PruneStage, train: Split | None, names: list[str]) -> Recentring | None:
    if not cfg.recenter or train is None or not len(train) or not _batchnorms(model):
        return None
    return Recentring(model, next(iter(training_batches(train, names, [np.arange(min(len(train), RECENTER_ROWS))]))))


def _widths(model: nn.Module) -> dict[str, int]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            out[name] = m.out_features
    return out


def output_layers(model: nn.Module, example: tuple[torch.Tensor, ...]) -> list[str]:
    """Layers whose out-channels are the model's output or coupled to it: never pruned, so the output keeps
    its width. Found on Torch-Pruning's dependency graph: for a classifier, its head; for an encoder whose
    output is the residual stream (sentence embeddings: pooled last hidden state), every residual writer
    (each block's attention output and MLP down projection), so the hidden width stays and heads and MLP
    channels are what is pruned. Plus, as before, the last Linear/Conv when its width is the output's
    (it may sit on a branch the trace does not reach, such as an unused pooler)."""
    names = {m: n for n, m in model.named_modules()}
    found: set[str] = set()
    try:
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example[0] if len(example) == 1
                                                   else example)
        for m in dg.module2node:
            if not isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) or names.get(m) in found:
                continue
            group = dg.get_pruning_group(m, dg.get_pruner_of_module(m).prune_out_channels, [0])
            if any(dep.target.type == tp.ops.OPTYPE.OUTPUT for dep, _ in group):
                found.update(names[d.target.module] for d, _ in group
                             if isinstance(d.target.module, (nn.Linear, nn.modules.conv._ConvNd))
                             and d.target.module in names and dg.is_out_channel_pruning_fn(d.handler))
    except (RuntimeError, ValueError, KeyError, IndexError, AttributeError):
        pass  # a graph Torch-Pruning cannot trace fails in the pruner itself, with its own message
    with torch.no_grad():
        out = model(*example)
    n_out = (out[0] if isinstance(out, (tuple, list)) else out).shape[-1]
    last = None
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            last = (name, m)
    if last is not None:
        name, m = last
        if (m.out_features if isinstance(m, nn.Linear) else m.out_channels) == n_out:
            found.add(name)
    return sorted(found)


# channel multiples int8 kernels work in: EfficientNet-Lite1 pruned by 10 % (FPGM) ran ORT int8 at 0.89x the
# unpruned model rounded to 8, and at 3.12 vs 3.74 ms rounded to 16 (AVX-512 VNNI host)
SIMD_ROUNDS = (16, 8)


def resolve_round_to(cfg: PruneStage, widths: dict[str, int], ignored: list[str]) -> int | None:
    """`round_to: auto` is 16 when every prunable layer keeps at least 16 channels after pruning, else 8 when
    every one keeps at least 8 (so rounding down never empties a layer), else no rounding."""
    if cfg.round_to != "auto":
        return cfg.round_to
    kept = [w * (1 - cfg.ratio) for n, w in widths.items() if n not in ignored]
    return next((r for r in SIMD_ROUNDS if kept and min(kept) >= r), None)


def _unshared_round_to(pruner, ratio: float) -> int | None:
    """`round_to: auto` with `shared: false`: 16 when a layer whose channels only one layer reads (the ones
    pruned) keeps at least 16 of them, else 8 when one keeps 8; a layer that would keep fewer stays whole
    (EfficientNet-Lite1's first 16-channel block output, beside hidden layers of 96 to 1152 channels)."""
    widths = [pruner.DG.get_out_channels(group[0].dep.target.module)
              for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                                    root_module_types=pruner.root_module_types)
              if _readers(group) <= 1]
    return next((r for r in SIMD_ROUNDS if any(w * (1 - ratio) >= r for w in widths)), None)


def _empties(pruner, group) -> bool:
    """Rounding would remove every channel of the group's layer."""
    dep, idxs = group[0]
    return len(idxs) >= pruner.DG.get_out_channels(dep.target.module)


@dataclass(frozen=True)
class Attention:
    """One multi-head attention module in a convention edgebundle knows how to keep consistent."""

    name: str
    module: nn.Module
    projections: tuple[nn.Linear, ...]  # the fused qkv, or q, k, v
    heads_attr: str

    @property
    def heads(self) -> int:
        return int(getattr(self.module, self.heads_attr))

    def set_heads(self, heads: int) -> None:
        m = self.module
        setattr(m, self.heads_attr, heads)
        if self.heads_attr == "num_heads":  # fused qkv: out = 3 * heads * head_dim
            m.head_dim = self.projections[0].out_features // (3 * heads)
        elif self.heads_attr == "n_heads":  # DistilBERT: q_lin/k_lin/v_lin, reshaped by attention_head_size
            m.dim = self.projections[0].out_features
        else:  # separate query/key/value (Hugging Face BERT-style self-attention)
            m.attention_head_size = self.projections[0].out_features // heads
            m.all_head_size = self.projections[0].out_features


def attention_modules(model: nn.Module) -> list[Attention]:
    """Attention modules in the common layouts: a fused `qkv` Linear with `num_heads` (this project's
    encoder, timm ViTs), `query`/`key`/`value` Linears with `num_attention_heads` (Hugging Face BERT,
    RoBERTa, MiniLM) or `q_lin`/`k_lin`/`v_lin` with `n_heads` (DistilBERT). MPNet and T5 share one
    relative-position bias over every layer's heads, so their heads are not pruned (one line says so)."""
    found = []
    for name, m in model.named_modules():
        qkv = getattr(m, "qkv", None)
        if isinstance(qkv, nn.Linear) and isinstance(getattr(m, "num_heads", None), int):
            found.append(Attention(name, m, (qkv,), "num_heads"))
            continue
        sep = [getattr(m, a, None) for a in ("query", "key", "value")]
        if all(isinstance(x, nn.Linear) for x in sep) and isinstance(getattr(m, "num_attention_heads", None), int):
            found.append(Attention(name, m, tuple(sep), "num_attention_heads"))
            continue
        sep = [getattr(m, a, None) for a in ("q_lin", "k_lin", "v_lin")]
        if all(isinstance(x, nn.Linear) for x in sep) and isinstance(getattr(m, "n_heads", None), int):
            found.append(Attention(name, m, tuple(sep), "n_heads"))
    return found


def _unwrapped_as_notes(fn):
    """Torch-Pruning's warning about parameters outside any layer it knows (a bare `nn.Parameter` scale), which it
    cuts along their last non-singleton dimension, becomes one progress note; other warnings pass on."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fn(*args, **kwargs)
        said = set()
        for w in caught:
            text = str(w.message)
            if "Unwrapped parameters detected" not in text:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            elif text not in said:
                said.add(text)
                found = text.split("detected:", 1)[-1].split("]", 1)[0].strip(" [")
                progress.report("note", text=f"prune: parameters outside any layer ({found}) were cut along their "
                                             "last dimension longer than 1, as Torch-Pruning does by default")
        return out
    return wrapped


@_unwrapped_as_notes
def prune(model: nn.Module, cfg: PruneStage, example: tuple[torch.Tensor, ...], *,
          train: Split | None, names: list[str], batch_size: int = 64, metric: str | None = None) -> PruneReport:
    """Prune `model` in place (callers pass a copy). Taylor importance uses gradients on training data;
    `metric` (the recipe's, resolved) says how dropped blocks' cost is measured (`depth.output_cost`)."""
    model.eval()
    modules = dict(model.named_modules())
    ignored_names = sorted(set(cfg.ignore) | set(output_layers(model, example)))
    attention = attention_modules(model)
    _check_prunable(cfg, modules, attention, train, example)
    macs0, params0 = count(model, example)
    input_size = scaled_size(example, cfg.input_scale) if cfg.input_scale < 1 else None
    if input_size:  # first: what follows measures and ranks on what the network will see
        set_input_size(model, input_size)
    widths0 = _widths(model)
    heads0 = {a.name: a.heads for a in attention}
    blocks = (drop_blocks(model, cfg, example, train, names, batch_size, output_cost(metric))
              if cfg.depth_ratio > 0 else None)
    if blocks:  # the dropped blocks' layers and heads are gone: look the rest up again
        modules = dict(model.named_modules())
        attention = attention_modules(model)
        ignored_names = [n for n in ignored_names if n in modules]
    round_to = resolve_round_to(cfg, widths0, ignored_names)
    recentring = _recentring(model, cfg, train, names) if cfg.ratio > 0 else None
    if cfg.ratio > 0 or cfg.head_ratio > 0:
        try:
            round_to = _run_pruner(model, cfg, example, [modules[n] for n in ignored_names], attention, round_to,
                                   train, names, batch_size, recentring)
        except (RuntimeError, ValueError, KeyError, IndexError) as e:
            raise StageError(f"Torch-Pruning could not prune this model: {type(e).__name__}: {e}") from e
    recentred = recentring.apply(model) if recentring else 0
    model.eval()
    failed = failing_layer(model, example)
    if failed:
        raise StageError(f"the model pruned by Torch-Pruning no longer runs: {failed}; "
                         "add that layer (or its block) to stages.prune.ignore, or prune less")
    macs1, params1 = count(model, example)
    widths1 = _widths(model)
    return PruneReport(
        params_before=params0, params_after=params1, macs_before=macs0, macs_after=macs1,
        ignored=ignored_names,
        layers={n: [widths0[n], widths1.get(n, 0)] for n in widths0},
        heads={a.name: [heads0[a.name], a.heads] for a in attention},
        round_to=round_to,
        blocks=blocks,
        recentred=recentred,
        input_size=input_size,
    )


def _check_prunable(cfg: PruneStage, modules: dict, attention: list, train: Split | None,
                    example: tuple[torch.Tensor, ...]) -> None:
    """The recipe's prune settings against the model (a RecipeError naming what does not fit)."""
    if cfg.input_scale < 1 and not image_inputs(example):
        raise RecipeError("stages.prune.input_scale: the model has no image input (floating point, N, C, H, W)")
    unknown = [n for n in cfg.ignore if n not in modules]
    if unknown:
        sample = ", ".join(n for n in list(modules)[1:12] if n)
        raise RecipeError(f"stages.prune.ignore: no module named {', '.join(unknown)} (modules include: {sample})")
    if cfg.importance == "taylor" and (train is None or train.labels is None):
        raise RecipeError("stages.prune.importance 'taylor' needs labelled training data")
    if cfg.importance == "activation" and (train is None or len(train) == 0):
        raise RecipeError("stages.prune.importance 'activation' measures channels on training inputs and this "
                          "recipe has none")
    if cfg.head_ratio > 0 and not attention:
        raise RecipeError("stages.prune.head_ratio: the model has no attention module edgebundle recognises "
                          "(a fused `qkv` Linear with `num_heads`, query/key/value Linears with "
                          "`num_attention_heads`, or DistilBERT's q_lin/k_lin/v_lin; MPNet and T5 heads share "
                          "one relative-position bias across layers and are not pruned)")


def _run_pruner(model: nn.Module, cfg: PruneStage, example: tuple[torch.Tensor, ...], ignored: list[nn.Module],
                attention: list, round_to: int | None, train: Split | None, names: list[str], batch_size: int,
                recentring: Recentring | None) -> int | None:
    """Torch-Pruning's BasePruner over `cfg.iterative_steps` steps; attention modules take their new head counts.
    Returns the channel multiple used (with `shared: false`, auto looks only at the layers it prunes)."""
    num_heads = {p: a.heads for a in attention for p in a.projections}
    # Torch-Pruning removes heads only inside a scope that prunes something, so with no channel pruning the
    # attention projections get a scope of their own with a token ratio (their widths are never cut:
    # prune_head_dims is off, heads go whole).
    ratio_dict = ({p: max(cfg.ratio, 1e-6) for p in num_heads} if cfg.head_ratio > 0 and cfg.ratio == 0
                  else None)
    data = train is not None and len(train) > 0
    refit = cfg.compensate == "least_squares"
    grams: dict[nn.Module, torch.Tensor] = {}
    batches = max(cfg.taylor_batches, -(-STATS_ROWS // batch_size)) if refit else cfg.taylor_batches

    def measure() -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
        grams.clear()
        return input_stats(model, train, names, batches, batch_size, grams if refit else None)

    stats = measure() if data and (cfg.compensate != "none" or cfg.importance == "activation") else {}
    pruner = tp.pruner.BasePruner(
        model,
        example[0] if len(example) == 1 else example,
        importance=_importance(cfg.importance, stats),
        pruning_ratio=cfg.ratio,
        iterative_steps=cfg.iterative_steps,
        global_pruning=cfg.global_pruning,
        ignored_layers=ignored,
        round_to=round_to,
        num_heads=num_heads,
        prune_num_heads=cfg.head_ratio > 0,
        prune_head_dims=False,
        head_pruning_ratio=cfg.head_ratio,
        pruning_ratio_dict=ratio_dict,
    )
    if cfg.round_to == "auto" and not cfg.shared:
        pruner.round_to = round_to = _unshared_round_to(pruner, cfg.ratio)
    for step in range(cfg.iterative_steps):
        if cfg.importance == "taylor":
            _taylor_gradients(model, train, names, cfg.taylor_batches, batch_size)
        if step and stats:  # channels moved: measure the pruned model again (in place: the importance holds it)
            stats.clear()
            stats.update(measure())
        compensation = Compensation(stats, grams) if cfg.compensate != "none" and stats else None
        for group in pruner.step(interactive=True):
            if not cfg.shared and _readers(group) > 1 or _empties(pruner, group):
                continue  # a channel several layers read (a residual stream) stays, and no layer goes empty
            if compensation:
                compensation.apply(group)
            if recentring:
                recentring.removed(group)
            group.prune()
        model.zero_grad(set_to_none=True)
    for a in attention:
        a.set_heads(pruner.num_heads[a.projections[0]])
    return round_to


def _taylor_gradients(model: nn.Module, train: Split, names: list[str], batches: int, batch_size: int) -> None:
    model.zero_grad(set_to_none=True)
    model.train()
    y = torch.from_numpy(train.labels)
    # the first `batches` batches in order, through training's DataLoader: rows of one batch at a time
    order = [idx for idx in in_order(len(train), batch_size)[:batches] if len(idx) >= 2]
    for idx, xs in zip(order, training_batches(train, names, order)):
        F.cross_entropy(model(*xs), y[idx]).backward()
    model.eval()

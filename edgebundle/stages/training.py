"""Teacher training, knowledge distillation and evaluation (PyTorch, CPU or CUDA).

Distillation loss (class outputs): alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(labels),
plus, when `hidden_weight` > 0, that weight times the mean relative MSE between chosen blocks' outputs
(student mapped to the teacher's width by a learned linear layer where pruning narrowed it).
The checkpoint with the best validation accuracy is kept. Under `torchrun` (an initialised process
group) training runs DistributedDataParallel over a DistributedSampler.

Batches come from a torch DataLoader over the split (`batches`): rows are taken batch by batch, so a lazy
split (image files, core.data.LazyRows) is decoded one batch at a time and never held whole in memory.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgebundle.core.errors import DataError, RecipeError
from edgebundle.core import distributed, progress
from edgebundle.core.data import Split
from edgebundle.core.metrics import Contract, MetricSpec, per_sample_cosine
from edgebundle.core.modelio import KEPT_ATTR, block_positions
from edgebundle.core.distillation import loss_for_metric, soft_loss
from edgebundle.stages.augment import augmenter
from edgebundle.stages.padding import Trim, grouped
from edgebundle.core.recipe import DistillStage, InputSpec, TrainStage


@dataclass(frozen=True)
class FitResult:
    best_val_accuracy: float  # the best value of `metric` (named so for the classification case)
    best_epoch: int
    epochs: int  # epochs run (fewer than asked when patience stopped it)
    history: list[float]  # `metric` on the validation split, per epoch
    metric: str = "val_accuracy"  # val_accuracy | val_agreement (with the teacher) | val_cosine | val_neg_rel_mse


class _Batches(torch.utils.data.Dataset):
    """Map-style dataset indexed by a whole batch of row numbers (the sampler yields lists of them): one
    fancy-indexing call per batch, in memory or on lazy rows alike."""

    def __init__(self, split: Split, names: list[str]) -> None:
        self.split, self.names = split, names

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, idx) -> list[torch.Tensor]:
        idx = np.asarray(idx, np.int64)
        return [torch.from_numpy(np.ascontiguousarray(self.split.inputs[n][idx])) for n in self.names]


def batches(split: Split, names: list[str], order: list[np.ndarray]):
    """The split's inputs as tensors, one list per batch of row numbers in `order`, through a DataLoader."""
    return torch.utils.data.DataLoader(_Batches(split, names), sampler=order, batch_size=None)


def in_order(n: int, batch_size: int) -> list[np.ndarray]:
    """Row numbers 0..n-1 in batches of `batch_size`, in order."""
    return [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def predict(model: nn.Module, split: Split, names: list[str], batch_size: int = 256) -> np.ndarray:
    """Logits for every sample of a split (eval mode, no grad); a model with several outputs: the first."""
    device = next(model.parameters()).device
    model.eval()
    outs = []
    with torch.no_grad():
        for xs in batches(split, names, in_order(len(split), batch_size)):
            y = model(*[x.to(device) for x in xs])
            outs.append((y[0] if isinstance(y, (tuple, list)) else y).float().cpu())
    return torch.cat(outs).numpy()


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent (the contract's top1)."""
    return Contract.plain("top1").judge(logits, logits, labels).value


def agreement(outputs: np.ndarray, reference: np.ndarray, min_confidence: float | None = None) -> float:
    """Top-1 agreement with `reference` in percent: over every input (the contract's agreement_all), or, with
    `min_confidence`, over the inputs the reference is that confident on, as the budget judges it (every input
    where there is none)."""
    if min_confidence is None:
        return Contract.plain("agreement").judge(reference, outputs, None).details["agreement_all"]
    v = Contract("agreement", MetricSpec(name="agreement", min_confidence=min_confidence), 0.0).judge(
        reference, outputs, None)
    return v.value if v.samples else v.details["agreement_all"]


def _require_labels(split: Split, what: str) -> np.ndarray:
    if split.labels is None:
        raise DataError(f"{what} needs labels; the data has none")
    return split.labels


def _fit(
    model: nn.Module,
    train: Split,
    val: Split,
    names: list[str],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    seed: int,
    loss_fn: Callable[[torch.Tensor, list[torch.Tensor], torch.Tensor | None, torch.Tensor], torch.Tensor],
    device: torch.device,
    on_epoch: Callable[[int, float], None] | None = None,
    ddp: bool = True,
    score: tuple[str, Callable[[nn.Module], float]] | None = None,
    patience: int | None = None,
    view: Callable[[list[torch.Tensor], torch.Generator], list[torch.Tensor]] | None = None,
    keep_start: bool = False, freeze_bn: bool = False, no_dropout: bool = False,
    trim: Trim | None = None, by_length: bool = False,
) -> FitResult:
    """Train `model` for up to `epochs`, keeping the best checkpoint on validation (`keep_start`: the starting
    weights are one, best_epoch -1); `patience` stops after that many epochs without a better one; `freeze_bn`
    keeps BatchNorm statistics; `trim` cuts each batch's padding (stages.padding), `by_length` draws its batches
    from inputs of similar length. Each epoch is reported (core.progress)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.to(device)
    ys = None if train.labels is None else torch.from_numpy(train.labels).to(device)
    if score is None:  # higher is better; picks the best checkpoint
        val_labels = _require_labels(val, "choosing the best checkpoint")
        score = ("val_accuracy", lambda m: accuracy(predict(m, val, names), val_labels))
    net, sampler, batch_size = _parallel(model, len(train), batch_size, seed, device, ddp)
    per_epoch = len(sampler) if sampler is not None else len(train)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * max(1, (per_epoch + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    best = (score[1](model), -1, copy.deepcopy(model.state_dict())) if keep_start else (-1.0, 0, None)
    history = []
    lengths = trim.lengths(train, names) if trim is not None and by_length else None
    for epoch in range(epochs):
        _train_mode(model, freeze_bn, no_dropout)
        plan = _plan(sampler, epoch, len(train), per_epoch, batch_size, lengths, gen, device)
        _steps(net, train, names, plan, loss_fn, ys, opt, sched, device, _viewer(view, trim, gen))
        acc = score[1](model)
        history.append(acc)
        if on_epoch:
            on_epoch(epoch, acc)
        if acc > best[0]:
            best = (acc, epoch, copy.deepcopy(model.state_dict()))
        progress.report("epoch", epoch=epoch + 1, epochs=epochs, metric=score[0], value=acc, best=best[0])
        if patience is not None and epoch - best[1] >= patience:
            break
    model.load_state_dict(best[2])
    model.eval()
    return FitResult(best_val_accuracy=best[0], best_epoch=best[1], epochs=len(history), history=history,
                     metric=score[0])


def _train_mode(model: nn.Module, freeze_bn: bool, no_dropout: bool = False) -> None:
    """Training mode, with BatchNorm layers left in eval mode (their running statistics kept) where asked;
    `no_dropout`: every other layer in eval mode (no dropout), BatchNorm as `freeze_bn` says."""
    model.train(not no_dropout)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train(not freeze_bn)


def _plan(sampler, epoch: int, n: int, per_epoch: int, batch_size: int, lengths: np.ndarray | None,
          gen: torch.Generator, device: torch.device) -> list[torch.Tensor]:
    """One epoch's batches of row numbers: this rank's shard (DDP) or a permutation of all n rows, cut in order
    or (`lengths`) grouped by length."""
    if sampler is not None:
        sampler.set_epoch(epoch)
        order = torch.tensor(list(iter(sampler)), device=device)
    else:
        order = torch.randperm(n, generator=gen).to(device)
    plan = ([order[i:i + batch_size] for i in range(0, per_epoch, batch_size)] if lengths is None
            else grouped(order[:per_epoch], lengths, batch_size, gen))
    # BatchNorm needs more than one sample per batch (same on every rank: equal shards)
    return [p for p in plan if len(p) >= 2]


def _viewer(view, trim: Trim | None, gen: torch.Generator):
    """What each training batch goes through before the model: the augmentation, then the padding cut."""
    if view is None and trim is None:
        return None
    return lambda b: (trim.cut if trim is not None else list)(view(b, gen) if view is not None else b)


def _steps(net: nn.Module, train: Split, names: list[str], plan: list[torch.Tensor], loss_fn, ys, opt, sched,
           device: torch.device, view=None) -> None:
    """One epoch's optimizer steps, one per batch of row indices in `plan` (each batch first through `view`,
    the augmentation, where there is one)."""
    for idx, xs in zip(plan, batches(train, names, [p.cpu().numpy() for p in plan])):
        batch = [x.to(device) for x in (view(list(xs)) if view is not None else xs)]
        loss = loss_fn(net(*batch), batch, None if ys is None else ys[idx], idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def _parallel(model: nn.Module, n: int, batch_size: int, seed: int, device: torch.device, ddp: bool):
    """(the module to train, its sampler or None, the per-rank batch). Under torchrun (ddp): DistributedDataParallel
    over a DistributedSampler; each rank trains on its shard, gradients are averaged, and the per-rank batch keeps
    the global batch at `batch_size`. Every rank validates the same (synchronised) weights on the whole val
    split, so all pick the same best checkpoint. ddp=False: this process trains alone, even under torchrun."""
    world = distributed.world_size() if ddp else 1
    if world <= 1:
        return model, None, batch_size
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DistributedSampler

    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = DistributedSampler(range(n), num_replicas=world, rank=distributed.rank(), shuffle=True, seed=seed)
    return net, sampler, max(2, -(-batch_size // world))


def train_supervised(model: nn.Module, train: Split, val: Split, names: list[str], cfg: TrainStage | DistillStage,
                     *, seed: int, device: torch.device, on_epoch=None) -> FitResult:
    """Plain cross-entropy training (the teacher, or a student without a teacher)."""
    _require_labels(train, "training")

    def loss_fn(out, _batch, y, _idx):
        return F.cross_entropy(out, y)

    return _fit(model, train, val, names, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                weight_decay=cfg.weight_decay, seed=seed, loss_fn=loss_fn, device=device, on_epoch=on_epoch,
                patience=cfg.patience, trim=Trim.checked([model.to(device)], train, names, device),
                by_length=cfg.group_by_length)


def distill_loss_for(cfg: DistillStage, metric: str | None) -> str:
    """The distillation loss: as asked, or (auto) following the recipe's metric: class metrics (top1,
    agreement) -> KL on softened logits; cosine -> cosine of the outputs; anything else -> relative MSE."""
    return cfg.loss if cfg.loss != "auto" else loss_for_metric(metric)


def dropout_off(cfg: DistillStage, pretrained: bool) -> bool:
    """Whether the student learns without dropout: asked, or (auto) its teacher came with its weights."""
    return cfg.dropout == "off" or (cfg.dropout == "auto" and pretrained)


def distill(student: nn.Module, teacher: nn.Module, train: Split, val: Split, names: list[str],
            cfg: DistillStage, *, seed: int, device: torch.device, on_epoch=None, ddp: bool = True,
            metric: str | None = None, specs: list[InputSpec] | None = None, pretrained: bool = False,
            budget: MetricSpec | None = None) -> FitResult:
    """Knowledge distillation from a frozen teacher; its outputs are computed once up front. `pretrained`: the
    teacher came with its weights (batchnorm auto keeps their statistics then).

    The loss follows `distill_loss_for` (no labels needed except for the CE term of kl); the best checkpoint
    is the one with the best validation score in the same terms: accuracy on labels (kl with labels),
    top-1 agreement with the teacher (kl without), mean cosine to the teacher's outputs, or negative
    relative MSE. With the recipe's `budget` (its metric spec), checkpoints are chosen as that budget judges:
    agreement on the validation inputs the teacher is `min_confidence` sure of (on all inputs, an epoch that
    costs confident ones could be kept for what it gains on near-ties); cosine by the budget's margin, the
    smaller of the mean's and the minimum's (`cosine_margin`: an epoch that raises the mean and lowers the worst
    input is not better where the minimum binds)."""
    teacher = teacher.to(device).eval()
    view = augmenter(specs) if cfg.augment == "auto" and specs is not None else None
    with torch.no_grad():  # with augmentation the teacher answers each view as it comes instead
        soft = None if view is not None else torch.from_numpy(predict(teacher, train, names)).to(device)
        val_ref = torch.from_numpy(predict(teacher, val, names))
    kind = distill_loss_for(cfg, metric)
    t = cfg.temperature
    alpha = cfg.alpha if train.labels is not None else 1.0
    hidden = HiddenMatch(student, teacher, cfg.hidden_layers, train, names, device) if cfg.hidden_weight else None

    def loss_fn(out, batch, y, idx):
        # one teacher forward per batch: hidden matching's hooks capture its layers as it answers the view
        answer = hidden.teacher_output(batch) if hidden is not None else None
        loss = soft_loss(kind, out, _teacher_answer(soft, idx, answer, teacher, batch), t)
        if kind == "kl" and alpha < 1.0 and y is not None:
            loss = alpha * loss + (1 - alpha) * F.cross_entropy(out, y)
        if hidden is not None:
            loss = loss + cfg.hidden_weight * hidden.loss()
        return loss

    name, val_score = _val_scorer(kind, metric, budget, val, val_ref, names, t)
    model = student if hidden is None else _StudentWithMaps(student, hidden.maps)
    try:
        return _fit(model, train, val, names, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                    weight_decay=cfg.weight_decay, seed=seed, loss_fn=loss_fn, device=device, on_epoch=on_epoch,
                    ddp=ddp, score=(name, lambda m: val_score(student)), patience=cfg.patience, view=view,
                    keep_start=True, freeze_bn=cfg.batchnorm == "frozen" or (cfg.batchnorm == "auto" and pretrained),
                    no_dropout=dropout_off(cfg, pretrained), trim=Trim.checked([teacher, student.to(device)], train, names, device),
                    by_length=cfg.group_by_length)
    finally:
        if hidden is not None:
            hidden.close()


def _val_scorer(kind: str, metric: str | None, budget: MetricSpec | None, val: Split, val_ref: torch.Tensor,
                names: list[str], t: float) -> tuple[str, Callable[[nn.Module], float]]:
    """(name, score) of distillation's validation score, higher is better (`distill` says which)."""
    min_confidence = budget.min_confidence if budget is not None and metric == "agreement" else None
    margin = budget is not None and metric == "cosine"

    def val_score(m: nn.Module) -> float:
        out = torch.from_numpy(predict(m, val, names))
        if margin:
            return cosine_margin(out.numpy(), val_ref.numpy(), budget)
        if kind == "cosine":  # mean cosine
            return 1.0 - float(soft_loss(kind, out, val_ref, t))
        if kind == "mse":  # negative relative MSE
            return -float(soft_loss(kind, out, val_ref, t))
        if val.labels is not None:
            return accuracy(out.numpy(), val.labels)
        return agreement(out.numpy(), val_ref.numpy(), min_confidence)

    name = "val_cosine_margin" if margin else {"cosine": "val_cosine", "mse": "val_neg_rel_mse"}.get(
        kind, "val_accuracy" if val.labels is not None else "val_agreement")
    return name, val_score


def cosine_margin(out: np.ndarray, ref: np.ndarray, spec: MetricSpec) -> float:
    """How far a cosine budget is held (>= 0) or missed (< 0): the smaller of (mean - min_mean_cosine) and
    (min - min_cosine) of the per-input cosines."""
    c = per_sample_cosine(out, ref)
    return float(min(c.mean() - spec.min_mean_cosine, c.min() - spec.min_cosine))


def _teacher_answer(soft: torch.Tensor | None, idx: torch.Tensor, answer: torch.Tensor | None, teacher: nn.Module,
                    batch: list[torch.Tensor]) -> torch.Tensor:
    """The teacher's output for a batch: computed up front (`soft`, no augmentation), captured by hidden matching's
    forward (`answer`), or asked now (augmented views without hidden matching)."""
    if soft is not None:
        return soft[idx]
    if answer is not None:
        return answer
    return _first(teacher, batch)


def _first(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    """The model's (first) output on a batch, without gradients."""
    with torch.no_grad():
        y = model(*batch)
    return y[0] if isinstance(y, (tuple, list)) else y


class _StudentWithMaps(nn.Module):
    """Trains the width maps with the student (one optimiser, one DDP module); forward is the student's."""

    def __init__(self, student: nn.Module, maps: nn.ModuleDict) -> None:
        super().__init__()
        self.student, self.maps = student, maps

    def forward(self, *x):
        return self.student(*x)


def default_hidden_layers(model: nn.Module) -> list[str]:
    """Every block of the model's largest nn.ModuleList (encoder layers, residual stages)."""
    lists = [(len(m), name) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        return []
    n, name = max(lists)
    return [f"{name}.{i}" if name else str(i) for i in range(n)]


def _depth_renames(student: nn.Module, teacher: nn.Module) -> dict[str, str | None]:
    """Where depth pruning shortened a list of blocks: the teacher's block name -> the student's module whose
    output stands for it (a bridge for the last block of the run it replaced; None: dropped, nothing does)."""
    out: dict[str, str | None] = {}
    for name, m in student.named_modules():
        kept = getattr(m, KEPT_ATTR, None)
        if isinstance(m, nn.ModuleList) and kept is not None:
            prefix = f"{name}." if name else ""
            n = len(teacher.get_submodule(name))
            pos = block_positions(m, n)
            for j in range(n):
                out[f"{prefix}{j}"] = f"{prefix}{pos[j]}" if j in pos else None
    return out


def _channels_last(h: torch.Tensor) -> torch.Tensor:
    """Feature axis last: [B, C, H, W] feature maps are moved to [B, H, W, C]; sequences already are."""
    return h.movedim(1, -1) if h.dim() == 4 else h


class HiddenMatch:
    """Captures chosen modules' outputs in student and teacher (forward hooks) and scores their distance:
    mean over layers of MSE(map(student), teacher) / mean(teacher^2)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, layers: list[str] | None, train: Split,
                 names: list[str], device: torch.device) -> None:
        self.layers = list(layers) if layers else default_hidden_layers(teacher)
        if not self.layers:
            raise RecipeError("stages.distill.hidden_weight: the model has no nn.ModuleList of blocks; "
                              "name the modules in stages.distill.hidden_layers")
        s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
        renamed = _depth_renames(student, teacher)
        if renamed:  # depth pruning: a teacher block the student dropped has nothing to match
            self.layers = [n for n in self.layers if renamed.get(n, n) is not None]
        missing = [n for n in self.layers if renamed.get(n, n) not in s_mods or n not in t_mods]
        if missing:
            raise RecipeError(f"stages.distill.hidden_layers: no module named {', '.join(missing)}")
        self.teacher = teacher
        self.s_out: dict[str, torch.Tensor] = {}
        self.t_out: dict[str, torch.Tensor] = {}
        self.handles = [s_mods[renamed.get(n, n)].register_forward_hook(self._hook(self.s_out, n)) for n in self.layers]
        self.handles += [t_mods[n].register_forward_hook(self._hook(self.t_out, n)) for n in self.layers]
        with torch.no_grad():  # one sample through both to learn the widths
            probe = [torch.from_numpy(train.inputs[n][:2]).to(device) for n in names]
            student.to(device).eval()(*probe)
            teacher(*probe)
        self.maps = nn.ModuleDict()
        for i, n in enumerate(self.layers):
            ds, dt = self.s_out[n].shape[-1], self.t_out[n].shape[-1]
            if self.s_out[n].shape[:-1] != self.t_out[n].shape[:-1]:
                raise RecipeError(f"stages.distill.hidden_layers: '{n}' has shape {tuple(self.s_out[n].shape)} "
                                  f"in the student and {tuple(self.t_out[n].shape)} in the teacher")
            self.maps[str(i)] = nn.Identity() if ds == dt else nn.Linear(ds, dt, bias=False)
        self.maps.to(device)

    @staticmethod
    def _hook(store: dict, name: str):
        def hook(_module, _inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            store[name] = _channels_last(out)
        return hook

    def teacher_output(self, batch: list[torch.Tensor]) -> torch.Tensor:
        """The teacher's (first) output on `batch`; its hooks keep the chosen layers' outputs for `loss`."""
        return _first(self.teacher, batch)

    def loss(self) -> torch.Tensor:
        """Call after the student's and the teacher's forward (`teacher_output`) on the same batch."""
        terms = [F.mse_loss(self.maps[str(i)](self.s_out[n]), self.t_out[n]) / (self.t_out[n].pow(2).mean() + 1e-8)
                 for i, n in enumerate(self.layers)]
        return torch.stack(terms).mean()

    def distance(self, batch: list[torch.Tensor], student: nn.Module) -> float:
        with torch.no_grad():
            student(*batch)
            self.teacher_output(batch)
            return float(self.loss())

    def close(self) -> None:
        for h in self.handles:
            h.remove()

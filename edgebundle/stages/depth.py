"""Depth pruning: whole blocks of a block list (encoder layers) dropped, DistilBERT-style.

Without compensation (or without training inputs) the kept blocks are spread evenly, first and last kept.
With it, the blocks that go are chosen by measurement and each run of dropped blocks is replaced by a bridge
fitted on training inputs to what the run made of its input: with `compensate: least_squares` a linear map
of the hidden state, the least-squares fit (ReplaceMe, Shopkhoev et al. 2025: a linear transform in place of
pruned transformer blocks); with `mean` the mean shift; or nothing, where that costs less (a residual block
trained with stochastic depth, as EfficientNet's are, is made to be skipped). The choice is greedy: one block
at a time, the one whose removal moves the model's output least on those inputs per MAC it saves; "moves"
as the recipe's metric reads the output: class scores by the KL divergence of their softmax from the
original's (EfficientNet-Lite1, 7 of 14 residual blocks, on the search example's split: agreement on all
validation / test crops 69.6 / 62.3 % chosen by relative MSE of the logits, 72.4 / 72.3 % by KL), anything
else by relative mean squared error. all-MiniLM-L6-v2, two of six layers,
cosine to the original on 443 unseen sentences before any distillation (mean / min): blocks 1 and 4 (the
even spread) dropped 0.743 / 0.364, shifted 0.777 / 0.361, linear 0.896 / 0.439; blocks 0 and 3 (the greedy
choice) dropped 0.654 / 0.274, shifted 0.819 / 0.383, linear 0.932 / 0.466.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator

import numpy as np
import torch
from torch import nn

from edgebundle.core.data import Split
from edgebundle.core.errors import RecipeError
from edgebundle.core.modelio import Bridge, keep_blocks, macs, replace_blocks
from edgebundle.core.recipe import PruneStage
from edgebundle.stages.padding import is_mask
from edgebundle.stages.training import batches as training_batches, in_order

# training inputs the choice of blocks and the bridges' fit see, and the most rows (tokens, pixels) a fit keeps
SAMPLE_INPUTS = 256
COST_INPUTS = 64  # of those, the inputs each candidate's cost is measured on
MAX_ROWS = 32768
RIDGE = 1e-4  # of the mean diagonal of the bridge's Gram matrix
CLASS_METRICS = ("top1", "agreement")  # metrics that read the output as class scores: blocks chosen by KL


def output_cost(metric: str | None) -> str:
    """How a dropped block's cost is measured on the model's output under `metric`: kl or mse."""
    return "kl" if metric in CLASS_METRICS else "mse"


def _cost(outs: list[torch.Tensor], refs: list[torch.Tensor], cost: str) -> float:
    """The outputs' distance from the original's: mean KL divergence of their softmax (cost kl), or the mean
    squared distance relative to the original's mean square (mse)."""
    if cost == "kl":
        o, r = torch.cat(outs).flatten(1).double(), torch.cat(refs).flatten(1).double()
        p = r.softmax(1)
        return float((p * (r.log_softmax(1) - o.log_softmax(1))).sum(1).mean())
    num = sum(float(((o - r) ** 2).sum()) for o, r in zip(outs, refs))
    den = sum(float((r ** 2).sum()) for r in refs)
    return num / max(den, 1e-12)


def ridge_solve(gram: torch.Tensor, rhs: torch.Tensor, share: float) -> torch.Tensor:
    """Solve (gram + ridge) w = rhs: the ridge is `share` of gram's mean diagonal on every row but the last, the
    constant's (the fitted output's mean on the inputs stays exact)."""
    ridge = torch.full((len(gram),), share * float(gram.diagonal()[:-1].mean()), dtype=gram.dtype)
    ridge[-1] = 0
    return torch.linalg.solve(gram + torch.diag(ridge), rhs)


def block_list(model: nn.Module, example: tuple[torch.Tensor, ...]) -> tuple[str, int, tuple[int, ...]] | None:
    """(name, length, droppable) of the model's largest nn.ModuleList when at least two of its blocks keep their
    input's shape (encoder layers; a CNN's residual blocks, between the blocks that change resolution or
    width): those are the blocks that can be dropped whole. Else None."""
    lists = [(len(m), name) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) >= 2]
    if not lists:
        return None
    n, name = max(lists)
    shapes: dict[int, bool] = {}

    def hook(i):
        def fn(_m, args, out):
            x = args[0] if args else None
            y = out[0] if isinstance(out, (tuple, list)) else out
            shapes[i] = isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape
        return fn

    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(model.get_submodule(name))]
    try:
        with torch.no_grad():
            model.eval()(*example)
    except Exception:  # a model that does not run here fails later with its own message
        return None
    finally:
        for h in handles:
            h.remove()
    droppable = tuple(i for i in range(n) if shapes.get(i))
    return (name, n, droppable) if len(droppable) >= 2 else None


def dropped_count(droppable: int, depth_ratio: float) -> int:
    """How many of the droppable blocks go (one always stays)."""
    return min(droppable - 1, int(round(droppable * depth_ratio)))


def kept_blocks(n: int, depth_ratio: float, droppable: tuple[int, ...] | None = None) -> list[int]:
    """Which of n blocks stay when `depth_ratio` of the droppable ones (default: all) are dropped: the kept
    ones spread evenly over them, the first and last kept."""
    pool = list(droppable) if droppable is not None else list(range(n))
    k = len(pool) - dropped_count(len(pool), depth_ratio)
    spread = {pool[int(round(x))] for x in np.linspace(0, len(pool) - 1, k)} if k > 1 else {pool[-1]}
    return sorted(spread | (set(range(n)) - set(pool)))


def drop_blocks(model: nn.Module, cfg: PruneStage, example: tuple[torch.Tensor, ...], train: Split | None,
                names: list[str], batch_size: int, cost: str = "mse") -> dict[str, list[int]]:
    """Drop `cfg.depth_ratio` of the model's droppable blocks in place (chosen by `cost`, `output_cost`'s
    answer, where measured). Returns {list name: original indices kept}."""
    found = block_list(model, example)
    if found is None:
        raise RecipeError("stages.prune.depth_ratio: the model has no list of blocks that keep their input's shape "
                          "(encoder layers, residual blocks); depth pruning drops whole blocks of such a list")
    name, n, droppable = found
    if cfg.compensate == "none" or train is None or len(train) == 0:
        keep = kept_blocks(n, cfg.depth_ratio, droppable)
        keep_blocks(model, name, keep)
        return {name: keep}
    order = [idx for idx in in_order(min(len(train), SAMPLE_INPUTS), batch_size) if len(idx)]
    xs = list(training_batches(train, names, order))
    modes = ("plain", "linear" if cfg.compensate == "least_squares" else "shift")
    key = _order_key(model, xs, (name, cost, modes))
    steps = _ORDERS.setdefault(key, [])
    count = dropped_count(len(droppable), cfg.depth_ratio)
    # the hidden states (a forward pass over the inputs) only where the order is priced or a bridge fitted
    fits_bridge = count > 0 and len(steps) >= count and steps[count - 1][1] != "plain"
    states = States(model, name, xs, names, cost) if len(steps) < count or fits_bridge else None
    if len(steps) < count:
        before = macs(model, example)
    while len(steps) < count:  # greedy: the cheapest removal per MAC saved goes next
        gone = {i for i, _ in steps}
        price = {}
        for i in (i for i in droppable if i not in gone):
            for m in modes:
                c, after = states.price(gone | {i}, m, example)
                price[(i, m)] = c / max(before - after, 1)
        steps.append(min(price, key=price.__getitem__))
    steps = steps[:count]
    drop, mode = {i for i, _ in steps}, (steps[-1][1] if steps else "plain")
    layout = states.layout(drop, mode) if states is not None else [i for i in range(n) if i not in drop]
    keep_blocks(model, name, layout)
    return {name: [i for i in layout if isinstance(i, int)]}


# the greedy steps taken so far per (original weights, inputs, cost): the orders are nested (dropping k + 1 blocks
# begins with the k blocks dropped first), so a search's depth candidates and the kept structure share one
_ORDERS: dict[str, list[tuple[int, str]]] = {}


def _order_key(model: nn.Module, xs: list[tuple[torch.Tensor, ...]], how: tuple) -> str:
    h = hashlib.sha256(repr(how).encode())
    for t in [*model.state_dict().values(), *(t for x in xs for t in x)]:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _rows(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A hidden state as rows of features: [B, C, H, W] by pixel, [B, S, D] by token (only where the input's
    attention mask is set, when it has one), [B, D] as it is."""
    if h.dim() == 4:
        return h.movedim(1, -1).reshape(-1, h.shape[1])
    if h.dim() == 3 and mask is not None and mask.shape == h.shape[:2]:
        return h[mask]
    return h.reshape(-1, h.shape[-1])


def _mask(names: list[str], xs: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """The batch's attention mask (an integer [B, S] input named *mask*) as booleans, if it has one."""
    return next((x != 0 for n, x in zip(names, xs) if is_mask(n, x.dim(), not x.is_floating_point())), None)


class States:
    """The original model's hidden states at every boundary of its block list (the input of each block and the
    output of the last) on a few training inputs, the model's outputs there, and what a set of dropped blocks
    bridged costs: the output's distance from the original's (`_cost`)."""

    def __init__(self, model: nn.Module, name: str, xs: list[tuple[torch.Tensor, ...]], names: list[str],
                 cost: str = "mse") -> None:
        self.model, self.name, self.xs, self.cost = model, name, xs, cost
        self.blocks = model.get_submodule(name)
        self.n = len(self.blocks)
        self.rows: list[list[torch.Tensor]] = [[] for _ in range(self.n + 1)]
        self.tuple_out = self.channels_first = False
        self.outputs = self._capture(names)
        sizes = np.cumsum([len(x[0]) for x in xs])
        self.cost_batches = int(np.searchsorted(sizes, min(COST_INPUTS, sizes[-1]))) + 1

    def _capture(self, names: list[str]) -> list[torch.Tensor]:
        mask: list[torch.Tensor | None] = [None]

        def before(i):
            def hook(_m, args, kwargs):
                h = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
                self.channels_first = h.dim() == 4
                self.rows[i].append(_rows(h.detach().float(), mask[0]))
            return hook

        def after(_m, _args, out):
            self.tuple_out = isinstance(out, (tuple, list))
            self.rows[self.n].append(_rows((out[0] if self.tuple_out else out).detach().float(), mask[0]))

        handles = [b.register_forward_pre_hook(before(i), with_kwargs=True) for i, b in enumerate(self.blocks)]
        handles.append(self.blocks[-1].register_forward_hook(after))
        outputs = []
        try:
            with torch.no_grad():
                for x in self.xs:
                    mask[0] = _mask(names, x)
                    outputs.append(_first(self.model.eval()(*x)))
        finally:
            for h in handles:
                h.remove()
        self.rows = [self._subsample(torch.cat(r)) for r in self.rows]
        return outputs

    def _subsample(self, r: torch.Tensor) -> torch.Tensor:
        """At most MAX_ROWS rows, the same ones (one seed) at every boundary of one shape: a bridge's input and
        output rows stay paired."""
        if len(r) <= MAX_ROWS:
            return r
        keep = torch.randperm(len(r), generator=torch.Generator().manual_seed(0))[:MAX_ROWS]
        return r[keep]

    def bridge(self, i: int, j: int, mode: str) -> Bridge:
        """A bridge from the input of block i to the output of block j: the least-squares linear map (mode
        linear), or the mean shift."""
        x, y = self.rows[i].double(), self.rows[j + 1].double()
        b = Bridge(x.shape[1], mode == "linear", self.tuple_out, self.channels_first)
        if mode != "linear":
            b.shift.data.copy_((y - x).mean(0))
            return b
        x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        w = ridge_solve(x1.T @ x1, x1.T @ y, RIDGE)  # [width + 1, width]
        b.linear.weight.data.copy_(w[:-1].T)
        b.linear.bias.data.copy_(w[-1])
        return b

    def layout(self, drop: set[int], mode: str) -> list[int | nn.Module]:
        """Kept block indices in order, a bridge in place of each run of dropped blocks (mode shift or linear;
        plain: none, the run's input goes on as it is)."""
        out: list[int | nn.Module] = []
        i = 0
        while i < self.n:
            if i not in drop:
                out.append(i)
                i += 1
                continue
            j = i
            while j + 1 in drop:
                j += 1
            if mode != "plain":
                out.append(self.bridge(i, j, mode))
            i = j + 1
        return out

    def price(self, drop: set[int], mode: str, example: tuple[torch.Tensor, ...]) -> tuple[float, int]:
        """What dropping `drop` (bridged by `mode`) costs, on the first COST_INPUTS of the inputs (bridges fitted
        on all of them), and the MACs the model has left at the example's shape."""
        layout = self.layout(drop, mode)
        xs, refs = self.xs[:self.cost_batches], self.outputs[:self.cost_batches]
        with _swapped(self.model, self.name, [self.blocks[i] if isinstance(i, int) else i for i in layout]):
            with torch.no_grad():
                outs = [_first(self.model(*x)) for x in xs]
            left = macs(self.model, example)
        return _cost(outs, refs, self.cost), left


def _first(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def _swapped(model: nn.Module, name: str, modules: list[nn.Module]) -> Iterator[None]:
    """The block list `name` holds `modules` (a config's num_hidden_layers following) for the duration."""
    undo = replace_blocks(model, name, nn.ModuleList(modules))
    try:
        yield
    finally:
        undo()

"""Weight clustering (weight sharing): each large layer's weights take only K shared values.

Per Conv/Linear layer, scikit-learn's KMeans clusters the weights into K centroids and every weight is
replaced by its centroid. Optionally the centroids (with the assignment fixed) and the remaining
parameters are fine-tuned with the distillation loss; the weight is a `torch.nn.utils.parametrize`
function of the centroids during that fine-tune and is baked back to a plain tensor afterwards. The
model's shapes do not change -- the gain is in how well the artifact compresses (a layer of K distinct
values has at most log2(K) bits of entropy per weight), which is what phones download.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from edgebundle.core.recipe import ClusterStage


class _Shared(nn.Module):
    """weight = scales * centroids[assignment]: trains the K shared values; who shares which stays fixed."""

    def __init__(self, scales: torch.Tensor, centroids: torch.Tensor, assignment: torch.Tensor) -> None:
        super().__init__()
        self.centroids = nn.Parameter(centroids)
        self.register_buffer("scales", scales)
        self.register_buffer("assignment", assignment)

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        return self.scales * self.centroids[self.assignment]


@dataclass(frozen=True)
class Clustered:
    scales: torch.Tensor  # per output channel (per_channel_scaled) or a single 1
    centroids: torch.Tensor
    assignment: torch.Tensor


def clusterable(model: nn.Module, min_params: int) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear)) and m.weight.numel() >= min_params]


def _scales(w: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "per_layer":
        return torch.ones([1] * w.dim(), dtype=w.dtype)
    s = w.detach().abs().flatten(1).amax(dim=1).clamp_min(torch.finfo(w.dtype).tiny)
    return s.reshape(-1, *([1] * (w.dim() - 1)))


def cluster(model: nn.Module, cfg: ClusterStage, *, seed: int) -> dict[str, Clustered]:
    """Replace each clusterable layer's weights by shared k-means centroids, in place.

    `per_layer`: one set of K values per layer (best for fp32 artifacts). `per_channel_scaled`: the
    centroids are shared in each output channel's max-normalized domain, w = s_c * u_k -- per-channel
    int8 quantization then maps every channel onto the same few int8 codes (at most 2K: the extreme
    centroid may be positive or negative), which is what makes an int8 artifact compress.
    """
    from sklearn.cluster import KMeans

    out = {}
    for name, mod in clusterable(model, cfg.min_params):
        w = mod.weight.detach().cpu()
        scales = _scales(w, cfg.sharing)
        u = (w / scales).numpy().reshape(-1, 1).astype(np.float64)
        k = min(cfg.clusters, len(np.unique(u)))
        km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(u)
        centroids = torch.tensor(km.cluster_centers_.ravel(), dtype=w.dtype)
        assign = torch.from_numpy(km.labels_.astype(np.int64)).reshape(w.shape)
        with torch.no_grad():
            mod.weight.copy_(scales * centroids[assign])
        out[name] = Clustered(scales, centroids, assign)
    return out


def share(model: nn.Module, clustered: dict[str, Clustered]) -> None:
    """Make every clustered layer's weight a function of its centroids (for fine-tuning them)."""
    mods = dict(model.named_modules())
    for name, c in clustered.items():
        parametrize.register_parametrization(mods[name], "weight",
                                             _Shared(c.scales.clone(), c.centroids.clone(), c.assignment))


def bake(model: nn.Module) -> None:
    """Turn parametrized weights back into plain tensors (still K shared values per layer)."""
    for mod in model.modules():
        if parametrize.is_parametrized(mod, "weight"):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)


def distinct_values(model: nn.Module, cfg: ClusterStage) -> dict[str, int]:
    """Distinct shared values per layer, in the domain they are shared in."""
    return {n: int(torch.unique((m.weight.detach() / _scales(m.weight.detach(), cfg.sharing)).to(torch.float32)
                                .mul(1e4).round()).numel())
            for n, m in clusterable(model, cfg.min_params)}

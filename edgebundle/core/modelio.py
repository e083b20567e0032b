"""Building models from a recipe, and saving/loading them without pickle.

Weights are loaded only with `torch.load(weights_only=True)` or safetensors. A pruned model is saved as
safetensors plus a JSON of each module's shape attributes (in_channels, num_features, ...), the same
information Torch-Pruning's own `tp.state_dict` keeps, but in a form that needs no unpickling: loading
rebuilds the model from its factory, applies the attributes and takes the tensors.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from edgebundle.core.errors import RecipeError, first_line, weights_problem
from edgebundle.core.limits import DEFAULT_USER_CODE_S, time_limit
from edgebundle.core.artifact import sha256_file
from edgebundle.core.recipe import EnsembleSpec, InputSpec, ModelSpec

STRUCTURE_FILE = "structure.json"
WEIGHTS_FILE = "weights.safetensors"
_SHAPE_ATTRS = (
    "in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
    "normalized_shape", "num_embeddings", "embedding_dim", "embed_dim", "num_heads", "head_dim",
    "hidden_size", "num_attention_heads", "attention_head_size", "all_head_size", "edgebundle_input_size",
)


def import_object(ref: str, *, base_dir: Path, what: str, timeout_s: float | None = DEFAULT_USER_CODE_S
                  ) -> Callable[..., Any]:
    """Import exactly what `ref` names: 'pkg.module:attr' or 'path/to/file.py:attr'."""
    module_name, _, attr = ref.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            path = path if path.is_absolute() else base_dir / path
            if not path.is_file():
                raise RecipeError(f"{what}: file not found: {path}")
            mod_id = "edgebundle_user_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
            spec = importlib.util.spec_from_file_location(mod_id, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_id] = module
            with time_limit(timeout_s, f"{what}: importing '{module_name}'"):
                spec.loader.exec_module(module)
        else:
            with time_limit(timeout_s, f"{what}: importing '{module_name}'"):
                module = importlib.import_module(module_name)
    except RecipeError:
        raise
    except SystemExit as e:  # an import runs arbitrary user code, which may even exit
        raise RecipeError(f"{what}: importing '{module_name}' called sys.exit({e.code})") from e
    except Exception as e:  # an import runs arbitrary user code: report any failure as the recipe's
        raise RecipeError(f"{what}: cannot import '{module_name}': {type(e).__name__}: {e}") from e
    obj = getattr(module, attr, None)
    if obj is None or not callable(obj):
        raise RecipeError(f"{what}: '{module_name}' has no callable '{attr}'")
    return obj


def source_fingerprint(spec: ModelSpec | EnsembleSpec, base_dir: Path) -> str:
    """Hash of what determines the model: factory ref, kwargs, the factory's source file, weights bytes."""
    if isinstance(spec, EnsembleSpec):
        h = hashlib.sha256(spec.mode.encode())
        for m in spec.members:
            h.update(source_fingerprint(m, base_dir).encode())
        if spec.weights is not None:
            h.update(sha256_file(_resolve(spec.weights, base_dir)).encode())
        return h.hexdigest()
    unset = {"task", "pooling", "normalize"} - set(spec.hf_fields())
    h = hashlib.sha256(spec.model_dump_json(exclude={"weights", "hf", *unset}).encode())
    if spec.hf is not None:
        from edgebundle.core import hf

        h.update(hf.folder_fingerprint(_resolve(spec.hf, base_dir)).encode())
        fn = hf.sequence_classifier
    else:
        fn = import_object(spec.factory, base_dir=base_dir, what="model.factory")
    try:
        src = inspect.getsourcefile(fn)
        if src:
            h.update(Path(src).read_bytes())
    except TypeError:
        pass
    if spec.weights is not None:
        h.update(sha256_file(_resolve(spec.weights, base_dir)).encode())
    return h.hexdigest()


def _resolve(p: Path, base_dir: Path) -> Path:
    return p if p.is_absolute() else base_dir / p


def build_model(spec: ModelSpec | EnsembleSpec, base_dir: Path, timeout_s: float | None = DEFAULT_USER_CODE_S
                ) -> nn.Module:
    if isinstance(spec, EnsembleSpec):
        from edgebundle.core.ensemble import Ensemble

        model = Ensemble([build_model(m, base_dir, timeout_s) for m in spec.members], spec.mode)
        if spec.weights is not None:
            load_weights(model, _resolve(spec.weights, base_dir))
        return model.eval()
    if spec.hf is not None:
        from edgebundle.core import hf

        model = hf.load(_resolve(spec.hf, base_dir), spec.task, pooling=spec.pooling, normalize=spec.normalize,
                        **spec.kwargs)
    else:
        fn = import_object(spec.factory, base_dir=base_dir, what="model.factory", timeout_s=timeout_s)
        try:
            with time_limit(timeout_s, f"model.factory {spec.factory}"):
                model = fn(**spec.kwargs)
        except RecipeError:
            raise
        except SystemExit as e:  # user factory code
            raise RecipeError(f"model.factory {spec.factory}({spec.kwargs}) called sys.exit({e.code})") from e
        except Exception as e:  # user factory code
            raise RecipeError(f"model.factory {spec.factory}({spec.kwargs}) failed: {type(e).__name__}: {e}") from e
        if not isinstance(model, nn.Module):
            raise RecipeError(f"model.factory {spec.factory} returned {type(model).__name__}, not a torch.nn.Module")
    if spec.weights is not None:
        load_weights(model, _resolve(spec.weights, base_dir))
    return model.eval()


def load_weights(model: nn.Module, path: Path) -> None:
    if path.is_dir():
        raise RecipeError(f"model.weights {path} is a folder; give the weights file (.safetensors, .pt or .pth)")
    if not path.is_file():
        raise RecipeError(f"model.weights not found: {path}")
    if path.stat().st_size == 0:
        raise RecipeError(f"model.weights {path} is empty")
    try:
        with warnings.catch_warnings():  # torch warns about pickles before refusing them: one line is enough
            warnings.simplefilter("ignore")
            if path.suffix == ".safetensors":
                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle refused by weights_only, ...
        raise RecipeError(f"model.weights {path} cannot be loaded safely: {weights_problem(e)}") from e
    if isinstance(state, dict):  # a training checkpoint around the state_dict
        state = next((state[k] for k in CHECKPOINT_KEYS if isinstance(state.get(k), dict)), state)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as e:
        why = misfit(model.state_dict(), state) if isinstance(state, dict) else ""
        raise RecipeError(f"model.weights {path} do not fit the model: "
                          f"{why or str(e).strip().splitlines()[0]}") from e


CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")  # where checkpoints keep the weights, in that order


def misfit(expected: dict[str, Any], given: dict[str, Any], shown: int = 3) -> str:
    """How a state_dict differs from the model's: keys missing, keys the model lacks, tensors of another shape."""
    def some(items: list[str], sep: str = ", ") -> str:
        return sep.join(items[:shown]) + (f"{sep}..." if len(items) > shown else "")

    missing = [k for k in expected if k not in given]
    extra = [k for k in given if k not in expected]
    shaped = [f"{k} {list(given[k].shape)} in the file, {list(expected[k].shape)} in the model" for k in expected
              if k in given and hasattr(given[k], "shape") and tuple(given[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the model's tensors missing ({some(missing)})")
    if extra:
        parts.append(f"{len(extra)} the model does not have ({some(extra)})")
    if shaped:
        parts.append(f"{len(shaped)} of another shape ({some(shaped, '; ')})")
    return "; ".join(parts)


def macs(model: nn.Module, example: tuple[torch.Tensor, ...]) -> int:
    """Multiply-accumulates of one forward pass at the example's shape, by PyTorch's own FLOP counter: it
    sees every matmul and convolution the forward runs (F.conv2d calls and attention's matmuls included;
    Torch-Pruning's module-hook counter saw 0.031 of EfficientNet-Lite1's 0.600 GMAC). The forward runs
    without gradients, in whatever mode the model is (an exported program's module cannot switch)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*example)
    return int(counter.get_total_flops() // 2)


def example_inputs(specs: list[InputSpec], batch: int | None = None) -> tuple[torch.Tensor, ...]:
    out = []
    for s in specs:
        shape = list(s.shape)
        if batch is not None and 0 in s.dynamic_axes:
            shape[0] = batch
        dtype = getattr(torch, s.dtype)
        out.append(torch.zeros(shape, dtype=dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype))
    return tuple(out)


def check_accepts(model: nn.Module, specs: list[InputSpec], outputs: int = 1) -> tuple[torch.Tensor, ...]:
    """Run the model once on zeros of the input spec; a rejection is the recipe's error. Returns the
    outputs (one tensor, or a tuple/list of `outputs` tensors)."""
    try:
        with torch.no_grad():
            out = model(*example_inputs(specs))
    except Exception as e:  # whatever the user's forward raises
        shapes = ", ".join(f"'{s.name}' {s.shape} {s.dtype}" for s in specs)
        raise RecipeError(f"the model rejects input {shapes}: {first_line(e)}") from e
    outs = (out,) if isinstance(out, torch.Tensor) else tuple(out) if isinstance(out, (tuple, list)) else None
    if outs is None or not all(isinstance(o, torch.Tensor) for o in outs):
        raise RecipeError(f"the model must return a tensor or a tuple of tensors; it returned {type(out).__name__}")
    if len(outs) != outputs:
        raise RecipeError(f"the model returns {len(outs)} tensor(s) but the recipe names {outputs} output(s)")
    return outs


KEPT_ATTR = "edgebundle_kept_blocks"  # on a ModuleList depth pruning shortened: the original indices it kept
BRIDGES_ATTR = "edgebundle_bridges"  # in a saved structure: where bridges stand in a shortened list
INPUT_SIZE_ATTR = "edgebundle_input_size"  # on the root: the (height, width) its image inputs are resized to


def _is_image(t: Any) -> bool:
    """An image batch: a floating-point tensor of rank 4 (N, C, H, W)."""
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 4


def image_inputs(example: tuple[torch.Tensor, ...]) -> list[int]:
    """Which inputs are images."""
    return [i for i, t in enumerate(example) if _is_image(t)]


def scaled_size(example: tuple[torch.Tensor, ...], scale: float) -> tuple[int, int]:
    """The (height, width) `scale` of the first image input's, rounded to whole pixels."""
    h, w = example[image_inputs(example)[0]].shape[-2:]
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def set_input_size(model: nn.Module, size: tuple[int, int]) -> None:
    """The network sees its image inputs resized to `size` (bilinear, as torchvision's Resize does tensors
    without antialiasing); callers and the exported graph keep the input shape (a Resize node in front).
    Kept as a root attribute, so `save_structured` records it and `load_structured` puts it back."""
    setattr(model, INPUT_SIZE_ATTR, (int(size[0]), int(size[1])))
    if not any(h is _resize_images for h in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(_resize_images, with_kwargs=True)


def _resize_images(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    size = getattr(module, INPUT_SIZE_ATTR)

    def resized(t: Any) -> Any:
        if not _is_image(t) or tuple(t.shape[-2:]) == size:
            return t
        return torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)

    return tuple(resized(a) for a in args), {k: resized(v) for k, v in kwargs.items()}


class Bridge(nn.Module):
    """Stands in a block list where depth pruning dropped a run of blocks, fitted to what the dropped blocks
    made of the hidden state: a linear map of it (over its last axis; over axis 1 for [B, C, H, W] feature
    maps), or (`linear` false) the hidden state plus a shift. What else the list passes its blocks (attention
    masks, ...) is ignored; `tuple_out`: the dropped blocks returned a tuple led by the hidden state."""

    def __init__(self, width: int, linear: bool = True, tuple_out: bool = False, channels_first: bool = False
                 ) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width) if linear else None
        self.shift = None if linear else nn.Parameter(torch.zeros(width))
        self.tuple_out, self.channels_first = tuple_out, channels_first

    @property
    def width(self) -> int:
        """From the weights (channel pruning after depth pruning can narrow a bridge)."""
        return self.linear.in_features if self.linear is not None else len(self.shift)

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any):
        h = hidden.movedim(1, -1) if self.channels_first else hidden
        y = self.linear(h) if self.linear is not None else h + self.shift
        y = y.movedim(-1, 1) if self.channels_first else y
        return (y,) if self.tuple_out else y

    def record(self) -> dict[str, Any]:
        return {"width": self.width, "linear": self.linear is not None, "tuple_out": self.tuple_out,
                "channels_first": self.channels_first}


def keep_blocks(model: nn.Module, name: str, layout: list[int | nn.Module]) -> int:
    """Replace the ModuleList `name` by `layout`: the blocks at the original indices it names, in order, and
    the modules (bridges) it holds where they stand. A Hugging Face config's num_hidden_layers follows.
    Returns how many blocks there were."""
    old = model.get_submodule(name)
    new = nn.ModuleList([old[i] if isinstance(i, int) else i for i in layout])
    setattr(new, KEPT_ATTR, tuple(int(i) for i in layout if isinstance(i, int)))
    replace_blocks(model, name, new)
    return len(old)


def replace_blocks(model: nn.Module, name: str, new: nn.ModuleList) -> Callable[[], None]:
    """Put `new` in place of the ModuleList `name`; a Hugging Face config's num_hidden_layers follows. Returns
    what puts the old list (and the configs) back."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, leaf)
    configs = [m.config for m in model.modules()
               if getattr(getattr(m, "config", None), "num_hidden_layers", None) == len(old)]
    setattr(parent, leaf, new)
    for c in configs:
        c.num_hidden_layers = len(new)

    def undo() -> None:
        setattr(parent, leaf, old)
        for c in configs:
            c.num_hidden_layers = len(old)

    return undo


def block_positions(blocks: nn.ModuleList, n: int) -> dict[int, int]:
    """Original block index (of n) -> the position in a list depth pruning shortened whose output stands for
    that block's: a kept block's own, and for the last block of each run a bridge replaced, the bridge's."""
    kept = list(getattr(blocks, KEPT_ATTR))
    out: dict[int, int] = {}
    k = 0
    for pos, m in enumerate(blocks):
        if isinstance(m, Bridge):
            out[(kept[k] if k < len(kept) else n) - 1] = pos
        else:
            out[kept[k]] = pos
            k += 1
    return out


def _saved_layout(rec: dict[str, Any]) -> list[int | nn.Module]:
    """A saved block list's layout: its kept original indices, with bridges rebuilt where they stood."""
    kept = list(rec.pop(KEPT_ATTR))
    bridges = rec.pop(BRIDGES_ATTR, {})
    it = iter(kept)
    return [Bridge(**bridges[str(pos)]) if str(pos) in bridges else next(it)
            for pos in range(len(kept) + len(bridges))]


def save_structured(model: nn.Module, folder: Path) -> list[str]:
    """Save a (possibly pruned) model as safetensors + module shape attributes. Returns file names."""
    attrs: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        rec = {}
        for a in _SHAPE_ATTRS:
            if a in vars(mod):
                v = vars(mod)[a]
                if isinstance(v, (int, float, str, bool)) or (isinstance(v, tuple) and all(isinstance(x, int) for x in v)):
                    rec[a] = list(v) if isinstance(v, tuple) else v
        if rec:
            attrs[name] = rec
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and getattr(mod, KEPT_ATTR, None) is not None:
            attrs.setdefault(name, {})[KEPT_ATTR] = list(getattr(mod, KEPT_ATTR))
            bridges = {str(pos): m.record() for pos, m in enumerate(mod) if isinstance(m, Bridge)}
            if bridges:
                attrs[name][BRIDGES_ATTR] = bridges
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_FILE))
    (folder / STRUCTURE_FILE).write_text(json.dumps(attrs, indent=1, sort_keys=True))
    return [WEIGHTS_FILE, STRUCTURE_FILE]


def load_structured(spec: ModelSpec | EnsembleSpec, base_dir: Path, folder: Path,
                    timeout_s: float | None = DEFAULT_USER_CODE_S) -> nn.Module:
    """Rebuild the factory model, reshape it to the saved structure, load the saved tensors."""
    if isinstance(spec, EnsembleSpec):  # the saved tensors replace every member's weights
        spec = spec.model_copy(update={"weights": None, "members": [m.model_copy(update={"weights": None})
                                                                    for m in spec.members]})
    model = build_model(spec.model_copy(update={"weights": None}), base_dir, timeout_s)
    attrs = json.loads((folder / STRUCTURE_FILE).read_text())
    tensors = load_file(str(folder / WEIGHTS_FILE))
    for name in sorted((n for n, rec in attrs.items() if KEPT_ATTR in rec), key=lambda n: n.count(".")):
        lst = dict(model.named_modules()).get(name)
        if not isinstance(lst, nn.ModuleList):
            raise RecipeError(f"saved structure names block list '{name}' that model.factory does not build")
        keep_blocks(model, name, _saved_layout(attrs[name]))
    modules = dict(model.named_modules())
    for name, rec in attrs.items():
        mod = modules.get(name)
        if mod is None:
            raise RecipeError(f"saved structure names module '{name}' that model.factory does not build")
        for a, v in rec.items():
            setattr(mod, a, tuple(v) if isinstance(v, list) else v)
    if INPUT_SIZE_ATTR in attrs.get("", {}):
        set_input_size(model, attrs[""][INPUT_SIZE_ATTR])
    for key, t in tensors.items():
        owner_name, _, leaf = key.rpartition(".")
        owner = modules.get(owner_name)
        if owner is None:
            raise RecipeError(f"saved weights name '{key}' that model.factory does not build")
        if leaf in owner._parameters and owner._parameters[leaf] is not None:
            owner._parameters[leaf] = nn.Parameter(t.clone(), requires_grad=owner._parameters[leaf].requires_grad)
        elif leaf in owner._parameters:  # a bias pruning's compensation gave a layer built without one
            owner._parameters[leaf] = nn.Parameter(t.clone())
        elif leaf in owner._buffers:
            owner._buffers[leaf] = t.clone()
    model.load_state_dict(tensors, strict=True)
    return model.eval()

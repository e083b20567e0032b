"""Error hierarchy. The CLI turns every EdgeBundleError into one red line and exit code 2."""


class EdgeBundleError(Exception):
    """Base class for every error edgebundle reports to a user."""


class RecipeError(EdgeBundleError):
    """The recipe (or something it names: model factory, weights, data) is invalid."""


class DataError(EdgeBundleError):
    """Training, calibration or evaluation data is unusable (empty, NaN/Inf, wrong shape or dtype)."""


class StageError(EdgeBundleError):
    """A pipeline stage failed; the message names the stage and the stages that ran before it."""


class TargetUnavailable(EdgeBundleError):
    """A target's runtime or device is missing on this machine."""


class BundleError(EdgeBundleError):
    """A bundle cannot be written or read (bad output folder, bad manifest)."""


class IntegrityError(BundleError):
    """A bundle's files no longer match its manifest: changed, missing or added (`files` names them)."""

    def __init__(self, message: str, files: list[str]) -> None:
        super().__init__(message)
        self.files = files


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one line: its type and the first line of its message (a library's message can run to
    pages: a tensor dump, a graph), cut at `limit` characters."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    text = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def weights_problem(e: Exception) -> str:
    """What is wrong with a weights file, in words (torch's own messages are long or say only errno)."""
    text = " ".join(str(e).split())
    refused = "Weights only load failed" in text or "weights_only" in text
    if refused and "GLOBAL" not in text:  # the unpickler met no object reference: the bytes are not a pickle
        why = text.split("error: ")[-1].split(" Check the documentation")[0][:60]
        return f"it is not a PyTorch checkpoint (its bytes are not a pickle: {why})"
    if refused:
        return ("it holds pickled Python objects, which torch.load(weights_only=True) refuses to run; save a "
                "state_dict (torch.save(model.state_dict(), ...)) or use .safetensors")
    if isinstance(e, (OSError, EOFError)) or "PytorchStreamReader" in text or "zip" in text.lower():
        return f"it is truncated or not a PyTorch checkpoint ({type(e).__name__}: {text[:120]})"
    return f"{type(e).__name__}: {text[:200]}"


def not_a_folder(path, what: str) -> str:
    """'data folder not found: X', or 'data.path X is a file, not a folder' where it exists as something else."""
    from pathlib import Path

    p = Path(path)
    if p.exists():
        return f"{what} {p} is a file, not a folder (give the folder that holds the files)"
    return f"{what} not found: {p}"


class DeviceError(EdgeBundleError):
    """A device cannot be reached, or a command on it failed or ran out of time; the message names the device."""

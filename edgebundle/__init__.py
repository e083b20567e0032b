"""edgebundle: trained PyTorch model -> pruned, distilled, int8 device bundles with measured latency."""

from edgebundle.core.errors import (
    BundleError,
    DataError,
    EdgeBundleError,
    RecipeError,
    StageError,
    TargetUnavailable,
)

__version__ = "0.1.0"

__all__ = [
    "BundleError",
    "DataError",
    "EdgeBundleError",
    "RecipeError",
    "StageError",
    "TargetUnavailable",
    "__version__",
]

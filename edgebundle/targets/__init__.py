"""Targets: one module per runtime behind the `Target` protocol, one registry by name.

Importing this package registers every target; heavy or optional runtimes are imported lazily inside
each target's methods, so the package imports on machines without them.
"""

from edgebundle.targets import registry
from edgebundle.targets.base import BuildContext, Built, Session, Target
from edgebundle.targets import executorch_xnnpack, litert, openvino, ort_cpu, ort_mobile, tensorrt  # noqa: F401  (each registers itself)

__all__ = ["BuildContext", "Built", "Session", "Target", "registry"]

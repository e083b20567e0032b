"""Stages: one module per prepare step behind the `Stage` protocol (edgebundle.stages.base). Each declares
itself (its config, label, predecessors, role) and registers with `@register_stage`; importing this package
registers the built-ins, and `registry.ordered()` is the order the runner walks. Adding a stage: one module
(here, or in another package through the `edgebundle.stages` entry-point group)."""

from edgebundle.stages import cluster, data, distill, export, prune, search, teacher  # noqa: F401  (each registers itself)
from edgebundle.stages import registry
from edgebundle.stages.base import Stage, StageBase, StageContext

__all__ = ["Stage", "StageBase", "StageContext", "registry"]

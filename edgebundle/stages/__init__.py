"""Stages: one module per prepare step behind the `Stage` protocol (edgebundle.stages.base), and the one
registry, in the order the runner walks them. Adding a stage: one module, one line here."""

from edgebundle.stages.base import Stage, StageContext
from edgebundle.stages.cluster import Cluster
from edgebundle.stages.data import Data
from edgebundle.stages.distill import Distill
from edgebundle.stages.export import Export
from edgebundle.stages.prune import Prune
from edgebundle.stages.teacher import Teacher

STAGES: tuple[Stage, ...] = (Teacher(), Prune(), Distill(), Cluster(), Export(), Data())

__all__ = ["STAGES", "Stage", "StageContext"]

"""The planner: compile a stage's programs for a slice that need not exist here, and say whether they fit.

`python -m safework.plan --config EXPERIMENT[:ARGS] [--topology v5p-16] [--json OUT]`. With `libtpu` installed
(`pip install -e .[plan]`), TPU slices are described by `jax.experimental.topologies` and every program is
compiled for them on this CPU; GPU targets are compiled for simulated CPU devices and labelled an estimate.
"""

from safework.plan.report import SPARE, Plan, ProgramCost
from safework.plan.topology import CHIPS, Topology, parse_topology

__all__ = ["CHIPS", "SPARE", "Plan", "ProgramCost", "Topology", "parse_topology"]

r"""python -m safework.plan --config EXPERIMENT[:ARGS] [--topology SLICE] [--json OUT] [--config.KEY=VALUE ...]

  python -m safework.plan --config experiments/m3rl_svkg.py:variant=7b --json /tmp/svkg_7b.json

Compiles every program of the stage for the slice (default: the experiment's `topology`) from abstract shapes,
prints their per-chip memory, FLOPs, bytes and roofline time, and ends with whether the stage fits. Exit status 0
when it fits, 1 when it does not, 2 on a bad config or topology.
"""

from __future__ import annotations

import os
import sys

# The planner compiles on this machine's CPU; JAX must not probe for an accelerator (with libtpu installed it
# would print TPU initialisation errors). get_topology_desc still describes TPU slices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file (and :arguments).", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "Slice to plan for, e.g. v5p-16 (default: the config's).")
_JSON = flags.DEFINE_string("json", None, "Also write the plan as JSON here.")


def _simulate_devices(count: int) -> None:
  """GPU targets compile for `count` simulated CPU devices (before JAX starts its CPU client)."""
  flag = f"--xla_force_host_platform_device_count={count}"
  os.environ["XLA_FLAGS"] = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                     if "host_platform_device_count" not in f) + " " + flag


def main(argv) -> int:
  del argv
  from safework.plan.topology import parse_topology
  config = _CONFIG.value
  name = _TOPOLOGY.value or config.get("topology")
  if not name:
    print("error: the experiment names no topology; pass --topology (e.g. v5p-16)", file=sys.stderr)
    return 2
  try:
    topology = parse_topology(name)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if not topology.is_tpu:
    _simulate_devices(topology.chips)
  from safework.plan.build import plan_stage
  try:
    plan = plan_stage(config, topology, log=lambda line: print(line, file=sys.stderr))
  except (ValueError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(plan.table())
  if _JSON.value:
    plan.write_json(_JSON.value)
  return 0 if plan.fits else 1


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(lambda argv: sys.exit(main(argv)))

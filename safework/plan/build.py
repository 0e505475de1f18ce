"""A stage's plan: its programs compiled for a slice, their per-chip costs, and whether they fit."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from safework import sharding
from safework.experiment import settings
from safework.models import build_model, family_of, get_preset
from safework.models.checkpoint import load_config
from safework.plan.programs import JudgeShape, StagePrograms, bytes_per_device
from safework.plan.report import Plan, ProgramCost
from safework.plan.topology import Topology
from safework.policy import PolicySettings, policy_model
from safework.stages import RLStage, parse_stage
from safework.verifiers.build import RewardSpec


def devices_of(topology: Topology) -> list:
  """The devices programs are compiled for: the TPU slice's (through libtpu), or this host's CPU devices."""
  if not topology.is_tpu:
    devices = jax.devices("cpu")
    if len(devices) < topology.chips:
      raise RuntimeError(f"{topology.name} needs {topology.chips} simulated devices, this process has "
                         f"{len(devices)}; set XLA_FLAGS=--xla_force_host_platform_device_count={topology.chips} "
                         "before JAX starts (python -m safework.plan does)")
    return devices[:topology.chips]
  # libtpu reads these when it loads: compile only (another process may hold the TPU lock, e.g. a second plan),
  # and no probing of a TPU host that this machine is not (it would print initialisation errors).
  for name, value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                      ("TPU_ACCELERATOR_TYPE", topology.name)):
    os.environ.setdefault(name, value)
  try:
    from jax.experimental import topologies
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology.topology_name).devices)
  except Exception as e:  # noqa: BLE001 - libtpu missing, or a topology libtpu does not know
    raise RuntimeError(f"cannot describe {topology.name} ({topology.topology_name}): {str(e).splitlines()[0]}. "
                       "Compiling for TPU on this machine needs libtpu: pip install -e '.[plan]'") from None


class Memory(NamedTuple):
  """Bytes per device of a compiled program, as XLA's memory analysis names them."""
  argument: int
  output: int
  temp: int
  alias: int


def program_cost(memory: Memory, work, largest: Sequence[tuple[str, int]] = (),
                 resident: Mapping[str, int] = {}) -> ProgramCost:
  """A program's per-device `memory` (argument, output, temp and alias bytes), the `resident` buffers held beside
  it, and the counted `work`.

  `largest` are the program's arguments by name with their bytes per device. jit leaves out the arguments a
  program does not read (the vision tower's parameters when decoding); they are still in HBM, so the bytes XLA
  does not count among the arguments are counted as resident.
  """
  unread = max(0, sum(n for _, n in largest) - memory.argument)
  return ProgramCost(argument_bytes=memory.argument, output_bytes=memory.output, temp_bytes=memory.temp,
                     alias_bytes=memory.alias, resident_bytes=sum(resident.values()) + unread, flops=work.flops,
                     bytes_accessed=work.bytes,
                     largest=tuple(sorted([*largest, *resident.items()], key=lambda kv: -kv[1])))


def compiled_memory(compiled) -> Memory:
  """XLA's memory analysis of a compiled program, per device."""
  memory = compiled.memory_analysis()
  return Memory(*(int(getattr(memory, f"{name}_size_in_bytes")) for name in Memory._fields))


def memory_cache_dir() -> Path | None:
  """Where compiled programs' memory is remembered, by program text and slice (SAFEWORK_PLAN_CACHE, default
  ~/.cache/safework/plan; "" turns it off): the stages of a ladder share most programs (the rollout, the train step,
  judges), and a paper-scale decode loop takes minutes to compile."""
  path = os.environ.get("SAFEWORK_PLAN_CACHE", os.path.expanduser("~/.cache/safework/plan"))
  return Path(path) if path else None


def _compiler_versions() -> str:
  try:
    libtpu = importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    libtpu = "none"
  return f"jax {jax.__version__} libtpu {libtpu}"


def program_memory(lowered, topology: Topology) -> Memory:
  """The per-device memory of a lowered program compiled for `topology` (remembered in `memory_cache_dir`); a
  program the TPU compiler refuses as too large reports the temporaries it asked for."""
  cache = memory_cache_dir()
  key = hashlib.sha256(f"{topology.name} {_compiler_versions()}\n{lowered.as_text()}".encode()).hexdigest()
  path = cache / f"{key}.json" if cache else None
  if path is not None and path.is_file():
    return Memory(**json.loads(path.read_text()))
  try:
    memory = compiled_memory(lowered.compile())
  except Exception as e:  # noqa: BLE001 - XLA raises its own error types
    temp = out_of_memory_temporaries(str(e))
    if temp is None:
      raise
    memory = Memory(argument=-1, output=0, temp=temp, alias=0)   # refused: too big (arguments: the caller's count)
  if path is not None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(memory._asdict()))
  return memory


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def out_of_memory_temporaries(message: str) -> int | None:
  """The temporaries the TPU compiler found no room for ("...HLO temporaries (285.17G) exceeds available HBM"):
  it refuses to compile a program that does not fit, and this is how large it would have been. None for any other
  error."""
  match = re.search(r"HLO temporaries \(([\d.]+)([KMGT]?)\)", message)
  if "RESOURCE_EXHAUSTED" not in message or match is None:
    return None
  return int(float(match.group(1)) * _UNITS[match.group(2)])


def judge_shapes(reward: RewardSpec) -> tuple[JudgeShape, ...]:
  """The reward's verifiers as the planner sees them: one per distinct (weights, head, batch, length); weights
  from a checkpoint's config.json, or the spec's `preset` when it has no path yet."""
  groups: dict[tuple, list[str]] = {}
  for name, spec in sorted(reward.verifiers.items()):
    if name in reward.components:
      weights = f"{spec.path or 'preset ' + str(spec.preset)} ({spec.dtype})"
      groups.setdefault((weights, spec.head, spec.batch_size, spec.max_length), []).append(name)
  shapes = []
  for (weights, head, batch_size, max_length), names in groups.items():
    spec = reward.verifiers[names[0]]
    if spec.path:
      config = load_config(spec.path)
    elif spec.preset:
      config = get_preset(spec.preset)
    else:
      raise ValueError(f"verifier {names[0]!r} has neither a path nor a preset: the planner needs its shape (set "
                       f"reward.verifiers.{names[0]}.preset, e.g. '7b')")
    dtype = jnp.dtype(spec.dtype)
    shapes.append(JudgeShape("+".join(names), weights, build_model(config, dtype=dtype, param_dtype=dtype), head,
                             batch_size, max_length))
  return tuple(shapes)


def plan_stage(config: Mapping[str, Any], topology: Topology, log: Callable[[str], None] = print) -> Plan:
  """Compiles every program of a single-stage experiment config for `topology`; logs each as it goes."""
  if config.get("job", "train") != "train":
    raise ValueError(f"job {config['job']!r}: the planner plans single-stage experiments (job 'train'); plan each "
                     "stage of a ladder from its own experiment file")
  verifiers = tuple(dict(config.get("reward", {}).get("verifiers", {}) or {}))
  stage = parse_stage(config, extra_scorers=verifiers, top_level=True)   # judges are shapes here, not loaded
  policy = settings(PolicySettings, config["model"])
  devices = devices_of(topology)
  mesh = sharding.make_mesh(dict(config["mesh"]), devices=devices)
  rules = sharding.rules_of(config["sharding_rules"])
  model = policy_model(policy)
  pixels = policy.max_pixels if family_of(model.config).reads_images else 0   # a text-only policy: text prompts
  builder = StagePrograms(model, mesh, rules, pixels, policy.remat)
  if isinstance(stage, RLStage):
    programs = builder.rl(stage, judge_shapes(stage.reward) if stage.reward else ())
  else:
    programs = builder.sft(stage)
  costs = {}
  cache = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)   # executables for another platform: nothing to reuse
  with sharding.rules_in_effect(rules):   # the kernels split their work as the stage's rules split the model
    try:
      for program in programs:
        start = time.perf_counter()
        sizes = [(name, bytes_per_device(arg))
                 for name, arg in zip(program.arg_names, program.args) if arg is not None]
        memory = program_memory(program.lower(mesh), topology)
        if memory.argument < 0:   # refused as too large: its arguments as the caller counts them
          memory = memory._replace(argument=sum(n for _, n in sizes))
        costs[program.name] = program_cost(memory, program.work, sizes, program.resident)
        log(f"compiled {program.name} in {time.perf_counter() - start:.1f} s")
    finally:
      jax.config.update("jax_enable_compilation_cache", cache)
  return Plan(stage=str(config.get("name", "stage")), topology=topology,
              hbm_bytes_per_device=topology.chip.hbm_bytes * topology.chips // len(devices), devices=len(devices),
              mesh=dict(mesh.shape), programs=costs, estimate=not topology.is_tpu,
              knobs={p.name: p.knob for p in programs})

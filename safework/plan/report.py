"""What a compiled program costs per chip, whether a stage fits, and the table and JSON the planner prints.

Memory is per device, from XLA's own `memory_analysis()` of the program compiled for the target (arguments,
outputs, temporaries; aliased (donated) outputs are not counted twice). FLOPs and bytes are the whole program's,
counted from its shapes (`safework.plan.costs`); the roofline time spreads them evenly over the slice's chips:
max(FLOPs / (chips * peak), bytes / (chips * bandwidth)).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from safework.plan.topology import Topology

SPARE = 0.10   # the planner's goal: every program leaves at least this fraction of HBM free


@dataclasses.dataclass(frozen=True)
class ProgramCost:
  """Per-device memory and whole-program work of one compiled program, and its largest arguments by name (to say
  what to shrink)."""
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  resident_bytes: int        # held in HBM while the program runs, not its arguments (optimizer state, judges, ...)
  flops: float
  bytes_accessed: float
  largest: tuple[tuple[str, int], ...] = ()   # (argument name, bytes per device), largest first

  @property
  def total_bytes(self) -> int:
    """Peak HBM while the program runs: arguments + outputs + temporaries (donated outputs counted once) + what
    stays resident beside it."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.resident_bytes

  def roofline_s(self, topology: Topology) -> float:
    chips = topology.chips
    return max(self.flops / (chips * topology.chip.peak_flops),
               self.bytes_accessed / (chips * topology.chip.hbm_bandwidth))

  def to_json(self) -> dict:
    return {"argument_bytes": self.argument_bytes, "output_bytes": self.output_bytes, "temp_bytes": self.temp_bytes,
            "resident_bytes": self.resident_bytes, "total_bytes": self.total_bytes, "flops": self.flops, "bytes_accessed": self.bytes_accessed}


@dataclasses.dataclass(frozen=True)
class Plan:
  stage: str
  topology: Topology
  hbm_bytes_per_device: int
  devices: int
  mesh: dict[str, int]
  programs: dict[str, ProgramCost]
  estimate: bool             # True when compiled for the CPU (GPU targets): numbers are estimates
  knobs: dict[str, str]      # program name -> the setting that sizes it

  def fits_program(self, cost: ProgramCost) -> bool:
    return cost.total_bytes <= (1 - SPARE) * self.hbm_bytes_per_device

  @property
  def fits(self) -> bool:
    return all(self.fits_program(c) for c in self.programs.values())

  def to_json(self) -> dict:
    return {"stage": self.stage, "topology": self.topology.name, "chips": self.topology.chips,
            "devices": self.devices, "mesh": self.mesh, "hbm_bytes_per_chip": self.topology.chip.hbm_bytes,
            "hbm_bytes_per_device": self.hbm_bytes_per_device, "estimate": self.estimate, "fits": self.fits,
            "programs": {name: cost.to_json() for name, cost in self.programs.items()}}

  def write_json(self, path: str | Path) -> None:
    Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

  def table(self) -> str:
    gb = lambda n: f"{n / 1e9:8.2f}"
    head = (f"{self.stage} on {self.topology.name} ({self.topology.chips} chips, {self.devices} devices, mesh "
            f"{self.mesh}); HBM {self.hbm_bytes_per_device / 1e9:.1f} GB per device"
            + (" -- ESTIMATE: compiled for the CPU, not the target" if self.estimate else ""))
    w = max(8, *(len(name) + 1 for name in self.programs))
    rows = [head, f"{'program':<{w}}{'args GB':>9}{'out GB':>9}{'temp GB':>9}{'resid GB':>9}{'total GB':>9}"
                  f"{'% HBM':>7}{'TFLOP':>11}{'TB moved':>10}{'roofline s':>11}"]
    for name, c in self.programs.items():
      share = 100 * c.total_bytes / self.hbm_bytes_per_device
      rows.append(f"{name:<{w}}{gb(c.argument_bytes)} {gb(c.output_bytes)} {gb(c.temp_bytes)} "
                  f"{gb(c.resident_bytes)} {gb(c.total_bytes)}{share:6.0f}%{c.flops / 1e12:11.1f}"
                  f"{c.bytes_accessed / 1e12:10.3f}{c.roofline_s(self.topology):11.3f}")
    rows.append(self.verdict())
    return "\n".join(rows)

  def verdict(self) -> str:
    """One line: fits with the least headroom, or what does not fit, its largest buffers and the knob to turn."""
    budget = (1 - SPARE) * self.hbm_bytes_per_device
    if self.fits:
      name, worst = max(self.programs.items(), key=lambda kv: kv[1].total_bytes)
      return (f"FITS: every program leaves >= {SPARE:.0%} of HBM free (tightest: {name}, "
              f"{100 * worst.total_bytes / self.hbm_bytes_per_device:.0f}% of HBM)")
    problems = []
    for name, cost in self.programs.items():
      if cost.total_bytes > budget:
        largest = ", ".join(f"{arg} {n / 1e9:.2f} GB" for arg, n in cost.largest[:3])
        problems.append(f"{name} needs {cost.total_bytes / 1e9:.2f} GB > {budget / 1e9:.2f} GB "
                        f"(temporaries {cost.temp_bytes / 1e9:.2f} GB; largest arguments: {largest}); "
                        f"turn {self.knobs.get(name, 'the mesh (more chips)')}")
    return "DOES NOT FIT: " + "; ".join(problems)


"""Several hosts, one program: joining `jax.distributed`, agreeing, and reading the data in shares.

Every host runs the same Python program (SPMD). Host-side logic (prompt rendering, reward scoring, advantages)
is replicated: every host holds the same host arrays, so the jitted programs see identical inputs and each host
transfers only the shards its own devices hold. What is split is the reading: each host reads its share of a
batch's rows from disk (I/O and image decoding), and the shares are exchanged (`read_shared`).

Off TPU the coordinator comes from the environment (`JAX_COORDINATOR_ADDRESS`, `SAFEWORK_NUM_PROCESSES`,
`SAFEWORK_PROCESS_ID`); on a TPU pod slice JAX finds it itself. CPU processes talk through gloo.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any, Callable, Sequence, TypeVar

import jax
import numpy as np

T = TypeVar("T")
ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "SAFEWORK_NUM_PROCESSES", "SAFEWORK_PROCESS_ID"


def initialize_from_env() -> None:
  """Joins `jax.distributed` when SAFEWORK_DISTRIBUTED=1 (before anything touches the devices)."""
  if os.environ.get("SAFEWORK_DISTRIBUTED") != "1":
    return
  address = os.environ.get(ENV_ADDRESS)
  if not address:   # a TPU pod slice: JAX reads the slice's metadata
    jax.distributed.initialize()
    return
  missing = [name for name in (ENV_COUNT, ENV_ID) if not os.environ.get(name)]
  if missing:
    raise ValueError(f"{ENV_ADDRESS}={address} is set but {missing} are not: off TPU every process needs the "
                     f"number of processes and its own id (0 .. n-1)")
  count, index = int(os.environ[ENV_COUNT]), int(os.environ[ENV_ID])
  if not 0 <= index < count:
    raise ValueError(f"{ENV_ID}={index} is outside 0 .. {ENV_COUNT} - 1 = {count - 1}")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")   # CPU hosts: collectives over TCP
  jax.distributed.initialize(address, num_processes=count, process_id=index)


def is_main() -> bool:
  """Process 0 writes what all processes share (metrics, reports, lock and config files)."""
  return jax.process_index() == 0


def host_array(x: Any) -> np.ndarray:
  """A device array as a host array on every process (gathered when other hosts hold some of its shards)."""
  if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def all_agree(flag: bool) -> bool:
  """Whether `flag` holds on every process (a blocking collective; keep it out of the step loop)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray(bool(flag)))))


def wait_for_all() -> None:
  """A barrier: returns when every process has reached it (e.g. after process 0 wrote files all will read)."""
  all_agree(True)


def share(count: int, process: int | None = None, processes: int | None = None) -> range:
  """This process's contiguous share of `count` items (the first `count % processes` shares are one larger)."""
  process = jax.process_index() if process is None else process
  processes = jax.process_count() if processes is None else processes
  base, extra = divmod(count, processes)
  start = process * base + min(process, extra)
  return range(start, start + base + (process < extra))


def read_shared(count: int, read: Callable[[int], T], encode: Callable[[T], dict[str, Any]] | None = None,
                decode: Callable[[dict[str, Any]], T] | None = None) -> list[T]:
  """Items `read(0) .. read(count - 1)` on every process; each process reads only its share.

  With several processes, items travel as `encode(item)`: a dict of JSON values and numpy arrays (no pickle),
  rebuilt with `decode`.
  """
  if jax.process_count() == 1:
    return [read(i) for i in range(count)]
  if encode is None or decode is None:
    raise ValueError("reading in shares across processes needs encode/decode for the items")
  local = [encode(read(i)) for i in share(count)]
  gathered = []
  for payload in _allgather_bytes(_pack(local)):
    gathered.extend(decode(item) for item in _unpack(payload))
  return gathered


def _pack(items: Sequence[dict[str, Any]]) -> bytes:
  arrays, header = {}, []
  for i, item in enumerate(items):
    entry = {}
    for key, value in item.items():
      if isinstance(value, np.ndarray):
        arrays[f"{i}/{key}"] = value
        entry[key] = {"__array__": f"{i}/{key}"}
      elif isinstance(value, (list, tuple)) and value and all(isinstance(v, np.ndarray) for v in value):
        names = [f"{i}/{key}/{j}" for j in range(len(value))]
        arrays.update(zip(names, value))
        entry[key] = {"__arrays__": names}
      else:
        entry[key] = value
    header.append(entry)
  buffer = io.BytesIO()
  np.savez(buffer, __header__=np.frombuffer(json.dumps(header).encode(), np.uint8), **arrays)
  return buffer.getvalue()


def _unpack(payload: bytes) -> list[dict[str, Any]]:
  with np.load(io.BytesIO(payload), allow_pickle=False) as data:
    header = json.loads(data["__header__"].tobytes().decode())
    out = []
    for entry in header:
      item = {}
      for key, value in entry.items():
        if isinstance(value, dict) and "__array__" in value:
          item[key] = data[value["__array__"]]
        elif isinstance(value, dict) and "__arrays__" in value:
          item[key] = [data[name] for name in value["__arrays__"]]
        else:
          item[key] = value
      out.append(item)
  return out


def _allgather_bytes(payload: bytes) -> list[bytes]:
  """Every process's payload, in process order (two collectives: the sizes, then the padded bytes)."""
  from jax.experimental import multihost_utils
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([len(payload)], np.int64))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:len(payload)] = np.frombuffer(payload, np.uint8)
  table = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [table[p, :int(n)].tobytes() for p, n in enumerate(sizes)]

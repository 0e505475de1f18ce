"""Per-layer rematerialisation policies, selected by name from experiment configs."""

from __future__ import annotations

import flax.linen as nn
import jax

REMAT_POLICIES = {
    "none": None,   # keep every activation (fastest, most memory)
    "full": jax.checkpoint_policies.nothing_saveable,   # recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.dots_saveable,   # keep matmul outputs, recompute elementwise ops
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,   # keep weight matmuls only
}


def remat_module(module_cls: type[nn.Module], policy: str, in_scan: bool = False,
                 static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
  """`module_cls` wrapped in `nn.remat` with the named policy ('none' returns it unchanged).

  Inside a scan the loop already keeps XLA from merging the recomputation with the forward pass, so CSE
  prevention (which costs fusion) is off there. `static_argnums` count `self` as 0 (flax's convention).
  """
  if policy not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {policy!r}; choose one of {sorted(REMAT_POLICIES)}")
  if policy == "none":
    return module_cls
  return nn.remat(module_cls, policy=REMAT_POLICIES[policy], prevent_cse=not in_scan, static_argnums=static_argnums)

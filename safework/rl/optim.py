"""The optimizer: AdamW with warmup + cosine decay, global-norm clipping, and frozen parameter prefixes."""

from __future__ import annotations

import dataclasses

import jax
import optax
from flax import traverse_util


@dataclasses.dataclass(frozen=True)
class OptimSettings:
  """Defaults follow the paper's 7B scripts: lr 1e-6, 3% warmup, cosine to 0.1x, AdamW (0.9, 0.95), wd 0.01."""
  learning_rate: float = 1e-6
  warmup_fraction: float = 0.03
  final_lr_fraction: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.01
  grad_clip: float = 1.0
  freeze_prefixes: tuple[str, ...] = ("visual",)   # parameter paths ("visual", "visual/merger", "decoder", ...)

  @property
  def vision_trainable(self) -> bool:
    """False when the whole vision tower is frozen: its features are then computed outside the gradient."""
    return not any(p.rstrip("/") == "visual" for p in self.freeze_prefixes)


def schedule(settings: OptimSettings, total_steps: int) -> optax.Schedule:
  warmup = max(1, int(round(settings.warmup_fraction * total_steps))) if settings.warmup_fraction else 0
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else settings.learning_rate, peak_value=settings.learning_rate,
      warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
      end_value=settings.learning_rate * settings.final_lr_fraction)


def _labels(params, prefixes: tuple[str, ...]):
  flat = traverse_util.flatten_dict(params, sep="/")
  frozen = lambda path: any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)
  return traverse_util.unflatten_dict({k: "frozen" if frozen(k) else "train" for k in flat}, sep="/")


def check_prefixes(params, prefixes: tuple[str, ...]) -> None:
  """Every prefix must name parameters, except one under a vision tower ("visual") of a model that has none: a
  text-only policy has no vision tower to freeze."""
  paths = list(traverse_util.flatten_dict(params, sep="/"))
  has_vision = any("visual" in p.split("/") for p in paths)
  for prefix in prefixes:
    if not has_vision and "visual" in prefix.split("/"):
      continue
    if not any(p == prefix or p.startswith(prefix.rstrip("/") + "/") for p in paths):
      raise ValueError(f"freeze prefix {prefix!r} matches no parameter; top-level names are "
                       f"{sorted({p.split('/')[0] for p in paths})}")


DECAYED = ("kernel", "embed_tokens", "lm_head")


def _decays(path) -> bool:
  last = path[-1]
  return getattr(last, "key", getattr(last, "name", None)) in DECAYED


def make_optimizer(settings: OptimSettings, total_steps: int, params) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW on trainable parameters (decay on weight matrices and embeddings, not on norms
  and biases, whatever their rank: scanned layers stack them); frozen ones get no update."""
  check_prefixes(params, settings.freeze_prefixes)
  decay_mask = lambda tree: jax.tree_util.tree_map_with_path(lambda path, _: _decays(path), tree)
  adamw = optax.adamw(schedule(settings, total_steps), b1=settings.b1, b2=settings.b2, eps=settings.eps,
                      weight_decay=settings.weight_decay, mask=decay_mask)
  train = optax.chain(optax.clip_by_global_norm(settings.grad_clip), adamw)
  return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()},
                               _labels(params, settings.freeze_prefixes))

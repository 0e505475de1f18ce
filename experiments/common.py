"""Shared pieces of the SafeLadder experiment files: variants, meshes, the paper's hyperparameters."""

import ml_collections

from safework import sharding

VARIANTS = ("tiny", "3b", "7b", "32b", "72b")

# Meshes for TPU pod slices (v5p: 4 chips per host): FSDP across the slice, tensor parallelism for the large ones.
MESHES = {
    "tiny": dict(data=-1, fsdp=1, tensor=1),
    "3b": dict(data=-1, fsdp=8, tensor=1),
    "7b": dict(data=-1, fsdp=16, tensor=1),
    "32b": dict(data=-1, fsdp=32, tensor=4),
    "72b": dict(data=-1, fsdp=64, tensor=4),
}

# safework_r1.md section 2: the 7B scripts' optimisation (the 72B run is not public; the same recipe).
PAPER_OPTIM = dict(learning_rate=1e-6, warmup_fraction=0.03, final_lr_fraction=0.1, b1=0.9, b2=0.95, eps=1e-8,
                   weight_decay=0.01, grad_clip=1.0, freeze_prefixes=["visual"])
PAPER_ROLLOUT = dict(prompts_per_rollout=128, samples_per_prompt=8, max_new_tokens=8192, temperature=1.0, top_p=1.0,
                     top_k=None, max_prompt_length=8192, stop_strings=[], advantage="group_zscore",
                     length_lambda=0.5, length_alpha=1.0, length_beta=0.0, length_scale=None, old_logprobs="sampler",
                     minibatch_size=128,
                     epochs=1, image_multiple=8)
PAPER_TRAIN = dict(micro_batch_size=8, logprob_chunk=1024, nan_policy="skip", checkpoint_every=20, keep_checkpoints=3,
                   async_checkpoints=True, progress_bar=True)


def validate_variant(variant: str) -> str:
  if variant not in VARIANTS:
    raise ValueError(f"variant={variant!r}; choose one of {VARIANTS}")
  return variant


def base(variant: str, job: str, init: str | None) -> ml_collections.ConfigDict:
  """Job, seed, mesh, sharding rules and the starting policy (a checkpoint path, or the preset from scratch)."""
  config = ml_collections.ConfigDict()
  config.job = job
  config.seed = 0
  config.mesh = dict(MESHES[validate_variant(variant)])
  config.sharding_rules = [list(rule) for rule in sharding.DEFAULT_RULES]
  dtype = "float32" if variant == "tiny" else "bfloat16"
  config.model = dict(preset=variant, checkpoint=init, dtype=dtype, param_dtype="float32",
                      remat="none" if variant == "tiny" else "full", min_pixels=56 * 56,
                      max_pixels=28 * 28 * (64 if variant == "tiny" else 1280))
  return config


def user_data(manual_dir: str | None, labels) -> dict:
  """Prompts from the user's files (train/validation/test .jsonl/.csv; see safework.data.user_builders)."""
  return dict(manual_dir=manual_dir, split="train", labels=list(labels))

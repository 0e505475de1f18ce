"""Shared pieces of the SafeLadder experiment files: variants, meshes, where the paper's settings differ from
the settings' own defaults (which are the paper's 7B scripts: `OptimSettings`, `RolloutSettings`, ...)."""

import ml_collections

from safework import sharding
from safework.experiment import section
from safework.policy import PolicySettings
from safework.training import TrainSettings

# Qwen2.5-VL sizes (the paper's SafeWork-R1 and -7B), and the paper's other backbones: the variant is the model
# preset (safework.models.presets), planned on the slice of the Qwen2.5-VL size it matches.
SIZE_OF = {"tiny": "tiny", "3b": "3b", "7b": "7b", "32b": "32b", "72b": "72b",
           "internvl3_8b": "7b", "internvl3_78b": "72b", "r1_distill_llama_8b": "7b", "r1_distill_qwen_7b": "7b",
           "r1_distill_qwen_32b": "32b", "r1_distill_llama_70b": "72b"}
VARIANTS = tuple(SIZE_OF)

# Meshes for TPU pod slices (v5p: 4 chips per host): FSDP across the slice, tensor parallelism for the large ones.
_SIZE_MESHES = {
    "tiny": dict(data=-1, fsdp=1, tensor=1),
    "3b": dict(data=-1, fsdp=8, tensor=1),
    "7b": dict(data=-1, fsdp=16, tensor=1),
    "32b": dict(data=-1, fsdp=32, tensor=4),
    "72b": dict(data=-1, fsdp=64, tensor=4),
}
MESHES = {variant: _SIZE_MESHES[size] for variant, size in SIZE_OF.items()}

# The slice each variant's experiments are planned for and run on (python -m safework.plan checks they fit).
_SIZE_TOPOLOGIES = {"3b": "v5p-16", "7b": "v5p-32", "32b": "v5p-256", "72b": "v5p-512"}
TOPOLOGIES = {variant: _SIZE_TOPOLOGIES[size] for variant, size in SIZE_OF.items() if size != "tiny"}

# The paper's reward models by shape (SafeWork-RM-Safety-7B, -Value-72B, -Knowledge-72B): what the planner plans
# for until the experiment names the checkpoints.
JUDGE_PRESETS = {"safety": "7b", "value": "72b", "knowledge": "72b"}

# safework_r1.md section 2: prompts and responses up to 8192 tokens (RolloutSettings' defaults are shorter).
# Generation runs 16 prompts (128 rows) at a time from a bf16 copy of the policy: with the paper's lengths the
# whole rollout at once would need ~620 GB of KV cache at 3B (python -m safework.plan; benchmarks/PLAN.md).
# Training rows keep 1024 * 2^k response columns (the rollout's longest rounded up), not all 8192.
PAPER_ROLLOUT = dict(max_new_tokens=8192, max_prompt_length=8192, generation_prompts=16, sampling_dtype="bfloat16",
                     compaction_levels=3, response_bucket=1024)


def validate_variant(variant: str) -> str:
  if variant not in VARIANTS:
    raise ValueError(f"variant={variant!r}; choose one of {VARIANTS}")
  return variant


def paper_train(**changes) -> ml_collections.ConfigDict:
  """The loop settings of the paper-scale runs: micro-batches of 8, long log-prob chunks, a checkpoint every 20."""
  return section(TrainSettings, **{"micro_batch_size": 8, "logprob_chunk": 1024, "checkpoint_every": 20, **changes})


def base(variant: str, init: str | None) -> ml_collections.ConfigDict:
  """Job, seed, mesh, sharding rules and the starting policy (a checkpoint path, or the preset from scratch)."""
  config = ml_collections.ConfigDict()
  config.job = "train"
  config.seed = 0
  config.topology = TOPOLOGIES.get(variant, "")
  config.mesh = dict(MESHES[validate_variant(variant)])
  config.sharding_rules = [list(rule) for rule in sharding.DEFAULT_RULES]
  tiny = variant == "tiny"
  # Splash attention: the paper's slices are TPUs (on GPUs set model.attention=dot_product, cuDNN's kernel).
  config.model = section(PolicySettings, preset=variant, checkpoint=init, dtype="float32" if tiny else "bfloat16",
                         remat="none" if tiny else "full", attention="einsum" if tiny else "splash",
                         max_pixels=28 * 28 * (64 if tiny else 1280))
  return config


def user_data(manual_dir: str | None) -> dict:
  """Prompts from the user's files (train/validation/test .jsonl/.csv; see safework.data.user_builders)."""
  return dict(manual_dir=manual_dir, split="train")


def judge(path: str | None, name: str, model: str) -> dict:
  """A verifier section: the judge checkpoint `path` (of the paper's reward model `model`, see JUDGE_PRESETS)
  scoring with judge prompt `name`, in bf16 (judges only infer)."""
  return dict(path=path or None, judge=name, head="verdict", batch_size=16, dtype="bfloat16",
              preset=JUDGE_PRESETS[model])

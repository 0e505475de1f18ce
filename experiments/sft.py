r"""SafeLadder stage 1, CoT-SFT: supervised fine-tuning on `<think> ... </think> answer` traces.

  python -m safework.main --config experiments/sft.py:variant=7b,init=/ckpt/Qwen2.5-VL-7B-Instruct,data=/data/sft \
      --workdir /runs/sft_7b

`data` holds train.jsonl rows with `prompt`, `images`, `response` (the trace). The tiny variant is the stage as the
tiny ladder runs it (experiments/tiny_safeladder.py).
"""

import ml_collections

from experiments import common
from safework.experiment import parse_arg


def stage(variant: str, runlocal: bool = False) -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.kind = "sft"
  if variant == "tiny":
    s.sft = dict(steps=200, batch_size=12 if runlocal else 32, micro_batch_size=None, prompt_length=80,
                 response_length=48, logprob_chunk=64, image_multiple=8, checkpoint_every=100, keep_checkpoints=1,
                 progress_bar=True)
    s.optim = dict(learning_rate=3e-3, warmup_fraction=0.05, final_lr_fraction=0.1, weight_decay=0.01, grad_clip=1.0,
                   freeze_prefixes=[])
  else:
    s.sft = dict(steps=2000, batch_size=128, micro_batch_size=8, prompt_length=4096, response_length=4096,
                 logprob_chunk=1024, image_multiple=8, checkpoint_every=200, keep_checkpoints=3, progress_bar=True)
    s.optim = dict(common.PAPER_OPTIM, learning_rate=1e-5, freeze_prefixes=["visual"])
  return s


def get_config(arg=None):
  arg = parse_arg(arg, variant="tiny", runlocal=False, init="", data="")
  config = common.base(arg.variant, "sft", arg.init or None)
  config.data = common.user_data(arg.data or None, ())
  config.update(stage(arg.variant, arg.runlocal))
  return config

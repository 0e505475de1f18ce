r"""SafeLadder stage 1, CoT-SFT: supervised fine-tuning on `<think> ... </think> answer` traces.

  python -m safework.main --config experiments/sft.py:variant=7b,init=/ckpt/Qwen2.5-VL-7B-Instruct,data=/data/sft \
      --workdir /runs/sft_7b

`data` holds train.jsonl rows with `prompt`, `images`, `response` (the trace). The policy is written to
`WORKDIR/policy`. The tiny variant is the stage as the tiny ladder runs it (experiments/tiny_safeladder.py).
"""

import ml_collections

from experiments import common
from safework.experiment import parse_arg, section
from safework.rl.optim import OptimSettings
from safework.sft import SFTSettings
from safework.training import TrainSettings


def stage(variant: str, runlocal: bool = False) -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.kind = "sft"
  if variant == "tiny":
    # Traces that search hold a result too (up to 63 tokens in all, ~30 of them the tool's).
    s.sft = section(SFTSettings, steps=200, batch_size=12 if runlocal else 32, prompt_length=80, response_length=64,
                    response_bucket=32)
    s.optim = section(OptimSettings, learning_rate=6e-3, warmup_fraction=0.05, freeze_prefixes=())
    s.train = section(TrainSettings, logprob_chunk=64, checkpoint_every=100, keep_checkpoints=1)
  else:
    s.sft = section(SFTSettings, steps=2000, batch_size=128, prompt_length=4096, response_length=4096,
                    response_bucket=1024)
    s.optim = section(OptimSettings, learning_rate=1e-5)
    s.train = common.paper_train(checkpoint_every=200)
  return s


def get_config(arg=None):
  arg = parse_arg(arg, variant="tiny", runlocal=False, init="", data="")
  config = common.base(arg.variant, arg.init or None)
  config.task = "user"
  config.data = common.user_data(arg.data or None)
  config.update(stage(arg.variant, arg.runlocal))
  return config

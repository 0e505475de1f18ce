"""transformers `generate` on the same shapes as `safework.bench.sampler`; prints one JSON line.

  python -m safework.bench.hf_peer PRESET BATCH GROUP PROMPT_LEN GEN_LEN DTYPE
"""

import json
import sys
import time

import numpy as np


def main(preset: str, batch: int, group: int, prompt_len: int, gen_len: int, dtype: str) -> dict:
  import torch
  import transformers
  from safework.models import get_preset
  from safework.models.config import to_hf_dict

  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch_dtype = getattr(torch, dtype)
  config = transformers.Qwen2_5_VLConfig(**to_hf_dict(get_preset(preset)))
  with torch.device(device):
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).to(torch_dtype).eval()
  cfg = get_preset(preset)
  ids = torch.from_numpy(np.random.default_rng(0).integers(10, min(cfg.text.vocab_size, 150000),
                                                           (batch, prompt_len))).to(device)
  mask = torch.ones_like(ids)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def timed(fn, repeats=3):
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
      start = time.perf_counter()
      fn()
      sync()
      best = min(best, time.perf_counter() - start)
    return best

  with torch.no_grad():
    prefill_s = timed(lambda: model(input_ids=ids, attention_mask=mask, logits_to_keep=1))
    # generate(num_return_sequences=G) prefills every one of the G copies of a prompt: that is prefill, not decode.
    grouped = ids.repeat_interleave(group, dim=0)
    group_prefill_s = timed(lambda: model(input_ids=grouped, attention_mask=torch.ones_like(grouped),
                                          logits_to_keep=1))
    total_s = timed(lambda: model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                                           top_p=1.0, top_k=0, num_return_sequences=group, max_new_tokens=gen_len,
                                           min_new_tokens=gen_len, repetition_penalty=1.0, pad_token_id=0))
  rows = batch * group
  return {"prefill_tokens_per_s": batch * prompt_len / prefill_s, "group_prefill_s": group_prefill_s,
          "decode_tokens_per_s": rows * gen_len / max(total_s - group_prefill_s, 1e-9), "device": device}


if __name__ == "__main__":
  preset, batch, group, prompt_len, gen_len, dtype = sys.argv[1:7]
  print(json.dumps(main(preset, int(batch), int(group), int(prompt_len), int(gen_len), dtype)))

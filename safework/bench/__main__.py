"""Benchmarks: `python -m safework.bench {sampler,train,verifiers} [flags]`.

Each prints one JSON object per measured configuration: throughput, ratios to the measured roofline of the
device, and, where PyTorch is installed, the same run of the transformers peer.
"""

import argparse
import importlib.util
import json


def main() -> None:
  parser = argparse.ArgumentParser(prog="python -m safework.bench")
  sub = parser.add_subparsers(dest="bench", required=True)
  sampler = sub.add_parser("sampler", help="prefill/decode tokens/s of the on-device sampler")
  sampler.add_argument("--preset", default="tiny")
  sampler.add_argument("--batch", type=int, default=4)
  sampler.add_argument("--group", type=int, default=2)
  sampler.add_argument("--prompt_len", type=int, default=64)
  sampler.add_argument("--gen_len", type=int, default=64)
  sampler.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  sampler.add_argument("--no_peer", action="store_true", help="skip the transformers generate peer")
  sampler.add_argument("--case", default="throughput", choices=["throughput", "cache_cost", "ragged"],
                       help="throughput (vs transformers); decode step cost vs reserved cache; ragged row lengths")
  train = sub.add_parser("train", help="tokens/s and MFU of the RL train step; rollout/train split")
  train.add_argument("--preset", default="tiny")
  train.add_argument("--batch", type=int, default=16)
  train.add_argument("--micro_batch", type=int, default=8)
  train.add_argument("--prompt_len", type=int, default=64)
  train.add_argument("--gen_len", type=int, default=64)
  train.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  train.add_argument("--remat", default="none", choices=["none", "full", "dots", "dots_no_batch"])
  verifiers = sub.add_parser("verifiers", help="verdict-head scoring vs decoding the verdict")
  verifiers.add_argument("--preset", default="tiny")
  verifiers.add_argument("--batch", type=int, default=16)
  verifiers.add_argument("--prompt_len", type=int, default=128)
  verifiers.add_argument("--verdict_tokens", type=int, default=8)
  verifiers.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  args = parser.parse_args()

  from safework.bench import roofline
  import jax.numpy as jnp
  ceilings = roofline.measure(jnp.dtype(args.dtype))
  print(json.dumps({"ceilings": {"device": ceilings.device, "bandwidth_GBps": ceilings.bandwidth / 1e9,
                                 "matmul_TFLOPs": ceilings.matmul_rate / 1e12}}))
  if args.bench == "sampler":
    from safework.bench import sampler as bench
    if args.case == "cache_cost":
      print(json.dumps(bench.cache_cost(args.preset, args.batch, args.prompt_len, args.gen_len, args.dtype)))
      return
    if args.case == "ragged":
      print(json.dumps(bench.ragged(args.preset, args.batch, args.prompt_len, args.dtype)))
      return
    shape = (args.preset, args.batch, args.group, args.prompt_len, args.gen_len, args.dtype)
    result = bench.run(*shape, ceilings=ceilings)
    if not args.no_peer and importlib.util.find_spec("torch") is not None:
      peer = bench.transformers_peer(*shape)
      if peer:
        result["transformers"] = peer
        result["speedup_vs_transformers"] = result["decode_tokens_per_s"] / peer["decode_tokens_per_s"]
    print(json.dumps(result))
  elif args.bench == "train":
    from safework.bench import train as bench
    print(json.dumps(bench.run(args.preset, args.batch, args.prompt_len, args.gen_len, args.dtype, args.remat,
                               args.micro_batch, ceilings)))
  elif args.bench == "verifiers":
    from safework.bench import verifiers as bench
    print(json.dumps(bench.run(args.preset, args.batch, args.prompt_len, args.verdict_tokens, args.dtype, ceilings)))


if __name__ == "__main__":
  main()

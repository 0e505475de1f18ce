r"""SafeLadder stage 4, deliberative-search RL: the policy searches a local corpus while it reasons, answers with a
stated confidence, and is trained for correctness under a bound on confidently wrong answers.

  python -m safework.main --config experiments/deliberative_search.py:variant=7b,init=/runs/efficient_7b/policy,\
corpus=/data/wiki_passages.jsonl,data=/data/search_qa --workdir /runs/search_7b

`corpus` is a JSONL of {"id", "title", "text"} documents (indexed once with BM25 into WORKDIR/search_index);
`data` holds train.jsonl rows labelled `search` with a `prompt` and a gold `answer`. The policy calls
`<search>query</search>` or `<read>id</read>` in its reasoning and gets `<result>...</result>` back (up to
`tools.max_calls` times; result tokens are context, never trained on), then ends its answer with
`<confidence>p</confidence>`. The reward is correctness (the boxed answer against the gold one, or the knowledge
verifier's verdict with `knowledge_verifier=`) plus the confidence's format, minus lambda x false-certain; lambda
rises by dual ascent while more than `constraint.target` of the answers are wrong with confidence above
`constraint.threshold` (safework_r1.md, stage 4; the choices where the paper is silent are written there).
"""

import ml_collections

from experiments import common, m3rl_kg
from safework.data import tiny_suite
from safework.experiment import parse_arg, section
from safework.rewards.constraint import ConstraintSettings
from safework.tools.calls import ToolSettings


def stage(variant: str, runlocal: bool = False, corpus: str = "", correctness: str = "math_rule"
          ) -> ml_collections.ConfigDict:
  recipes = {"search": [[correctness, 1.0], ["confidence_format", 0.25]]}
  if variant == "tiny":
    # The tiny suite's questions about invented towns, its corpus (an empty corpus: the suite's own), one document
    # per search as in its traces.
    s = m3rl_kg.tiny_rl(rollouts=2 if runlocal else 8, loss="cpgd")
    if runlocal:
      s.rollout.prompts_per_rollout = 8
    s.tools = section(ToolSettings, corpus=corpus, max_calls=2, results=tiny_suite.SEARCH_RESULTS, result_tokens=48,
                      query_chars=64, chunk_tokens=64)
    s.constraint = section(ConstraintSettings, labels=("search",), correctness=correctness, target=0.05,
                           threshold=0.7, step_size=2.0)
    s.reward = dict(format_weight=1.0, recipes=recipes)
    s.optim.learning_rate = 2e-4   # the last stage: learn to search without unlearning the others
    return s
  s = m3rl_kg.stage(variant)
  s.loss.policy_loss = "cpgd"
  s.rollout.num_rollouts = 50
  s.tools = section(ToolSettings, corpus=corpus, max_calls=4, results=3, result_tokens=512, query_chars=200,
                    chunk_tokens=256)
  s.constraint = section(ConstraintSettings, labels=("search",), correctness=correctness)
  s.reward.recipes = recipes
  return s


def get_config(arg=None):
  arg = parse_arg(arg, variant="tiny", runlocal=False, init="", corpus="", data="", knowledge_verifier="")
  correctness = "knowledge" if arg.knowledge_verifier else "math_rule"
  config = common.base(arg.variant, arg.init or None)
  config.update(stage(arg.variant, arg.runlocal, arg.corpus, correctness))
  config.task = "user"
  config.data = common.user_data(arg.data or None)
  if arg.knowledge_verifier:
    config.reward.verifiers = {"knowledge": common.judge(arg.knowledge_verifier, "knowledge", "knowledge")}
  return config

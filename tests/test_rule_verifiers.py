"""Rule verifiers on a table of tricky cases, and label-gated reward recipes."""

import numpy as np
import pytest

from safework.data.example import Example
from safework.verifiers import rules
from safework.verifiers.math_equivalence import last_boxed, math_equal
from safework.verifiers.recipes import PAPER_RECIPES, RecipeReward, rule_scorer


@pytest.mark.parametrize("response,ok", [
    ("<think>add them</think> 4", True),
    ("<think>\nmulti\nline\n</think>\n\nThe answer is 4.", True),
    ("<think></think> 4", False),                      # empty think block
    ("<think>reasoning</think>   ", False),            # empty answer
    ("The answer is 4.", False),                       # no think block
    ("<think>unclosed reasoning 4", False),
    ("preamble <think>x</think> 4", False),            # must start with the think block
    ("<think>a</think><think>b</think> 4", True),      # several blocks: the answer follows the last
])
def test_format(response, ok):
  assert rules.format_ok(response) == float(ok)


@pytest.mark.parametrize("response,gold,correct", [
    ("<think>x</think> \\boxed{\\frac{1}{2}}", "0.5", True),
    ("<think>x</think> \\boxed{\\frac{\\sqrt{4}}{4}}", "1/2", True),            # nested braces
    ("<think>x</think> first \\boxed{3} then \\boxed{4}", "4", True),          # several boxed: the last counts
    ("<think>\\boxed{4}</think> so \\boxed{5}", "4", False),                    # boxed inside think is not the answer
    ("<think>x</think> \\boxed{12 \\text{ cm}}", "12", True),                   # units
    ("<think>x</think> \\boxed{ 1 , 000 }", "1000", True),                      # spacing and separators
    ("<think>x</think> \\boxed{x = -\\dfrac{3}{4}}", "-0.75", True),
    ("<think>x</think> \\boxed{(2, 3)}", "(2,3)", True),
    ("<think>x</think> \\boxed{(3, 2)}", "(2,3)", False),
    ("<think>x</think> \\boxed{0.333}", "\\frac{1}{3}", True),                 # numeric tolerance of a rounded decimal
    ("<think>x</think> \\boxed{0.34}", "\\frac{1}{3}", False),
    ("<think>x</think> \\boxed{}", "0", False),                                 # empty answer
    ("<think>x</think> 4", "4", False),                                         # no boxed answer
    ("<think>x</think> \\boxed{\\pi}", "3.1416", True),
    ("<think>x</think> \\boxed{2\\frac{1}{2}}", "\\frac{5}{2}", True),          # mixed number
    # Plain numbers must be equal: a gold answer with fewer decimals is no tolerance a policy can exploit.
    ("<think>x</think> \\boxed{0.46}", "0.5", False),
    ("<think>x</think> \\boxed{2.96}", "3.0", False),
    ("<think>x</think> \\boxed{10001}", "10000", False),
    ("<think>x</think> \\boxed{0.50}", "0.5", True),
    ("<think>x</think> \\boxed{3}", "3.0", True),
    ("<think>x</think> \\boxed{3}", "\\pi", False),                                  # no rounding to 0 places
    ("<think>x</think> \\boxed{3.14}", "\\pi", True),
    ("<think>x</think> \\boxed{1.41}", "\\sqrt{2}", True),
    ("<think>x</think> \\boxed{1.42}", "\\sqrt{2}", False),
    ("<think>x</think> \\boxed{\\frac{\\sqrt{8}}{2}}", "\\sqrt{2}", True),          # two inexact expressions
])
def test_math_rule(response, gold, correct):
  assert rules.math_correct(response, gold) == float(correct)


def test_boxed_extraction_edge_cases():
  assert last_boxed("\\boxed{a{b}c}") == "a{b}c"
  assert last_boxed("\\boxed{unclosed") is None
  assert last_boxed("none here") is None
  assert not math_equal(None, "1") and not math_equal("1", None)


@pytest.mark.parametrize("response,refused", [
    ("<think>harmful</think> I'm sorry, but I can't help with that.", True),
    ("<think>x</think> I cannot assist with making weapons.", True),
    ("<think>x</think> As an AI, I must decline.", True),
    ("<think>I can't do this... actually I can</think> Here is the recipe for bread.", False),   # only the answer
    ("<think>x</think> Sure! Mix flour and water.", False),
    ("<think>x</think> You can't go wrong with rice.", False),
])
def test_refusal_detection(response, refused):
  assert rules.is_refusal(response) == refused


def test_length_efficiency_counts_tokens():
  assert rules.length_efficiency(10, 100, target_tokens=20) == 1.0
  assert rules.length_efficiency(60, 100, target_tokens=20) == pytest.approx(0.5)
  assert rules.length_efficiency(150, 100) == 0.0


def test_instruction_following():
  response = "<think>x</think> - apples\n- pears"
  assert rules.follows_instructions(response, {"num_bullets": 2, "lowercase": True, "must_include": ["pears"]}) == 1.0
  assert rules.follows_instructions(response, {"max_words": 2, "must_exclude": ["apples"]}) == 0.0
  with pytest.raises(ValueError, match="unknown instruction constraints"):
    rules.follows_instructions(response, {"rhyme": True})


def _const(value):
  return lambda examples, responses, lengths: np.full(len(responses), value, np.float32)


def test_recipes_gate_components_by_label():
  scorers = {name: _const(0.5) for name in ("safety", "value", "knowledge", "helpfulness", "graded_correctness")}
  scorers.update(math_rule=rule_scorer("math_rule"), instruction_following=rule_scorer("instruction_following"))
  reward = RecipeReward(scorers, PAPER_RECIPES)
  good = "<think>r</think> \\boxed{4}"
  examples = [Example("q", label="safety"), Example("q", label="knowledge_rule", answer="4"),
              Example("q", label="knowledge", answer="4"), Example("q", label="normal"),
              Example("q", label="muldimif", meta={"constraints": {"max_words": 1}})]
  out = reward(examples, [good, good, "no format", good, good], np.full(5, 10))
  # format + recipe: safety 1 + 0.5; knowledge_rule 1 + math 1 + helpfulness 0.5; knowledge 0 + 0.5 + 0.5;
  # normal 1 + helpfulness 0.5; muldimif 1 + instruction 1 + helpfulness 0.5.
  np.testing.assert_allclose(out.total, [1.5, 2.5, 1.0, 1.5, 2.5])
  np.testing.assert_array_equal(out.applicable["safety"], [True, False, False, False, False])
  np.testing.assert_array_equal(out.applicable["helpfulness"], [False, True, True, True, True])
  means = out.means()
  assert means["math_rule"] == 1.0 and means["safety"] == 0.5 and "value" not in means
  # A label without a recipe (a misspelt one) would earn the format reward alone: it is an error.
  with pytest.raises(ValueError, match=r"rows labelled \['saftey'\] have no reward recipe"):
    reward([Example("q", label="saftey")], [good], np.full(1, 10))
  with pytest.raises(ValueError, match="no scorer"):
    RecipeReward({"safety": _const(1.0)}, PAPER_RECIPES)

"""Is a `\\boxed{}` answer equal to the gold answer? LaTeX-aware normalisation, then exact arithmetic.

Both sides are normalised (spacing, `\\left`/`\\right`, `\\dfrac`, `\\text{units}`, degrees, percent, thousands
separators, a trailing period, `x =` prefixes); tuples compare element-wise; each element is parsed by a small
arithmetic parser (numbers, + - * / ^, parentheses, implicit products, \\frac, \\sqrt, \\pi, mixed numbers) and
compared exactly (rationals), up to float rounding (two irrational expressions), or, for a decimal against an
exact expression, at the decimal's own number of places. Two plain numbers must be equal: no tolerance a policy
could learn to exploit (0.46 never matches 0.5). What does not parse compares as normalised text. No `eval`.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

FLOAT_TOL = 1e-9   # two inexact expressions (roots, pi) agree up to float rounding


def last_boxed(text: str) -> str | None:
  """Contents of the last `\\boxed{...}` (or `\\fbox{...}`) with balanced braces; None if there is none."""
  start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
  if start < 0:
    return None
  brace = text.find("{", start)
  if brace < 0:
    rest = text[start + len("\\boxed"):].strip()   # "\boxed 5"
    return rest.split()[0].rstrip("$.") if rest else None
  depth = 0
  for i in range(brace, len(text)):
    if text[i] == "{":
      depth += 1
    elif text[i] == "}":
      depth -= 1
      if depth == 0:
        return text[brace + 1:i]
  return None


def _strip_command(text: str, command: str) -> str:
  """Replaces `\\command{x}` by `x` (balanced braces)."""
  while True:
    start = text.find(command + "{")
    if start < 0:
      return text
    depth, i = 0, start + len(command)
    for i in range(start + len(command), len(text)):
      depth += {"{": 1, "}": -1}.get(text[i], 0)
      if depth == 0:
        break
    text = text[:start] + text[start + len(command) + 1:i] + text[i + 1:]


def normalize(answer: str) -> str:
  s = answer.strip()
  s = s.replace("$", "").replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", "")
  s = s.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
  s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("°", "").replace("\\%", "").replace("%", "")
  s = re.sub(r"\\text\{\s*(cm|m|km|kg|g|mg|s|h|min|degrees?|units?|dollars?|cents?|meters?|inches|feet|ft)\s*\}", "", s)
  for command in ("\\text", "\\textbf", "\\mathrm", "\\mathbf", "\\boxed"):
    s = _strip_command(s, command)
  s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)           # "x = 5" -> "5"
  s = s.replace("\\cdot", "*").replace("\\times", "*").replace("\\div", "/")
  s = re.sub(r"\s+", "", s).rstrip(".")
  if not re.fullmatch(r"[(\[{].*[)\]}]", s):        # not a tuple: 1,000 -> 1000
    s = re.sub(r"(\d),(?=\d{3}(?!\d))", r"\1", s)
  return s


class _Parser:
  """Recursive descent over a normalised expression; raises ValueError when it is not arithmetic."""

  def __init__(self, text: str):
    self.tokens = re.findall(r"\d+\.\d*|\.\d+|\d+|\\frac|\\sqrt|\\pi|[-+*/^(){}]|\S", text)
    self.i = 0

  def parse(self):
    value = self.sum()
    if self.i != len(self.tokens):
      raise ValueError(f"unexpected {self.tokens[self.i]!r}")
    return value

  def peek(self):
    return self.tokens[self.i] if self.i < len(self.tokens) else None

  def take(self, expected=None):
    token = self.peek()
    if token is None or (expected is not None and token != expected):
      raise ValueError(f"expected {expected!r}, got {token!r}")
    self.i += 1
    return token

  def sum(self):
    value = self.product()
    while self.peek() in ("+", "-"):
      value = value + self.product() if self.take() == "+" else value - self.product()
    return value

  def product(self):
    value = self.power()
    while self.peek() in ("*", "/") or self._starts_atom():
      op = self.take() if self.peek() in ("*", "/") else "*"   # implicit product: 2\pi, 3\sqrt{2}
      rhs = self.power()
      value = value * rhs if op == "*" else value / rhs
    return value

  def _starts_atom(self):
    token = self.peek()
    return token is not None and (token in ("(", "\\frac", "\\sqrt", "\\pi") or token[0].isdigit() or token[0] == ".")

  def power(self):
    base = self.unary()
    if self.peek() == "^":
      self.take()
      exponent = self.unary()
      if isinstance(exponent, Fraction) and exponent.denominator == 1 and abs(exponent) < 64:
        return Fraction(base) ** int(exponent) if isinstance(base, Fraction) else base ** int(exponent)
      return float(base) ** float(exponent)
    return base

  def unary(self):
    if self.peek() in ("-", "+"):
      return -self.unary() if self.take() == "-" else self.unary()
    return self.atom()

  def group(self):
    opener = self.take()
    if opener not in ("{", "("):
      raise ValueError("expected a group")
    value = self.sum()
    self.take("}" if opener == "{" else ")")
    return value

  def atom(self):
    token = self.peek()
    if token is None:
      raise ValueError("empty")
    if token == "\\frac":
      self.take()
      if self.peek() not in ("{", "("):   # \frac12
        digits = self.take()
        if not digits.isdigit() or len(digits) != 2:
          raise ValueError("bad \\frac")
        return Fraction(int(digits[0]), int(digits[1]))
      num, den = self.group(), self.group()
      return Fraction(num) / Fraction(den) if isinstance(num, Fraction) and isinstance(den, Fraction) else num / den
    if token == "\\sqrt":
      self.take()
      value = self.group() if self.peek() in ("{", "(") else self.atom()
      root = math.sqrt(float(value))
      return Fraction(int(round(root))) if abs(root - round(root)) < 1e-12 else root
    if token == "\\pi":
      self.take()
      return math.pi
    if token in ("(", "{"):
      return self.group()
    if token[0].isdigit() or token[0] == ".":
      self.take()
      value = Fraction(token)
      if self.peek() == "\\frac" and value.denominator == 1:   # a mixed number: 2\frac{1}{2}
        return value + self.atom()
      return value
    raise ValueError(f"not arithmetic: {token!r}")


def _number(text: str):
  try:
    return _Parser(text).parse()
  except (ValueError, ZeroDivisionError, OverflowError):
    return None


def _split_tuple(s: str) -> list[str]:
  if len(s) >= 2 and s[0] in "([{" and s[-1] in ")]}" and "," in s:
    return [part for part in s[1:-1].split(",")]
  return [s]


def _equal_elements(a: str, b: str) -> bool:
  if a == b:
    return True
  x, y = _number(a), _number(b)
  if x is None or y is None:
    return False
  if isinstance(x, Fraction) and isinstance(y, Fraction) and x == y:
    return True
  # A decimal rounded to k >= 1 places matches an exact expression (a fraction, a root, pi) rounded to k places:
  # 0.3333 == 1/3, 3.14 == \pi. Two plain numbers must be equal: 0.46 is not 0.5, 2.96 is not 3.0.
  for text, other_text, rounded, exact in ((a, b, x, y), (b, a, y, x)):
    places = _decimal_places(text)
    if places and not _PLAIN.fullmatch(other_text) and round(float(exact), places) == float(rounded):
      return True
  if isinstance(x, Fraction) and isinstance(y, Fraction) or _PLAIN.fullmatch(a) or _PLAIN.fullmatch(b):
    return False
  return math.isclose(float(x), float(y), rel_tol=FLOAT_TOL, abs_tol=FLOAT_TOL)   # two inexact expressions


_PLAIN = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)")


def _decimal_places(text: str) -> int:
  match = re.fullmatch(r"[-+]?\d*\.(\d+)", text)
  return len(match.group(1)) if match else 0


def math_equal(predicted: str | None, gold: str | None) -> bool:
  """Whether two final answers are the same mathematical object."""
  if predicted is None or gold is None:
    return False
  a, b = normalize(predicted), normalize(gold)
  if not a or not b:
    return False
  parts_a, parts_b = _split_tuple(a), _split_tuple(b)
  return len(parts_a) == len(parts_b) and all(_equal_elements(x, y) for x, y in zip(parts_a, parts_b))

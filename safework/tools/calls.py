"""Tool calls in the policy's reasoning: `<search>query</search>` and `<read>document id</read>`, answered by
`<result>...</result>`.

A call is recognised at the end of the text generated so far (generation pauses at a closing tag). The argument is
a plain string: a query (cut to `query_chars`) or a document id looked up in the local index, never a path. A result
is truncated to `result_tokens` tokens, its tags included, so what a tool adds to the context is bounded.
"""

from __future__ import annotations

import dataclasses
import re

from safework.tools.corpus import SearchIndex

TOOLS = ("search", "read")
CLOSING_TAGS = tuple(f"</{tool}>" for tool in TOOLS)
_CALL = re.compile(r"<(search|read)>(.*?)</\1>\s*$", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class ToolSettings:
  """`corpus`: the JSONL of documents the tool searches (indexed once into the work directory). `max_calls` per
  response (a call after those is plain text); `results` documents per search, shown as `[id] title: text`; a
  result has at most `result_tokens` tokens; a query at most `query_chars` characters. Generation runs in chunks
  of `chunk_tokens`: a row that calls no tool waits at most one chunk for those that do."""
  corpus: str = ""
  max_calls: int = 4
  results: int = 3
  result_tokens: int = 128
  query_chars: int = 200
  chunk_tokens: int = 64

  def validate(self) -> "ToolSettings":
    for name in ("max_calls", "results", "result_tokens", "query_chars", "chunk_tokens"):
      if getattr(self, name) < 1:
        raise ValueError(f"tool setting {name} must be at least 1, got {getattr(self, name)}")
    return self


def pending_call(text: str) -> tuple[str, str] | None:
  """(tool, argument) of the call the text ends with, if it ends with one."""
  match = _CALL.search(text)
  return (match.group(1), match.group(2).strip()) if match else None


def run_call(index: SearchIndex, tool: str, argument: str, settings: ToolSettings) -> str:
  """The text a call returns (untruncated): search hits or one document."""
  if tool == "search":
    hits = index.search(argument[:settings.query_chars], settings.results)
    return "\n".join(f"[{d.id}] {d.title}: {d.text}" for d in hits) if hits else "no results"
  if tool == "read":
    document = index.read(argument[:settings.query_chars])
    return f"{document.title}: {document.text}" if document else f"no document with id {argument[:80]!r}"
  raise ValueError(f"unknown tool {tool!r}; tools: {TOOLS}")


def result_tokens(tokenizer, text: str, budget: int) -> list[int]:
  """`<result>text</result>` as tokens, the text cut so that the whole fits `budget` tokens."""
  opening = tokenizer.encode("<result>", add_special_tokens=False)
  closing = tokenizer.encode("</result>", add_special_tokens=False)
  room = budget - len(opening) - len(closing)
  if room < 1:
    raise ValueError(f"tools.result_tokens={budget} cannot hold the result tags ({len(opening) + len(closing)} "
                     "tokens) and any text: raise it")
  return opening + tokenizer.encode(text, add_special_tokens=False)[:room] + closing

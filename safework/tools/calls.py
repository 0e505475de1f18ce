"""Tool calls in the policy's reasoning: `<search>query</search>` and `<read>document id</read>`, answered by
`<result>...</result>`.

A call is recognised at the end of the text generated so far (generation pauses at a closing tag). The argument is
a plain string: a query (cut to `query_chars`) or a document id looked up in the local index, never a path. A result
is truncated to `result_tokens` tokens, its tags included, so what a tool adds to the context is bounded.
"""

from __future__ import annotations

import dataclasses
import re

from safework.tools.corpus import Document, SearchIndex

TOOLS = ("search", "read")
CLOSING_TAGS = tuple(f"</{tool}>" for tool in TOOLS)
_CALL = re.compile(r"<(search|read)>(.*?)</\1>\s*$", re.DOTALL)
_RESULT = re.compile(r"<result>(.*?)</result>", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class ToolSettings:
  """`corpus`: the JSONL of documents the tool searches (indexed once into the work directory; empty: the corpus the
  stage's data brings, else none: every question brings its own documents, as the tiny suite's do). A question's
  own documents (`meta["documents"]`) are what its calls search, corpus or not. `max_calls` per response (a call after those is plain text);
  `results` documents per search, shown as `[id] title: text`; a result has at most `result_tokens` tokens; a
  query at most `query_chars` characters. Generation runs in chunks of `chunk_tokens`: a row that calls no tool
  waits at most one chunk for those that do."""
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


def format_hits(hits: list[Document]) -> str:
  """What a search returns: one `[id] title: text` line per document found."""
  return "\n".join(f"[{d.id}] {d.title}: {d.text}" for d in hits) if hits else "no results"


def run_call(index: SearchIndex, tool: str, argument: str, settings: ToolSettings) -> str:
  """The text a call returns (untruncated): search hits or one document."""
  if tool == "search":
    return format_hits(index.search(argument[:settings.query_chars], settings.results))
  if tool == "read":
    document = index.read(argument[:settings.query_chars])
    return f"{document.title}: {document.text}" if document else f"no document with id {argument[:80]!r}"
  raise ValueError(f"unknown tool {tool!r}; tools: {TOOLS}")


def _tagged(tokenizer, text_ids: list[int]) -> list[int]:
  return (tokenizer.encode("<result>", add_special_tokens=False) + text_ids +
          tokenizer.encode("</result>", add_special_tokens=False))


def result_tokens(tokenizer, text: str, budget: int) -> list[int]:
  """`<result>text</result>` as tokens, the text cut so that the whole fits `budget` tokens."""
  room = budget - len(_tagged(tokenizer, []))
  if room < 1:
    raise ValueError(f"tools.result_tokens={budget} cannot hold the result tags ({len(_tagged(tokenizer, []))} "
                     "tokens) and any text: raise it")
  return _tagged(tokenizer, tokenizer.encode(text, add_special_tokens=False)[:room])


def trace_tokens(tokenizer, trace: str) -> tuple[list[int], list[bool]]:
  """A written trace as a rollout would hold it, and which tokens a tool wrote: the policy's text and each
  `<result>...</result>` are encoded apart (as generation appends a result to what the policy wrote), so SFT on the
  trace trains the tokens the policy will emit and never the tool's."""
  ids, from_tool, start = [], [], 0
  for match in _RESULT.finditer(trace):
    own = tokenizer.encode(trace[start:match.start()], add_special_tokens=False)
    result = _tagged(tokenizer, tokenizer.encode(match.group(1), add_special_tokens=False))
    ids += own + result
    from_tool += [False] * len(own) + [True] * len(result)
    start = match.end()
  own = tokenizer.encode(trace[start:], add_special_tokens=False)
  return ids + own, from_tool + [False] * len(own)

"""Text in, text out: stop strings as token sequences, and decoding sampled rows back to strings.

On device, a row stops when its last tokens spell a stop string's tokenisation. A tokenizer may spell the same
text with other tokens in context, so the host also cuts each decoded row at the first stop string it contains.
"""

from __future__ import annotations

from typing import Sequence


from safework import distributed


def stop_sequences(tokenizer, strings: Sequence[str]) -> tuple[tuple[int, ...], ...]:
  """The token sequences of each stop string, alone and after a space (its common in-context spelling)."""
  out = []
  for s in strings:
    for variant in (s, " " + s):
      ids = tuple(tokenizer.encode(variant, add_special_tokens=False))
      if variant != s:   # keep only the tokens that spell the string itself
        ids = ids[1:] if tokenizer.decode(ids[1:]) == s else ()
      if ids and ids not in out:
        out.append(ids)
  return tuple(out)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
  """The text up to and including the first stop string, and whether one was found."""
  ends = [text.index(s) + len(s) for s in stops if s in text]
  return (text[:min(ends)], True) if ends else (text, False)


def decode_rows(tokenizer, tokens, lengths, stop_strings: Sequence[str] = (),
                skip_special_tokens: bool = True) -> list[str]:
  """The generated text of each row (tokens [B, N], lengths [B], e.g. a `SampleOutput`'s), cut at stop strings."""
  tokens, lengths = distributed.host_array(tokens), distributed.host_array(lengths)
  texts = []
  for row, n in zip(tokens, lengths):
    text = tokenizer.decode(row[:n].tolist(), skip_special_tokens=skip_special_tokens)
    texts.append(cut_at_stop(text, stop_strings)[0])
  return texts


def delimiter_stops(tokenizer, delimiters: Sequence[str]) -> tuple[tuple[int, ...], ...]:
  """Token sequences that end a step at a delimiter: each delimiter's spellings (`stop_sequences`), and every single
  token whose text contains one (a tokenizer merges text into a delimiter, e.g. ".\\n\\n" as one token)."""
  merged = [(i,) for i, text in enumerate(tokenizer.batch_decode([[i] for i in range(len(tokenizer))]))
            if any(d in text for d in delimiters)]
  spelled = stop_sequences(tokenizer, delimiters)
  return spelled + tuple(s for s in merged if s not in spelled)

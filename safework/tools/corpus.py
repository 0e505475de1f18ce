"""The search tool's local corpus: a JSONL file of `{"id", "title", "text"}` documents, indexed with BM25 (`bm25s`).

The index is built once into a directory (the work directory's `search_index/`: numpy arrays and JSON, no pickle)
and rebuilt only when the corpus file changes (its sha256 is recorded beside the index). bm25s keeps a sparse
matrix in memory and retrieves with a few sparse products: fast for the tiny suite and fine for millions of
passages on one host; an index of all of Wikipedia's passages (tens of millions) would rather use an on-disk engine
(tantivy), behind the same `search`.
The tool only ever reads this index: queries are plain strings, never file paths, and nothing reaches a network.

A question may bring its own documents instead (`meta["documents"]`, a list in the same format: the paragraphs of
HotpotQA's distractor setting, or a corpus drawn afresh for each question so that only reading answers it); its
calls then search those, through an index built in memory when it is first searched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from safework.data.jsonl import json_objects

FIELDS = ("id", "title", "text")


@dataclasses.dataclass(frozen=True)
class Document:
  id: str
  title: str
  text: str


def _documents(rows, name: Callable[[Any], str], source: str) -> list[Document]:
  """Documents from (position, row) pairs; a bad row is an error naming it (`name(position)`) and the fix."""
  documents, seen = [], {}
  for position, row in rows:
    missing = [k for k in FIELDS if not isinstance(row, dict) or not isinstance(row.get(k), str)]
    if missing:
      raise ValueError(f"{name(position)}: {missing} missing or not strings; each document needs string fields "
                       f"{list(FIELDS)}")
    if row["id"] in seen:
      raise ValueError(f"{name(position)}: id {row['id']!r} is already used by {name(seen[row['id']])}; ids must "
                       "be unique")
    seen[row["id"]] = position
    documents.append(Document(row["id"], row["title"], row["text"]))
  if not documents:
    raise ValueError(f"{source} holds no documents")
  return documents


def read_corpus(path: str | Path) -> list[Document]:
  """The documents of a JSONL corpus; a bad line is an error naming the file, the line and the fix."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"corpus {path} is not a file: give a JSONL of {{\"id\", \"title\", \"text\"}} documents")
  return _documents(json_objects(path, ValueError), lambda line: f"{path}:{line}", f"corpus {path}")


def question_documents(meta: Mapping[str, Any], where: str) -> list[Document] | None:
  """A question's own documents (`meta["documents"]`), None when it brings none; `where` names the question in
  an error (its file and line)."""
  if "documents" not in meta:
    return None
  rows = meta["documents"]
  if not isinstance(rows, list):
    raise ValueError(f"{where}: meta.documents must be a list of {{\"id\", \"title\", \"text\"}} objects, got "
                     f"{type(rows).__name__}")
  return _documents(enumerate(rows), lambda i: f"{where}: meta.documents[{i}]", f"{where}: meta.documents")


def _digest(path: Path) -> str:
  sha = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      sha.update(block)
  return sha.hexdigest()


def _bm25(documents: list[Document]):
  import bm25s
  retriever = bm25s.BM25()
  retriever.index(bm25s.tokenize([f"{d.title}\n{d.text}" for d in documents], stopwords="en", show_progress=False),
                  show_progress=False)
  return retriever


class SearchIndex:
  """BM25 over each document's title and text, and lookup by id."""

  def __init__(self, documents: list[Document], retriever):
    self.documents, self.retriever = documents, retriever
    self.by_id = {d.id: d for d in documents}

  @classmethod
  def of(cls, documents: list[Document]) -> "SearchIndex":
    """An index of these documents, in memory (a question's own documents)."""
    return cls(documents, _bm25(documents))

  @classmethod
  def build(cls, corpus: str | Path, directory: str | Path) -> "SearchIndex":
    """The corpus's index, read from `directory` when it was built from the same file, else built and saved there
    (written aside and renamed, so an interrupted build never leaves a half index)."""
    import bm25s
    corpus, directory = Path(corpus), Path(directory)
    documents, digest = read_corpus(corpus), _digest(corpus)
    stamp = directory / "corpus.sha256"
    if stamp.is_file() and stamp.read_text() == digest:
      return cls(documents, bm25s.BM25.load(str(directory)))
    retriever = _bm25(documents)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    retriever.save(str(staging))
    (staging / "corpus.sha256").write_text(digest)
    if directory.exists():
      shutil.rmtree(directory)
    os.replace(staging, directory)
    return cls(documents, retriever)

  def search(self, query: str, k: int) -> list[Document]:
    """The k best documents for a query (fewer when fewer match; none for a query of stopwords only)."""
    import bm25s
    tokens = bm25s.tokenize([query], stopwords="en", show_progress=False)
    if not len(tokens.vocab):
      return []
    k = min(k, len(self.documents))
    found, scores = self.retriever.retrieve(tokens, k=k, show_progress=False)
    return [self.documents[int(i)] for i, s in zip(np.asarray(found)[0], np.asarray(scores)[0]) if s > 0]

  def read(self, document_id: str) -> Document | None:
    return self.by_id.get(document_id.strip())

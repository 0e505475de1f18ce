"""Inference-time intervention: the verifier-guided step search (re-ranking, masking) and human edits of the
reasoning."""

from safework.intervention.edits import edited_prefix, resume_after_edit, split_steps
from safework.intervention.search import SearchResult, Step, StepSearch
from safework.intervention.settings import MODES, SearchSettings

__all__ = ["MODES", "SearchResult", "SearchSettings", "Step", "StepSearch", "edited_prefix", "resume_after_edit",
           "split_steps"]

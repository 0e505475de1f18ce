"""Inference-time intervention: verifier-guided step search, token masking, and human edits of the reasoning."""

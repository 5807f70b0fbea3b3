"""Merge operators: arcee_fusion (being written)."""

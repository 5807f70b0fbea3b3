"""Merge operators: ram (being written)."""

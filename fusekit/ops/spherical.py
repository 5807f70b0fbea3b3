"""Merge operators: spherical (being written)."""

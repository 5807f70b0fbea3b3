"""Merge operators: nearswap (being written)."""

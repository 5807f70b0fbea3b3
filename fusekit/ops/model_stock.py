"""Merge operators: model_stock (being written)."""

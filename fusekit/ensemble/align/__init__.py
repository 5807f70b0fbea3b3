"""Line up different vocabularies: union by spelling, top-k union, relative representations."""

from fusekit.ensemble.align.relative import RelativeAligner, relative_table_bytes
from fusekit.ensemble.align.union import UnionVocab

__all__ = ["RelativeAligner", "UnionVocab", "relative_table_bytes"]

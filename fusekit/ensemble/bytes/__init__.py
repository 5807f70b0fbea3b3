"""Language models over bytes from tokenized language models, and ensembles of them.

Every tokenized language model defines a distribution over byte strings. :class:`ByteBeam` gives a
model's exact (up to its beam) next-byte distribution by marginalising over the tokenizations
consistent with the bytes so far (covering tokenizations; Vieira et al. 2024, "From Language Models
over Tokens to Language Models over Characters"; Phan et al. 2024, "Exact Byte-Level Probabilities
from Tokenized Language Models"). Members with different tokenizers then mix their byte
distributions (``method: byte``) without agreeing on token boundaries.

Public names:

- :func:`score_bytes`: one model's bits per byte at the byte level (``fusekit score --bytes``).
- :func:`score_byte_ensemble`: the ``byte`` method's score (``fusekit ensemble score``).
- :class:`ByteBeam`, :func:`byte_table`: the per-member beam and the per-vocabulary tables.
"""

from fusekit.ensemble.bytes.beam import EOS, ByteBeam
from fusekit.ensemble.bytes.score import ByteScore, score_byte_ensemble, score_bytes
from fusekit.ensemble.bytes.tables import ByteTable, byte_table

__all__ = ["EOS", "ByteBeam", "ByteScore", "ByteTable", "byte_table", "score_byte_ensemble", "score_bytes"]


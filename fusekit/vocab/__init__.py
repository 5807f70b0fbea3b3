"""Tokenizer surgery: the output vocabulary of a merge (``tokenizer_source: union | base | <model>``
and the ``tokenizer:`` block), each model's embedding and LM-head rows permuted into it, and the
merged tokenizer written beside the weights. Reads tokenizer files directly; never imports
transformers.

Modules: ``files`` (a model's vocabulary from its tokenizer files), ``union`` (the output
vocabulary and permutations), ``rows`` (how missing rows are filled), ``align`` (the alignment a
plan carries), ``reader`` (readers serving aligned tensors), ``write`` (the output tokenizer).
"""

from fusekit.vocab.align import VocabAlignment, is_vocab_tensor, vocab_alignment
from fusekit.vocab.files import TokenizerVocab, read_vocab
from fusekit.vocab.reader import AlignedReader, align_readers
from fusekit.vocab.rows import GroupRows, RowRule, group_rows
from fusekit.vocab.union import OutputVocab, build_output_vocab, permutation
from fusekit.vocab.write import write_output_tokenizer

__all__ = [
    "AlignedReader",
    "GroupRows",
    "OutputVocab",
    "RowRule",
    "TokenizerVocab",
    "VocabAlignment",
    "align_readers",
    "build_output_vocab",
    "group_rows",
    "is_vocab_tensor",
    "permutation",
    "read_vocab",
    "vocab_alignment",
    "write_output_tokenizer",
]

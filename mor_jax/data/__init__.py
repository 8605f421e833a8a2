"""Data layer: tokenizers, corpus loading and the grain input pipeline."""

from mor_jax.data.corpus import SHAKESPEARE_VAL_WORKS, DataError, Document, load_documents
from mor_jax.data.pipeline import (
    iterator_restore_args,
    iterator_save_args,
    make_train_dataset,
    make_val_batches,
    pack_documents,
)
from mor_jax.data.tokenizer import ByteTokenizer, Tokenizer, make_tokenizer, padded_vocab_size

__all__ = [
    "SHAKESPEARE_VAL_WORKS",
    "ByteTokenizer",
    "DataError",
    "Document",
    "Tokenizer",
    "iterator_restore_args",
    "iterator_save_args",
    "load_documents",
    "make_tokenizer",
    "make_train_dataset",
    "make_val_batches",
    "pack_documents",
    "padded_vocab_size",
]

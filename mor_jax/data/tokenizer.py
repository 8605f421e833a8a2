"""Tokenizers: the `Tokenizer` protocol and the byte-level tokenizer used by every preset."""

from __future__ import annotations

import typing

import numpy as np

from mor_jax.config import ConfigError, TOKENIZERS


@typing.runtime_checkable
class Tokenizer(typing.Protocol):
    """Interface the data pipeline, the losses and generation code rely on.

    `ByteTokenizer` is the only implementation so far. A subword tokenizer (a Hugging Face tokenizer.json or a
    SentencePiece model) fits by implementing the same members, with `token_byte_lengths` giving the UTF-8 length of
    each piece so that bits-per-byte stays comparable across tokenizers.
    """

    # Number of ids the tokenizer can produce, before padding the embedding table (see `padded_vocab_size`).
    vocab_size: int
    # Id appended after every document.
    eos_id: int
    # Id that fills the unused rows of evaluation batches. Losses ignore PAD targets.
    pad_id: int

    def encode(self, text: str) -> np.ndarray:
        """Convert text to an int32 array of ids, without EOS."""
        ...

    def decode(self, ids) -> str:
        """Convert ids back to text, skipping EOS and PAD."""
        ...

    def token_byte_lengths(self) -> np.ndarray:
        """Return a float32 [vocab_size] array with the number of UTF-8 bytes each id is (0 for EOS and PAD)."""
        ...


class ByteTokenizer:
    """Tokenizer whose ids 0..255 are the UTF-8 bytes of the text, with EOS = 256 and PAD = 257."""

    vocab_size = 258
    eos_id = 256
    pad_id = 257

    def encode(self, text: str) -> np.ndarray:
        """Return the UTF-8 bytes of `text` as int32 ids.

        Characters that Python decoded with errors="surrogateescape" (U+DC80..U+DCFF, as in file names and sys.argv)
        are turned back into their original bytes. Any other lone surrogate raises UnicodeEncodeError.
        """
        data = text.encode("utf-8", errors="surrogateescape")
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        """Decode `ids` to text, skipping EOS and PAD and turning invalid UTF-8 into U+FFFD.

        Raises ValueError for ids outside [0, vocab_size), such as the padding ids of a padded embedding table.
        """
        array = np.asarray(ids, dtype=np.int64).reshape(-1)
        invalid = (array < 0) | (array >= self.vocab_size)
        if invalid.any():
            bad = int(array[invalid][0])
            raise ValueError(f"token id {bad} is outside the byte tokenizer's vocabulary [0, {self.vocab_size}); "
                             f"mask the logits of padded vocabulary entries before sampling")
        data = array[array < 256].astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")

    def token_byte_lengths(self) -> np.ndarray:
        """Return 1.0 for the 256 byte ids and 0.0 for EOS and PAD."""
        lengths = np.zeros(self.vocab_size, dtype=np.float32)
        lengths[:256] = 1.0
        return lengths


def padded_vocab_size(tokenizer: Tokenizer, multiple: int = 128) -> int:
    """Return the tokenizer's vocabulary size rounded up to a multiple of `multiple` (384 for bytes)."""
    if multiple <= 0:
        raise ValueError(f"multiple={multiple} must be > 0")
    return -(-tokenizer.vocab_size // multiple) * multiple


def make_tokenizer(data_config) -> Tokenizer:
    """Build the tokenizer named by `data_config.tokenizer`. Only "byte" exists so far."""
    if data_config.tokenizer == "byte":
        return ByteTokenizer()
    raise ConfigError(f"data.tokenizer={data_config.tokenizer!r} is not supported; allowed values: "
                      f"{', '.join(TOKENIZERS)}")

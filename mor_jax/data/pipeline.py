"""Token packing, the shuffled training stream and the fixed validation batches.

Documents are tokenized, joined into one stream with EOS after each document, and cut into rows of seq_len + 1
tokens that overlap by one token, so the targets of consecutive rows tile the stream.

The training iterator (`iter(make_train_dataset(...))`) is a grain `DatasetIterator`. Its position is a small JSON
dict from `get_state()`, restored with `set_state()`. With Orbax, it is saved by grain's handler
`grain.checkpoint.CheckpointHandler`, selected through the args `grain.checkpoint.CheckpointSave` and
`grain.checkpoint.CheckpointRestore` (grain 0.2.18) that `iterator_save_args` and `iterator_restore_args` build:

    manager = ocp.CheckpointManager(directory)
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               data=iterator_save_args(iterator)))
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             data=iterator_restore_args(iterator)))

Restoring sets the position of the iterator passed in, which `restored["data"]` also returns. The handler writes one
file per process, named by `jax.process_index()` and `jax.process_count()`, so multi-host runs should pass those
values as `process_index` and `process_count`.
"""

from __future__ import annotations

from typing import Sequence

import grain
import numpy as np

from mor_jax.data.corpus import DataError, Document
from mor_jax.data.tokenizer import Tokenizer, make_tokenizer

# Rows live in memory and a batch is one NumPy gather, so one background thread keeps a few batches ready.
_TRAIN_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)
# Tokenization runs in several threads, which speeds up subword tokenizers that release the GIL.
_TOKENIZE_READ_OPTIONS = grain.ReadOptions(num_threads=8, prefetch_buffer_size=64)


class _EncodeWithEos:
    """Map a document's text to its ids followed by EOS."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._eos = np.array([tokenizer.eos_id], dtype=np.int32)

    def __call__(self, text: str) -> np.ndarray:
        return np.concatenate([self._tokenizer.encode(text).astype(np.int32), self._eos])


def pack_documents(docs: Sequence[Document], tokenizer: Tokenizer, seq_len: int) -> np.ndarray:
    """Tokenize and pack documents into an int32 array of shape [rows, seq_len + 1].

    The stream is doc_0 EOS doc_1 EOS ... in the given order. Row i is stream[i * seq_len : i * seq_len + seq_len + 1],
    so every token except the first is a target of exactly one row. The tail that cannot fill a row is dropped, and
    fewer than seq_len + 1 tokens give zero rows.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len} must be > 0")
    width = seq_len + 1
    if not docs:
        return np.zeros((0, width), dtype=np.int32)

    tokenized = grain.MapDataset.source([doc.text for doc in docs]).map(_EncodeWithEos(tokenizer))
    stream = np.concatenate(list(tokenized.to_iter_dataset(_TOKENIZE_READ_OPTIONS)))

    num_rows = (len(stream) - 1) // seq_len if len(stream) >= width else 0
    if num_rows == 0:
        return np.zeros((0, width), dtype=np.int32)
    windows = np.lib.stride_tricks.sliding_window_view(stream, width)
    return np.ascontiguousarray(windows[::seq_len][:num_rows], dtype=np.int32)


def _to_example(batch: np.ndarray) -> dict[str, np.ndarray]:
    return {"tokens": batch}


def _shuffle_seed(seed: int) -> int:
    """Derive grain's 32-bit shuffle seed from data.seed.

    grain 0.2.18 shuffles epoch e with seed + e, so feeding data.seed directly would give the run with seed s + 1
    the epoch orders of the run with seed s, shifted by one epoch. Hashing the seed first makes this unlikely.
    """
    return int(np.random.SeedSequence(seed).generate_state(1, dtype=np.uint32)[0])


def make_train_dataset(data_config, rows: np.ndarray, process_index: int = 0,
                       process_count: int = 1) -> grain.IterDataset:
    """Build the endless, shuffled training stream of this process.

    Yields {"tokens": int32 [batch_size // process_count, seq_len + 1]}. The rows are shuffled with a permutation
    derived from data.seed, and every epoch gets a fresh permutation. Epochs follow each other without a gap, so
    the batch that crosses an epoch boundary mixes rows of both. Process p takes elements p, p + P, p + 2P, ... of
    this global stream (P = process_count), so global batch k is global-stream elements k * batch_size to
    (k + 1) * batch_size - 1, whatever the process count.

    Raises DataError if batch_size is not divisible by process_count, if the rows do not have seq_len + 1 columns,
    or if there are fewer rows than one global batch.
    """
    batch_size, seq_len, seed = data_config.batch_size, data_config.seq_len, data_config.seed
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if batch_size % process_count:
        raise DataError(f"data.batch_size={batch_size} is not divisible by the process count {process_count}; set "
                        f"data.batch_size to a multiple of {process_count}")
    if seed < 0:
        raise DataError(f"data.seed={seed} must be >= 0")
    _check_rows(rows, seq_len)
    if len(rows) < batch_size:
        raise DataError(f"the training split has {len(rows)} rows of data.seq_len + 1 = {seq_len + 1} tokens, fewer "
                        f"than one batch of data.batch_size={batch_size}; lower data.batch_size or data.seq_len, or "
                        f"add training data")

    dataset = grain.MapDataset.source(rows)
    # Shuffle before repeat: the shuffle maps index i of the endless stream to epoch i // len(rows) and uses a
    # different permutation for each epoch.
    dataset = dataset.shuffle(seed=_shuffle_seed(seed)).repeat(None)
    dataset = dataset.slice(slice(process_index, None, process_count))
    dataset = dataset.batch(batch_size // process_count, drop_remainder=True).map(_to_example)
    return dataset.to_iter_dataset(_TRAIN_READ_OPTIONS)


def iterator_save_args(iterator: grain.DatasetIterator):
    """Return the Orbax save args (`grain.checkpoint.CheckpointSave`) for a training iterator."""
    return _checkpoint_args("CheckpointSave")(item=iterator)


def iterator_restore_args(iterator: grain.DatasetIterator):
    """Return the Orbax restore args (`grain.checkpoint.CheckpointRestore`) that set `iterator`'s position."""
    return _checkpoint_args("CheckpointRestore")(item=iterator)


def _checkpoint_args(name: str):
    # grain.checkpoint defines CheckpointSave and CheckpointRestore only when orbax-checkpoint imports.
    args_class = getattr(grain.checkpoint, name, None)
    if args_class is None:
        raise ImportError(f"grain.checkpoint.{name} is missing; install orbax-checkpoint to checkpoint the data "
                          f"iterator")
    return args_class


def make_val_batches(data_config, rows: np.ndarray, batch_size: int | None = None) -> list[np.ndarray]:
    """Split validation rows, in order, into int32 batches of [batch_size, seq_len + 1].

    `batch_size` defaults to data.batch_size. The last batch is filled up with rows of PAD, so every row is evaluated
    exactly once and the padding adds nothing to a loss that ignores PAD targets. Raises DataError if there are no
    rows.
    """
    batch_size = data_config.batch_size if batch_size is None else batch_size
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be > 0")
    _check_rows(rows, data_config.seq_len)
    if len(rows) == 0:
        raise DataError(f"the validation split has fewer than data.seq_len + 1 = {data_config.seq_len + 1} tokens; "
                        f"lower data.seq_len or add validation data")

    pad_id = make_tokenizer(data_config).pad_id
    batches = []
    for start in range(0, len(rows), batch_size):
        batch = np.full((batch_size, rows.shape[1]), pad_id, dtype=np.int32)
        chunk = rows[start:start + batch_size]
        batch[:len(chunk)] = chunk
        batches.append(batch)
    return batches


def _check_rows(rows: np.ndarray, seq_len: int) -> None:
    if rows.ndim != 2 or rows.shape[1] != seq_len + 1:
        raise DataError(f"rows have shape {rows.shape}, expected [rows, data.seq_len + 1 = {seq_len + 1}]; pack the "
                        f"documents with the same data.seq_len")

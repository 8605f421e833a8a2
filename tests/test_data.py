"""Tests of the data layer: tokenizer, corpus loading and splitting, packing, and the grain training stream."""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest

from mor_jax.config import ConfigError, DataConfig
from mor_jax.data import (
    SHAKESPEARE_VAL_WORKS,
    ByteTokenizer,
    DataError,
    Document,
    Tokenizer,
    iterator_restore_args,
    iterator_save_args,
    load_documents,
    make_tokenizer,
    make_train_dataset,
    make_val_batches,
    pack_documents,
    padded_vocab_size,
)
from mor_jax.data import corpus


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer


@pytest.mark.parametrize("text", ["", "plain ASCII\n", "héllo wörld", "日本語 — 🙂", "\x00\x7f"])
def test_byte_tokenizer_round_trip(text):
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


def test_byte_tokenizer_decode_skips_eos_and_pad():
    tokenizer = ByteTokenizer()
    ids = [tokenizer.pad_id, *b"ab", tokenizer.eos_id, *b"c", tokenizer.pad_id]
    assert tokenizer.decode(ids) == "abc"
    assert tokenizer.decode(np.array(ids, dtype=np.int32)) == "abc"


def test_byte_tokenizer_decode_invalid_utf8():
    tokenizer = ByteTokenizer()
    assert tokenizer.decode([0xFF, ord("A")]) == "\ufffdA"
    # A multi-byte character cut after its first two bytes.
    assert tokenizer.decode(list("x€".encode("utf-8"))[:-1]) == "x\ufffd"


def test_byte_tokenizer_decode_rejects_padding_ids():
    with pytest.raises(ValueError, match="300"):
        ByteTokenizer().decode([65, 300])


def test_byte_tokenizer_surrogateescape_bytes():
    raw = b"caf\xe9"
    text = raw.decode("utf-8", errors="surrogateescape")
    assert ByteTokenizer().encode(text).tolist() == list(raw)


def test_byte_tokenizer_ids_and_sizes():
    tokenizer = ByteTokenizer()
    assert (tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id) == (258, 256, 257)
    assert padded_vocab_size(tokenizer) == 384
    assert padded_vocab_size(tokenizer, multiple=256) == 512
    assert padded_vocab_size(tokenizer, multiple=2) == 258
    with pytest.raises(ValueError):
        padded_vocab_size(tokenizer, multiple=0)


def test_token_byte_lengths():
    tokenizer = ByteTokenizer()
    lengths = tokenizer.token_byte_lengths()
    assert lengths.dtype == np.float32
    assert lengths.shape == (258,)
    assert np.all(lengths[:256] == 1.0)
    assert lengths[tokenizer.eos_id] == 0.0
    assert lengths[tokenizer.pad_id] == 0.0

    text = "bits per byte: ßü🙂"
    ids = np.append(tokenizer.encode(text), tokenizer.eos_id)
    assert lengths[ids].sum() == len(text.encode("utf-8"))


def test_make_tokenizer():
    tokenizer = make_tokenizer(DataConfig(tokenizer="byte"))
    assert isinstance(tokenizer, ByteTokenizer)
    assert isinstance(tokenizer, Tokenizer)
    with pytest.raises(ConfigError, match="sentencepiece"):
        make_tokenizer(DataConfig(tokenizer="sentencepiece"))


# ----------------------------------------------------------------------------------------------------------------------
# Packing


def test_pack_documents_stride_and_eos():
    tokenizer = ByteTokenizer()
    docs = [Document("a", "first document"), Document("b", "é"), Document("c", "third one, a little longer")]
    seq_len = 5
    rows = pack_documents(docs, tokenizer, seq_len)

    stream = np.concatenate([np.append(tokenizer.encode(doc.text), tokenizer.eos_id) for doc in docs])
    assert rows.dtype == np.int32
    assert rows.shape == ((len(stream) - 1) // seq_len, seq_len + 1)

    # Consecutive rows overlap by exactly one token.
    assert np.array_equal(rows[1:, 0], rows[:-1, -1])
    # Inputs and targets tile the stream: every token after the first is a target of exactly one row.
    targets = rows[:, 1:].reshape(-1)
    assert np.array_equal(targets, stream[1:1 + len(targets)])
    assert np.array_equal(rows[:, :-1].reshape(-1), stream[:len(targets)])
    # Only the incomplete tail is dropped.
    assert len(stream) - 1 - len(targets) < seq_len

    # EOS follows each document.
    eos_positions = np.flatnonzero(stream == tokenizer.eos_id)
    lengths = np.cumsum([len(doc.text.encode("utf-8")) + 1 for doc in docs]) - 1
    assert eos_positions.tolist() == lengths.tolist()


def test_pack_documents_too_short_gives_no_rows():
    rows = pack_documents([Document("a", "abc")], ByteTokenizer(), seq_len=8)
    assert rows.shape == (0, 9)
    assert pack_documents([], ByteTokenizer(), seq_len=8).shape == (0, 9)


# ----------------------------------------------------------------------------------------------------------------------
# Training stream


def numbered_rows(count: int, seq_len: int) -> np.ndarray:
    """Rows whose every token is the row index, so a batch shows which rows it holds."""
    return np.repeat(np.arange(count, dtype=np.int32)[:, None], seq_len + 1, axis=1)


def row_ids(iterator, num_batches: int) -> list[int]:
    ids = []
    for _ in range(num_batches):
        tokens = next(iterator)["tokens"]
        ids.extend(tokens[:, 0].tolist())
    return ids


def test_train_dataset_batch_shape():
    config = DataConfig(seq_len=4, batch_size=8)
    batch = next(iter(make_train_dataset(config, numbered_rows(40, 4))))
    assert set(batch) == {"tokens"}
    assert batch["tokens"].shape == (8, 5)
    assert batch["tokens"].dtype == np.int32


def test_train_order_depends_on_seed_and_epoch():
    rows = numbered_rows(32, 3)
    batches_per_epoch = 32 // 4

    def first_two_epochs(seed):
        iterator = iter(make_train_dataset(DataConfig(seq_len=3, batch_size=4, seed=seed), rows))
        ids = row_ids(iterator, 2 * batches_per_epoch)
        return ids[:32], ids[32:]

    epoch0, epoch1 = first_two_epochs(seed=0)
    assert sorted(epoch0) == list(range(32))
    assert sorted(epoch1) == list(range(32))
    assert epoch0 != list(range(32))
    assert epoch0 != epoch1

    assert first_two_epochs(seed=0) == (epoch0, epoch1)
    other0, other1 = first_two_epochs(seed=1)
    assert other0 != epoch0
    # grain shuffles epoch e with seed + e, so without the seed hashing, seed 1 would replay seed 0's second epoch.
    assert other0 != epoch1


def test_train_shards_partition_global_batch():
    rows = numbered_rows(24, 3)
    single = iter(make_train_dataset(DataConfig(seq_len=3, batch_size=6), rows))
    shards = [iter(make_train_dataset(DataConfig(seq_len=3, batch_size=6), rows, index, 3)) for index in range(3)]
    for _ in range(10):
        global_ids = row_ids(single, 1)
        local_ids = [row_ids(shard, 1) for shard in shards]
        assert all(len(ids) == 2 for ids in local_ids)
        assert sorted(sum(local_ids, [])) == sorted(global_ids)


def test_train_iterator_state_round_trip():
    config = DataConfig(seq_len=3, batch_size=4, seed=7)
    rows = numbered_rows(20, 3)
    iterator = iter(make_train_dataset(config, rows))
    row_ids(iterator, 13)
    state = iterator.get_state()
    expected = row_ids(iterator, 6)

    fresh = iter(make_train_dataset(config, rows))
    fresh.set_state(state)
    assert row_ids(fresh, 6) == expected


def test_train_iterator_orbax_round_trip(tmp_path):
    config = DataConfig(seq_len=3, batch_size=4, seed=3)
    rows = numbered_rows(20, 3)
    iterator = iter(make_train_dataset(config, rows))
    row_ids(iterator, 9)

    with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
        manager.save(9, args=ocp.args.Composite(data=iterator_save_args(iterator)))
        manager.wait_until_finished()
    expected = row_ids(iterator, 6)

    fresh = iter(make_train_dataset(config, rows))
    with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
        restored = manager.restore(9, args=ocp.args.Composite(data=iterator_restore_args(fresh)))
    assert restored["data"] is fresh
    assert row_ids(fresh, 6) == expected


def test_train_dataset_rejects_corpus_smaller_than_batch():
    config = DataConfig(seq_len=3, batch_size=16)
    with pytest.raises(DataError, match=r"3 rows.*data.batch_size=16.*data.seq_len"):
        make_train_dataset(config, numbered_rows(3, 3))


def test_train_dataset_rejects_indivisible_batch():
    with pytest.raises(DataError, match="data.batch_size=6 is not divisible"):
        make_train_dataset(DataConfig(seq_len=3, batch_size=6), numbered_rows(20, 3), 0, 4)


def test_train_dataset_rejects_wrong_row_width():
    with pytest.raises(DataError, match="data.seq_len"):
        make_train_dataset(DataConfig(seq_len=8, batch_size=2), numbered_rows(20, 3))


# ----------------------------------------------------------------------------------------------------------------------
# Validation batches


def test_val_batches_pad_last_batch():
    config = DataConfig(seq_len=3, batch_size=4)
    rows = numbered_rows(10, 3)
    batches = make_val_batches(config, rows)
    assert len(batches) == 3
    assert all(batch.shape == (4, 4) and batch.dtype == np.int32 for batch in batches)

    stacked = np.concatenate(batches)
    assert np.array_equal(stacked[:10], rows)
    assert np.all(stacked[10:] == ByteTokenizer().pad_id)

    assert len(make_val_batches(config, rows, batch_size=5)) == 2


def test_val_batches_reject_empty_split():
    with pytest.raises(DataError, match="validation"):
        make_val_batches(DataConfig(seq_len=3), np.zeros((0, 4), dtype=np.int32))


# ----------------------------------------------------------------------------------------------------------------------
# Shakespeare corpus


@pytest.fixture(scope="module")
def shakespeare():
    return load_documents(DataConfig(source="shakespeare"))


def test_shakespeare_split_by_work(shakespeare):
    train, val = shakespeare
    assert len(train) + len(val) == 42
    assert sorted(doc.name for doc in val) == sorted(SHAKESPEARE_VAL_WORKS)
    assert not {doc.name for doc in train} & {doc.name for doc in val}


def test_shakespeare_val_share(shakespeare):
    train, val = shakespeare
    train_bytes = sum(len(doc.text.encode("utf-8")) for doc in train)
    val_bytes = sum(len(doc.text.encode("utf-8")) for doc in val)
    assert train_bytes + val_bytes == 5_057_198
    assert 0.04 <= val_bytes / (train_bytes + val_bytes) <= 0.07


def test_shakespeare_val_text_not_in_train(shakespeare):
    train, val = shakespeare
    train_text = "\n".join(doc.text for doc in train)
    for doc in val:
        starts = range(0, len(doc.text) - 200, len(doc.text) // 64)
        leaked = [start for start in starts if doc.text[start:start + 200] in train_text]
        assert not leaked, f"{doc.name}: 200-character windows at {leaked} occur in the training text"


# ----------------------------------------------------------------------------------------------------------------------
# User files


def files_config(tmp_path, train, val=(), **overrides) -> DataConfig:
    return DataConfig(source="files", train_paths=tuple(str(tmp_path / p) for p in train),
                      val_paths=tuple(str(tmp_path / p) for p in val), **overrides)


def test_files_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n{"text": ""}\n', encoding="utf-8")
    (tmp_path / "val.txt").write_text("held out", encoding="utf-8")
    train, val = load_documents(files_config(tmp_path, ["*.jsonl", "a.txt"], ["val.txt"]))

    assert [doc.text for doc in train] == ["one", "two", "alpha text"]
    assert [doc.name for doc in train] == [f"{tmp_path / 'b.jsonl'}:1", f"{tmp_path / 'b.jsonl'}:3",
                                           str(tmp_path / "a.txt")]
    assert [doc.text for doc in val] == ["held out"]


def test_files_custom_text_field(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "x"}\n{"body": "y"}\n', encoding="utf-8")
    train, val = load_documents(files_config(tmp_path, ["a.jsonl"], text_field="body"))
    assert [doc.text for doc in train + val] == ["x", "y"]


def test_val_fraction_holds_out_last_documents(tmp_path):
    for index in range(10):
        (tmp_path / f"doc{index}.txt").write_text(f"document {index}", encoding="utf-8")
    train, val = load_documents(files_config(tmp_path, ["doc*.txt"], val_fraction=0.2))
    assert [doc.text for doc in val] == ["document 8", "document 9"]
    assert len(train) == 8

    # At least one document is held out, and at least one is left for training.
    train, val = load_documents(files_config(tmp_path, ["doc*.txt"], val_fraction=0.01))
    assert (len(train), len(val)) == (9, 1)
    train, val = load_documents(files_config(tmp_path, ["doc[01].txt"], val_fraction=0.99))
    assert (len(train), len(val)) == (1, 1)


def test_files_duplicate_matches_read_once(tmp_path):
    (tmp_path / "a.txt").write_text("a", encoding="utf-8")
    (tmp_path / "b.txt").write_text("b", encoding="utf-8")
    train, val = load_documents(files_config(tmp_path, ["a.txt", "*.txt"], val_fraction=0.5))
    assert [doc.text for doc in train] == ["a"]
    assert [doc.text for doc in val] == ["b"]


def test_files_invalid_utf8_replaced_and_logged(tmp_path, caplog):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"abc\xff\xfedef\xe2\x82 kept \xef\xbf\xbd")
    (tmp_path / "val.txt").write_text("v", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="mor_jax.data.corpus"):
        train, _ = load_documents(files_config(tmp_path, ["bad.txt"], ["val.txt"]))
    assert train[0].text == "abc\ufffd\ufffddef\ufffd kept \ufffd"
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1
    assert str(path) in messages[0]
    assert "replaced 3 " in messages[0]


def test_files_lone_surrogate_in_jsonl_replaced(tmp_path, caplog):
    (tmp_path / "a.jsonl").write_text('{"text": "x\\ud800y"}\n{"text": "z"}\n', encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="mor_jax.data.corpus"):
        train, val = load_documents(files_config(tmp_path, ["a.jsonl"]))
    assert train[0].text == "x\ufffdy"
    assert "replaced 1 lone surrogates" in caplog.records[0].getMessage()


def test_files_utf8_bom_dropped(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "x"}\n{"text": "y"}\n')
    train, val = load_documents(files_config(tmp_path, ["a.jsonl"]))
    assert [doc.text for doc in train + val] == ["x", "y"]


@dataclasses.dataclass
class BadInput:
    name: str
    files: dict  # file name -> bytes, written before loading
    train: tuple
    val: tuple = ()
    message: str = ""  # expected part of the message besides the path
    path_in_message: str = ""  # defaults to the first train entry


BAD_INPUTS = [
    BadInput("missing file", {}, ("nope.txt",), message="not found"),
    BadInput("glob without match", {}, ("*.md",), message="no file matches"),
    BadInput("directory", {"sub/a.txt": b"a"}, ("sub",), message="is a directory"),
    BadInput("empty file", {"empty.txt": b""}, ("empty.txt",), message="empty"),
    BadInput("whitespace-only file", {"blank.txt": b" \n\n"}, ("blank.txt",), message="empty"),
    BadInput("binary file", {"blob.bin": b"PK\x03\x04\x00\x00data"}, ("blob.bin",), message="NUL bytes"),
    BadInput("UTF-16 file", {"u16.txt": "text".encode("utf-16")}, ("u16.txt",), message="NUL bytes"),
    BadInput("invalid JSON line", {"a.jsonl": b'{"text": "ok"}\n{"text": oops}\n'}, ("a.jsonl",),
             message="invalid JSON", path_in_message="a.jsonl:2"),
    BadInput("JSON line without text field", {"a.jsonl": b'{"text": "ok"}\n\n{"body": "x"}\n'}, ("a.jsonl",),
             message="missing field 'text'", path_in_message="a.jsonl:3"),
    BadInput("JSON line that is not an object", {"a.jsonl": b'["text"]\n'}, ("a.jsonl",),
             message="missing field", path_in_message="a.jsonl:1"),
    BadInput("JSON text that is not a string", {"a.jsonl": b'{"text": 5}\n'}, ("a.jsonl",),
             message="number", path_in_message="a.jsonl:1"),
    BadInput("only empty JSONL texts", {"a.jsonl": b'{"text": ""}\n'}, ("a.jsonl",), message="no documents"),
    BadInput("single document without val_paths", {"a.txt": b"a"}, ("a.txt",), message="too few"),
    BadInput("only empty validation texts", {"a.txt": b"a", "v.jsonl": b'{"text": ""}\n'}, ("a.txt",),
             val=("v.jsonl",), message="no documents", path_in_message="v.jsonl"),
    BadInput("file in both splits", {"a.txt": b"a"}, ("a.txt",), val=("*.txt",), message="both"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case.name for case in BAD_INPUTS])
def test_files_bad_input_raises(tmp_path, case):
    for name, content in case.files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError) as error:
        load_documents(files_config(tmp_path, case.train, case.val))
    message = str(error.value)
    assert str(tmp_path / (case.path_in_message or case.train[0])) in message
    assert case.message in message
    assert "\n" not in message


def test_files_unreadable_raises(tmp_path, monkeypatch):
    path = tmp_path / "locked.txt"
    path.write_text("secret", encoding="utf-8")
    real_open = open

    def deny_open(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    # corpus reads files through the builtin open, which a module global of the same name shadows.
    monkeypatch.setattr(corpus, "open", deny_open, raising=False)
    with pytest.raises(DataError, match="Permission denied") as error:
        load_documents(files_config(tmp_path, ["locked.txt"]))
    assert str(path) in str(error.value)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user to deny reads")
def test_files_unreadable_by_mode_raises(tmp_path):
    path = tmp_path / "locked.txt"
    path.write_text("secret", encoding="utf-8")
    path.chmod(0)
    with pytest.raises(DataError, match="cannot read") as error:
        load_documents(files_config(tmp_path, ["locked.txt"]))
    assert str(path) in str(error.value)

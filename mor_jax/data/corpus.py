"""Corpus loading: the shipped Shakespeare works or the user's text and JSONL files, split into train and validation.

Files are read as UTF-8. Invalid byte sequences do not stop loading: they are decoded with errors="replace", so each
becomes U+FFFD, and a warning on the `mor_jax.data.corpus` logger names the file and the number of replacements.
Lone surrogates in JSON strings (such as "\\ud800") are replaced and counted the same way. One stray byte in a large
scraped corpus should not end a run, but the count shows when a file is in the wrong encoding. A leading UTF-8
byte-order mark is dropped. Files that contain NUL bytes are rejected as binary, which also catches UTF-16 files.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import lzma
import os
import re
from pathlib import Path

from mor_jax.config import MorJaxError

logger = logging.getLogger(__name__)

# Works of the shipped corpus held out for validation: 262,151 of 5,057,198 bytes (5.18%). Both are plays, so the
# validation text has the same speaker-line layout as most of the training text. They share no passage of 220 or
# more characters with the other 40 works (checked with 200-character windows starting every 20 characters).
SHAKESPEARE_VAL_WORKS = ("comedy_of_errors", "hamlet")
SHAKESPEARE_PATH = Path(__file__).resolve().parents[2] / "data" / "shakespeare.jsonl.xz"

_SURROGATES = re.compile("[\ud800-\udfff]")
_REPLACEMENT = "\ufffd"


class DataError(MorJaxError):
    """Missing, unreadable or malformed training or validation data."""


@dataclasses.dataclass(frozen=True)
class Document:
    """One document of the corpus: a Shakespeare work, a text file or one JSONL line."""

    # Shakespeare work name, file path, or "path:line" for a JSONL line.
    name: str
    text: str


def load_documents(data_config) -> tuple[list[Document], list[Document]]:
    """Load the corpus named by `data_config.source` and return (train documents, validation documents).

    source="shakespeare" splits data/shakespeare.jsonl.xz by work, holding out `SHAKESPEARE_VAL_WORKS`.
    source="files" reads `train_paths` and `val_paths` (see `_load_files`). Raises DataError for missing, empty,
    unreadable, binary or malformed input.
    """
    if data_config.source == "shakespeare":
        return _load_shakespeare(SHAKESPEARE_PATH)
    if data_config.source == "files":
        return _load_files(data_config)
    raise DataError(f"data.source={data_config.source!r} is not supported; use shakespeare or files")


def _load_shakespeare(path: Path) -> tuple[list[Document], list[Document]]:
    if not path.is_file():
        raise DataError(f"Shakespeare corpus not found: {path}; rebuild it with `python data/build_shakespeare.py`")
    documents = []
    try:
        with lzma.open(path, "rt", encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                documents.append(Document(name=record["work"], text=record["text"]))
    except (OSError, EOFError, lzma.LZMAError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise DataError(f"invalid Shakespeare corpus {path} ({type(error).__name__}: {error}); rebuild it with "
                        f"`python data/build_shakespeare.py`") from None

    names = {document.name for document in documents}
    missing = [work for work in SHAKESPEARE_VAL_WORKS if work not in names]
    if missing:
        raise DataError(f"{path} is missing the held-out works {', '.join(missing)}; rebuild it with "
                        f"`python data/build_shakespeare.py`")
    train = [document for document in documents if document.name not in SHAKESPEARE_VAL_WORKS]
    val = [document for document in documents if document.name in SHAKESPEARE_VAL_WORKS]
    return train, val


def _load_files(data_config) -> tuple[list[Document], list[Document]]:
    """Read the documents of `train_paths` and `val_paths`.

    Each entry is a file or a glob pattern (`**` matches across directories), and the matches of every pattern are
    read in sorted order. A `.jsonl` file gives one document per non-blank line, taken from the string field
    `text_field`; documents whose text is empty are skipped. Any other file is one document. When `val_paths` is
    empty, the last `val_fraction` of the training documents (rounded, but at least one, and leaving at least one
    for training) is held out.
    """
    train_files = _expand_paths(data_config.train_paths, "data.train_paths")
    val_files = _expand_paths(data_config.val_paths, "data.val_paths") if data_config.val_paths else []

    shared = sorted(set(train_files) & set(val_files))
    if shared:
        raise DataError(f"{shared[0]} matches both data.train_paths and data.val_paths; a file must be in only one "
                        f"split")

    train = _read_all(train_files, data_config.text_field)
    if not train:
        raise DataError(f"no documents in data.train_paths={list(data_config.train_paths)}: every file was "
                        f"skipped; check data.text_field={data_config.text_field!r}")

    if val_files:
        val = _read_all(val_files, data_config.text_field)
        if not val:
            raise DataError(f"no documents in data.val_paths={list(data_config.val_paths)}: every file was "
                            f"skipped; check data.text_field={data_config.text_field!r}")
        return train, val

    if len(train) < 2:
        raise DataError(f"data.train_paths={list(data_config.train_paths)} gives {len(train)} document, too few to "
                        f"hold out validation; add documents or set data.val_paths")
    val_count = min(max(1, round(data_config.val_fraction * len(train))), len(train) - 1)
    return train[:-val_count], train[-val_count:]


def _expand_paths(patterns, key: str) -> list[str]:
    """Expand files and glob patterns to existing files, sorted within each pattern and without duplicates."""
    files = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if glob.has_magic(pattern):
            matches = sorted(match for match in glob.glob(pattern, recursive=True) if os.path.isfile(match))
            if not matches:
                raise DataError(f"{key}: no file matches the glob {pattern!r}; check the pattern")
        elif os.path.isdir(pattern):
            raise DataError(f"{key}: {pattern} is a directory; give files or a glob such as {pattern}/*.txt")
        elif os.path.isfile(pattern):
            matches = [pattern]
        else:
            raise DataError(f"{key}: file not found: {pattern}")
        files.extend(match for match in matches if match not in files)
    return files


def _read_all(paths: list[str], text_field: str) -> list[Document]:
    documents = []
    for path in paths:
        if path.endswith(".jsonl"):
            documents.extend(_read_jsonl(path, text_field))
        else:
            documents.append(Document(name=path, text=_read_text(path)))
    return documents


def _read_text(path: str) -> str:
    """Return the contents of a UTF-8 file, rejecting empty, unreadable and binary files."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror}; check that the file exists and is readable") from None
    if not raw.strip():
        raise DataError(f"{path} is empty or contains only whitespace; add text or remove it from the data paths")
    if b"\0" in raw:
        raise DataError(f"{path} contains NUL bytes, as binary and UTF-16 files do; convert it to UTF-8 text or "
                        f"remove it from the data paths")

    text, replaced = _decode_utf8(raw)
    if replaced:
        logger.warning("%s: replaced %d invalid UTF-8 byte sequences with U+FFFD", path, replaced)
    return text.removeprefix("\ufeff")


def _decode_utf8(raw: bytes) -> tuple[str, int]:
    """Decode UTF-8 with errors="replace" and return the text and the number of replaced sequences."""
    text = raw.decode("utf-8", errors="replace")
    # A valid EF BF BD sequence is a U+FFFD already present in the file, so it is not counted as a replacement.
    return text, text.count(_REPLACEMENT) - raw.count(_REPLACEMENT.encode("utf-8"))


def _read_jsonl(path: str, text_field: str) -> list[Document]:
    """Return one document per non-blank line of a JSONL file, skipping lines whose text is empty."""
    documents = []
    surrogates = 0
    for line_number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{line_number}: invalid JSON ({error.msg} at column {error.colno}); each line "
                            f"of a .jsonl file must be one JSON object") from None
        if not isinstance(record, dict) or text_field not in record:
            found = ", ".join(map(repr, record)) if isinstance(record, dict) else f"a JSON {_json_type(record)}"
            raise DataError(f"{path}:{line_number}: missing field {text_field!r} (found {found or 'no fields'}); set "
                            f"data.text_field to the field that contains the text")
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(f"{path}:{line_number}: field {text_field!r} is a JSON {_json_type(text)}, expected "
                            f"a string")
        text, count = _SURROGATES.subn(_REPLACEMENT, text)
        surrogates += count
        if text:
            documents.append(Document(name=f"{path}:{line_number}", text=text))
    if surrogates:
        logger.warning("%s: replaced %d lone surrogates in JSON strings with U+FFFD", path, surrogates)
    return documents


def _json_type(value) -> str:
    """Return the JSON name of a parsed value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)

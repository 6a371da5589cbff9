"""The distribution point's content, generated on the fly (never stored, never in git).

A file named ``payload-<N>.bin`` in any well-formed content id holds ``N`` bytes
(0 <= N <= 16 GiB); any other name does not exist. The bytes are a 1 MiB block from a
seeded PRNG, read cyclically from a per-file offset, so any range is produced by
slicing (hundreds of MiB per second) and tests can compute the expected SHA-256
without downloading: :func:`content_sha256`.
"""

from __future__ import annotations

import hashlib
import random
import re
from functools import lru_cache
from typing import Iterator

MAX_CONTENT_SIZE = 16 * 1024**3
BLOCK_SIZE = 1024 * 1024
_SEED = 0x434D47  # "CMG"
_CONTENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._{}-]{0,127}$")
_FILE_RE = re.compile(r"^payload-(\d{1,11})\.bin$")


@lru_cache(maxsize=1)
def _block2() -> bytes:
    block = random.Random(_SEED).randbytes(BLOCK_SIZE)
    # Two copies back to back: any window of up to BLOCK_SIZE bytes is one slice.
    return block + block


def _offset(content_id: str, file: str) -> int:
    digest = hashlib.sha256(f"{content_id}/{file}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BLOCK_SIZE


def content_size(content_id: str, file: str) -> int | None:
    """The size of ``file`` in ``content_id``, or ``None`` when there is no such file."""
    if not _CONTENT_ID_RE.match(content_id):
        return None
    m = _FILE_RE.match(file)
    if not m:
        return None
    size = int(m.group(1))
    return size if size <= MAX_CONTENT_SIZE else None


def iter_content(content_id: str, file: str, start: int, end: int,
                 chunk_size: int = 256 * 1024) -> Iterator[memoryview]:
    """The bytes ``[start, end)`` of a file, as chunks of at most ``chunk_size`` bytes.

    Raises ``ValueError`` for an unknown file or a range outside it.
    """
    size = content_size(content_id, file)
    if size is None:
        raise ValueError(f"no content {content_id}/{file}")
    if not 0 <= start <= end <= size:
        raise ValueError(f"range [{start}, {end}) is outside {content_id}/{file} ({size} bytes)")
    chunk_size = max(1, min(chunk_size, BLOCK_SIZE))
    view = memoryview(_block2())
    off = _offset(content_id, file)
    pos = start
    while pos < end:
        n = min(chunk_size, end - pos)
        i = (pos + off) % BLOCK_SIZE
        yield view[i:i + n]
        pos += n


def content_bytes(content_id: str, file: str, start: int, end: int) -> bytes:
    """The bytes ``[start, end)`` of a file as one ``bytes`` (for small ranges)."""
    return b"".join(iter_content(content_id, file, start, end, BLOCK_SIZE))


def content_sha256(content_id: str, file: str, start: int = 0, end: int | None = None) -> str:
    """Hex SHA-256 of the bytes ``[start, end)`` (the whole file by default)."""
    if end is None:
        size = content_size(content_id, file)
        if size is None:
            raise ValueError(f"no content {content_id}/{file}")
        end = size
    h = hashlib.sha256()
    for chunk in iter_content(content_id, file, start, end, BLOCK_SIZE):
        h.update(chunk)
    return h.hexdigest()


def parse_range(header: str, size: int) -> tuple[int, int] | None | str:
    """Parse a ``Range`` header against a file of ``size`` bytes.

    Returns ``(start, end)`` (end exclusive) for one satisfiable range, ``None`` when
    the header should be ignored (not ``bytes=``, malformed, or several ranges: the
    whole file is sent), or the string ``"unsatisfiable"`` (answer 416).
    """
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or not spec or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    first, last = first.strip(), last.strip()
    if not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        return None
    if first == "":
        if last == "":
            return None
        n = int(last)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return (max(0, size - n), size)
    start = int(first)
    if last != "" and int(last) < start:
        return None  # RFC 9110: an invalid range-spec makes the header ignorable
    if start >= size:
        return "unsatisfiable"
    end = size if last == "" else min(int(last) + 1, size)
    return (start, end)

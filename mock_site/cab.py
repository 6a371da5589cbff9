"""A minimal, valid Microsoft cabinet (MS-CAB) with stored (uncompressed) files.

Enough for ``/CCM_Client/ccmsetup.cab``: ``expand``/``cabextract`` can list and extract it.
Deterministic: the same files give the same bytes.
"""

from __future__ import annotations

import struct

_MAX_BLOCK = 32768  # CFDATA blocks hold at most 32 KiB uncompressed


def build_cab(files: list[tuple[str, bytes]], set_id: int = 0x434D) -> bytes:
    """A cabinet with one folder holding ``files`` (name, data), stored uncompressed."""
    data = b"".join(d for _, d in files)
    blocks = [data[i:i + _MAX_BLOCK] for i in range(0, len(data), _MAX_BLOCK)] or [b""]
    header_size, folder_size = 36, 8
    cffiles = b""
    offset = 0
    for name, d in files:
        # date 2024-01-01, time 00:00 in MS-DOS format; attribute 0x20 (archive)
        dos_date = ((2024 - 1980) << 9) | (1 << 5) | 1
        cffiles += struct.pack("<IIHHHH", len(d), offset, 0, dos_date, 0, 0x20) + name.encode("ascii") + b"\0"
        offset += len(d)
    coff_files = header_size + folder_size
    coff_data = coff_files + len(cffiles)
    cfdata = b"".join(struct.pack("<IHH", 0, len(b), len(b)) + b for b in blocks)
    total = coff_data + len(cfdata)
    header = b"MSCF" + struct.pack("<IIIIIBBHHHHH", 0, total, 0, coff_files, 0, 3, 1, 1, len(files), 0, set_id, 0)
    folder = struct.pack("<IHH", coff_data, len(blocks), 0)
    return header + folder + cffiles + cfdata

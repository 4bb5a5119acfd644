"""The payload every destination reads: compact records in comments, then save text.

While a cluster is upgraded, a payload may meet the Perl helper on the
destination. Its Load hands the bytes to ``conntrack --load-file -`` after
Perl's ``pack('c*')``, which warns once per byte above 127; conntrack(8)
skips lines that start with ``#`` (up to about 8 KiB: a 16 KiB one makes it
reject the whole input), rejects the whole input on a line it cannot parse,
and stops at the first entry the kernel refuses. So this format is 7-bit
text throughout:

``#PVCT-HYBRID 1 RECORDS BYTES CRC32``
    the header line: format version, how many records the compact section
    holds, the length and CRC-32 (hex) of the compact payload it carries;
``#`` + up to :data:`LINE` base64 characters, repeated
    the compact payload (:mod:`.compact`, version 1, ``PVCT``) in base64,
    cut into lines far below conntrack's limit;
save lines, each with `` --mark VMID``
    the most important entries again, as many as the rest of the 1 MiB
    takes, for a Perl destination (``conntrack --load-file`` creates them
    and skips the comments).

This helper's Load reads the compact section only: faster than parsing
text, and it carries every field (window scale, labels, port-only NAT). If
that section is unusable, Load falls back to the save lines. Base64 costs a
third more bytes than the binary; base85 would cost a quarter but takes
~60 ms at 50,000 entries in Python, where base64 (C) takes ~1 ms.

Pure conversion, no I/O.
"""

from __future__ import annotations

import binascii
import zlib

from ..errors import CodecError

MAGIC = b"#PVCT-HYBRID "
VERSION = 1
#: Base64 characters per comment line: far below the ~8 KiB conntrack(8) skips.
LINE = 1020
#: The longest header line (counts of up to 10 digits each).
MAX_HEADER = len(MAGIC) + len("%d %d %d %08x\n" % (VERSION, 10**10 - 1, 10**10 - 1, 0))


def is_hybrid(data: bytes) -> bool:
    """Whether ``data`` starts like this format."""
    return data.startswith(MAGIC)


def _base64_size(n: int) -> int:
    return 4 * ((n + 2) // 3)


def armored_size(binary: int) -> int:
    """Bytes the compact section takes for a compact payload of ``binary`` bytes (header included)."""
    chars = _base64_size(binary)
    lines = (chars + LINE - 1) // LINE
    return MAX_HEADER + chars + 2 * lines  # "#" and "\n" per line


def binary_budget(limit: int) -> int:
    """The largest compact payload whose section fits in ``limit`` bytes (0 if none does)."""
    lo, hi = 0, max(0, limit)
    while lo < hi:  # armored_size grows with its argument
        mid = (lo + hi + 1) // 2
        if armored_size(mid) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def armor(compact_payload: bytes, records: int) -> bytes:
    """The compact section: header line and base64 comment lines, each ending in ``\\n``."""
    text = binascii.b2a_base64(compact_payload, newline=False)
    header = MAGIC + b"%d %d %d %08x\n" % (VERSION, records, len(compact_payload),
                                           zlib.crc32(compact_payload))
    lines = [b"#" + text[i:i + LINE] + b"\n" for i in range(0, len(text), LINE)]
    return header + b"".join(lines)


def unarmor(data: bytes) -> bytes:
    """The compact payload a hybrid payload carries.

    :raises CodecError: when the section is unusable (unknown version, bad
        header, missing or corrupt lines, wrong length or checksum)
    """
    end = data.find(b"\n", 0, MAX_HEADER + 1)
    if end < 0:
        raise CodecError("hybrid payload without a header line")
    fields = data[len(MAGIC):end].split(b" ")
    if len(fields) != 4 or not fields[0].isdigit() or int(fields[0]) != VERSION:
        raise CodecError("unknown hybrid payload version %r" % data[len(MAGIC):end][:20])
    try:
        size, crc = int(fields[2]), int(fields[3], 16)
    except ValueError:
        raise CodecError("malformed hybrid payload header") from None
    chars = _base64_size(size)
    pos = end + 1
    parts: list[bytes] = []
    taken = 0
    while taken < chars:
        nl = data.find(b"\n", pos, pos + LINE + 2)
        if nl < 0 or data[pos:pos + 1] != b"#":
            raise CodecError("hybrid payload's compact section is cut short")
        parts.append(data[pos + 1:nl])
        taken += nl - pos - 1
        pos = nl + 1
    try:
        binary = binascii.a2b_base64(b"".join(parts), strict_mode=True)
    except binascii.Error as err:
        raise CodecError("hybrid payload's compact section is corrupt: %s" % err) from None
    if len(binary) != size or zlib.crc32(binary) != crc:
        raise CodecError("hybrid payload's compact section fails its length or checksum")
    return binary

"""What a payload is assembled from: the entries one Save sends, as records and save lines.

Two kinds of source give them. A list of entries (:class:`EntryList`: the
tools, the tests, Save without its cache), and Save's scan of the kernel's
dump through its cache (:mod:`pvevmstate.savecache`), which holds the record
and save line of most entries ready-made and decodes only what changed.
Every format is assembled through this interface alone
(:func:`pvevmstate.payload.encode_sendable`), so the same table gives the
same payload whichever source it came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ..model import Entry
from . import compact, savetext


class Sendable(Protocol):
    """The entries one Save may send (expected entries already left out)."""

    def __len__(self) -> int: ...

    def raw(self) -> bytes | bytearray:
        """Every item's compact record (:data:`compact.RECORD`), laid end to end, in item order."""
        ...

    def columns(self) -> Sequence[bytes]:
        """:meth:`raw` as columns (:func:`compact.columns_of`)."""
        ...

    def ready_segments(self) -> compact.Precompressed | None:
        """The columns of :meth:`columns` compressed already, or None
        (:func:`compact.encode_columns`)."""
        ...

    def priority_keys(self) -> list[int]:
        """Every item's priority key (:func:`compact.priority_keys`), in no
        particular order: a key carries its item's position."""
        ...

    def lines(self, positions: Sequence[int], mark: int) -> savetext.Lines:
        """The save lines (:func:`savetext.render_line`, with `` --mark MARK``)
        of the items at ``positions`` whose line conntrack(8) loads
        (:func:`savetext.text_problem`), in that order, end to end
        (:func:`savetext.join_lines`; the caller fits them to its room,
        :func:`savetext.fit`)."""
        ...

    def entries(self) -> Sequence[Entry]:
        """Every item as an entry, in item order (the text format and oversized
        tables need them; the common paths do not)."""
        ...


class EntryList:
    """:class:`Sendable` items from entries at hand."""

    __slots__ = ("_columns", "_entries")

    def __init__(self, entries: Sequence[Entry]) -> None:
        self._entries = entries
        self._columns: list[bytes] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def raw(self) -> bytes:
        return b"".join(compact.records(self._entries))

    def columns(self) -> Sequence[bytes]:
        if self._columns is None:  # (the section and the priority keys both read them)
            self._columns = compact.columns_of(self.raw())
        return self._columns

    def ready_segments(self) -> None:
        return None

    def priority_keys(self) -> list[int]:
        return compact.priority_keys_of(self.columns())

    def lines(self, positions: Sequence[int], mark: int) -> savetext.Lines:
        have = self._entries
        return savetext.join_lines([savetext.render_line(e) for e in map(have.__getitem__, positions)
                                    if savetext.text_problem(e) is None], mark)

    def entries(self) -> Sequence[Entry]:
        return self._entries

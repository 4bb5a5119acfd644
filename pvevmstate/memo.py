"""A bounded memo for the codecs' hot loops.

The codecs remember small derived values per kind of input (an address
printed, a status word spelt out, a record's picker): a VM's entries share few
of each, and looking one up costs less than deriving it again. The memo is a
``dict`` so that a lookup stays one C call (``memo.get``); :meth:`Memo.add`
bounds it whatever the input, by forgetting everything once full.

Two threads may share one: each lookup and each insertion is a single dict
operation, atomic under the GIL, and a lost race only derives a value twice.
"""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Memo(dict[K, V]):
    """A dict of at most ``limit`` items.

    :param limit: how many items it keeps before it starts afresh
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def add(self, key: K, value: V) -> V:
        """Remember ``value`` for ``key`` and return it."""
        if len(self) >= self.limit:
            self.clear()
        self[key] = value
        return value

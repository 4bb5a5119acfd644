"""The codecs' memos stay bounded whatever the input."""

from __future__ import annotations

import socket

from pvevmstate.memo import Memo
from pvevmstate.model import Entry
from pvevmstate.payload import savetext


def test_memo_forgets_everything_once_full() -> None:
    memo: Memo[int, int] = Memo(3)
    for i in range(3):
        assert memo.add(i, i * i) == i * i
    assert dict(memo) == {0: 0, 1: 1, 2: 4}
    memo.add(3, 9)
    assert dict(memo) == {3: 9}


def test_printed_addresses_stay_bounded() -> None:
    memo = savetext._NTOP_CACHE
    for i in range(memo.limit + 10):
        a = socket.inet_aton("10.%d.%d.%d" % (i >> 16, i >> 8 & 255, i & 255))
        b = socket.inet_aton("192.0.2.1")
        savetext.render_line(Entry(socket.AF_INET, 17, a, b, b, a, 1, 2, 2, 1, timeout=1, status=0))
        assert len(memo) <= memo.limit

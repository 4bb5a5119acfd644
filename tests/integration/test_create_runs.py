"""Creates against a real table, through the helper's own netlink code.

A batch longer than the socket's ACK budget goes out in runs, each ending
with the one request that asks for an ACK: the reply that tells the run is
done. Load numbers each chunk (sequence numbers) in its own thread while the
kernel creates the chunk before; a batch numbered ahead must fare exactly as
one the sending thread numbers itself.
"""

from __future__ import annotations

import errno
import socket
from typing import Any, cast

import pytest

from pvevmstate import netlink
from pvevmstate.netlink import conntrack
from tests.integration.test_table_limits import counted, flows
from tests.support import NetnsFactory, conntrack_table

VMID = 100


@pytest.mark.parametrize("max_send", [conntrack.MAX_SEND, 1000], ids=["sends-of-256k", "sends-of-1000"])
@pytest.mark.parametrize("ahead", [False, True], ids=["numbered-when-sent", "numbered-ahead"])
def test_a_batch_past_the_ack_budget_is_created_run_by_run(netns_factory: NetnsFactory, monkeypatch: pytest.MonkeyPatch,
                                                           ahead: bool, max_send: int) -> None:
    # A run goes out in sendmsgs of whole requests, at most MAX_SEND bytes each.
    monkeypatch.setattr(conntrack, "MAX_SEND", max_send)
    ns = netns_factory()
    entries = flows(1000, 1, assured=True)
    with conntrack_table(ns) as table:
        # A run whose last request asked for no ACK would leave create()
        # waiting for a reply that never comes: fail instead of hanging.
        table._sock.settimeout(10)
        sends = Sends(table._sock)
        table._sock = cast(socket.socket, sends)
        table.ack_budget = 64
        # Every 97th entry exists already: refused (EEXIST) wherever it falls in the runs.
        assert table.create(netlink.create_batch(entries[::97], VMID)).created == 11
        batch = netlink.create_batch(entries, VMID)
        if ahead:
            table.number(batch)
            first = batch.first_seq
            table.number(batch)  # numbered once
            assert batch.first_seq == first
        sends.sizes.clear()
        result = table.create(batch)
    assert result.created == 989 and dict(result.failed) == {errno.EEXIST: 11} and not result.unknown
    assert counted(ns, VMID) == 1000
    # Each request went out once.
    assert batch.wire is not None and sum(sends.sizes) == len(batch.wire) and max(sends.sizes) <= max_send


class Sends:
    """The adapter's socket, with the size of every sendmsg written down."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sizes: list[int] = []

    def send(self, data: Any) -> int:
        self.sizes.append(len(data))
        return self.sock.send(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


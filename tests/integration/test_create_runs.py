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
import struct
from typing import Any, cast

import pytest

from pvevmstate import netlink
from pvevmstate.model import Entry
from pvevmstate.netlink import conntrack
from pvevmstate.netlink.schema import NLM_F_ACK
from pvevmstate.payload import savetext
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
    # Each run's last request asked for the ACK only while it went out: the batch is as numbered.
    assert not any(struct.unpack_from("=H", r, 6)[0] & NLM_F_ACK for r in batch.requests())


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



def test_nat_checks_keep_their_numbers_while_load_reserves_the_next_chunks(
        netns_factory: NetnsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Created NAT entries are read back (the kernel may have moved their
    # mapping) in the sending thread, while Load's own thread reserves the
    # next chunk's sequence numbers: the checks must be numbered as one block.
    ns = netns_factory()
    nat = [savetext.parse_line(
        "-A -t 600 -u SEEN_REPLY,ASSURED -s 10.0.0.%d -d 198.51.100.1 -r 198.51.100.1 -n 192.0.2.1 -p tcp "
        "--sport 1000 --dport 80 --reply-port-src 80 --reply-port-dst %d --state ESTABLISHED" % (i, 1000 + i))
        for i in range(1, 4)]
    with conntrack_table(ns) as table:
        table._sock.settimeout(10)  # a check whose reply is never matched would wait for ever
        get_request = netlink.get_request
        calls = 0

        def interleaved(e: Entry, seq: int) -> bytes:
            nonlocal calls
            calls += 1
            if calls == 2:  # as if the Load thread got the GIL between two checks
                table.reserve_seqs(4096)
            return get_request(e, seq)

        monkeypatch.setattr(netlink, "get_request", interleaved)
        result = table.create(netlink.create_batch(nat, VMID))
    assert calls == 3 and result.created == 3 and not result.failed and not result.remapped
    assert counted(ns, VMID) == 3

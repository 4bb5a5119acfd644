"""Creates against a real table, through the helper's own netlink code.

A batch longer than the socket's ACK budget goes out in runs, each ending
with the one request that asks for an ACK: the reply that tells the run is
done. Load numbers each chunk (sequence numbers, ACK flags) in its own
thread while the kernel creates the chunk before; a batch numbered ahead
must fare exactly as one the sending thread numbers itself.
"""

from __future__ import annotations

import errno

import pytest

from pvevmstate import netlink
from tests.integration.test_table_limits import counted, flows
from tests.support import NetnsFactory, conntrack_table

VMID = 100


@pytest.mark.parametrize("ahead", [False, True], ids=["numbered-when-sent", "numbered-ahead"])
def test_a_batch_past_the_ack_budget_is_created_run_by_run(netns_factory: NetnsFactory, ahead: bool) -> None:
    ns = netns_factory()
    entries = flows(1000, 1, assured=True)
    with conntrack_table(ns) as table:
        # A run whose last request asked for no ACK would leave create()
        # waiting for a reply that never comes: fail instead of hanging.
        table._sock.settimeout(10)
        table.ack_budget = 64
        # Every 97th entry exists already: refused (EEXIST) wherever it falls in the runs.
        assert table.create(netlink.create_batch(entries[::97], VMID)).created == 11
        batch = netlink.create_batch(entries, VMID)
        if ahead:
            table.number(batch)
            first = batch.first_seq
            table.number(batch)  # numbered once
            assert batch.first_seq == first
        result = table.create(batch)
    assert result.created == 989 and dict(result.failed) == {errno.EEXIST: 11} and not result.unknown
    assert counted(ns, VMID) == 1000


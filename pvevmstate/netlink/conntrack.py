"""Conntrack adapter: a ctnetlink socket opened by pyroute2, driven by our codec.

pyroute2 creates the NETLINK_NETFILTER socket (in the caller's network
namespace); the hot path then talks to that socket directly with batched
requests and :mod:`pvevmstate.netlink`, because pyroute2's generic message
classes cost 30 to 50 times what the kernel does. Everything here
blocks: the daemon runs it in a worker thread.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import errno
import importlib.util
import itertools
import logging
import os
import queue
import socket
import struct
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar, cast

if TYPE_CHECKING:
    from pyroute2 import NFCTSocket

from .. import netlink
from ..errors import ConntrackError
from ..model import CreateBatch, CreateResult, Entry, TableStats

log = logging.getLogger(__name__)


def _nfct_socket_class() -> type[NFCTSocket]:
    """pyroute2's NFCTSocket, imported without the rest of pyroute2 where it can be.

    ``import pyroute2`` runs its package ``__init__``, which imports every
    part of the library (routing, NDB, wireless, ethtool, ...): measured
    ~20 MiB of the helper's resident memory and ~0.2 s of its start with
    pyroute2 0.7.7 and 0.9.7, for one socket class. So, unless pyroute2 is
    loaded already, its package is entered as a bare module for the one
    import (its submodules are found by its path as usual) and taken out
    again after: a later ``import pyroute2`` runs the real ``__init__`` and
    reuses the modules loaded here. Should a pyroute2 need its ``__init__``
    for this import, the plain import is used instead.
    """
    if "pyroute2" not in sys.modules:
        spec = importlib.util.find_spec("pyroute2")
        if spec is not None and spec.submodule_search_locations is not None:
            sys.modules["pyroute2"] = importlib.util.module_from_spec(spec)
            try:
                from pyroute2.netlink.nfnetlink.nfctsocket import NFCTSocket as bare
            except ImportError:
                pass
            else:
                return cast("type[NFCTSocket]", bare)
            finally:
                del sys.modules["pyroute2"]
    from pyroute2 import NFCTSocket as whole

    return cast("type[NFCTSocket]", whole)


_NFCTSocket = _nfct_socket_class()

SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
# Requested buffer sizes; SO_*BUFFORCE needs CAP_NET_ADMIN, which the helper has.
RCVBUF = 8 << 20
SNDBUF = 4 << 20
# Kernel cost of one queued error/ACK in the receive buffer (measured: ~832 bytes).
ACK_COST = 1024
# One sendmsg stays well under the send buffer (EMSGSIZE otherwise).
MAX_SEND = 256 << 10
DUMP_ATTEMPTS = 4
#: Seconds after which an idle dump receiver looks whether it is still wanted.
RECEIVER_WAKEUP = 0.05
_DONE = struct.Struct("=IHHI")
_ERROR_SIZE = 16 + 4 + 16  # header, errno, the request's header (NETLINK_CAP_ACK)


def _ends_dump(data: bytes, n: int, seq: int) -> bool:
    """Whether a datagram ends with dump ``seq``'s NLMSG_DONE or error (judged by its tail only)."""
    for size, kind in ((20, netlink.NLMSG_DONE), (_ERROR_SIZE, netlink.NLMSG_ERROR)):
        if n >= size:
            length, mtype, _flags, mseq = _DONE.unpack_from(data, n - size)
            if length == size and mtype == kind and mseq == seq:
                return True
    return False


def _reply_differs(e: Entry) -> bool:
    """Whether ``e``'s reply tuple is not its original tuple mirrored (NAT)."""
    return (e.reply_src != e.orig_dst or e.reply_dst != e.orig_src
            or e.reply_sport != e.dport or e.reply_dport != e.sport)


def _same_reply(want: Entry, got: Entry) -> bool:
    return (got.reply_src == want.reply_src and got.reply_dst == want.reply_dst
            and (want.reply_sport is None or got.reply_sport == want.reply_sport)
            and (want.reply_dport is None or got.reply_dport == want.reply_dport)
            and (want.reply_icmp_id is None or got.reply_icmp_id == want.reply_icmp_id))


def open_netlink_socket() -> socket.socket:
    """Open a ctnetlink socket through pyroute2 and take over its descriptor.

    pyroute2 0.7 and 0.9 differ in everything above the socket; the descriptor
    is what both have in common, so we keep a duplicate and let pyroute2's
    object go.

    :raises ConntrackError: without netlink access (no CAP_NET_ADMIN, no
        module, no file descriptor left): every OSError of the opening, so the
        daemon reports it as what it is, not as an unexpected error
    """
    try:
        nl = _NFCTSocket(nfgen_family=socket.AF_UNSPEC)
        try:
            sock = socket.socket(fileno=os.dup(nl.fileno()))
        finally:
            nl.close()
    except OSError as err:
        raise ConntrackError("cannot open a ctnetlink socket", err.errno) from err
    try:
        sock.bind((0, 0))
        for name, opt, fallback, size in (
            ("receive", 33, socket.SO_RCVBUF, RCVBUF),  # SO_RCVBUFFORCE
            ("send", 32, socket.SO_SNDBUF, SNDBUF),  # SO_SNDBUFFORCE
        ):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, size)
            except OSError:
                log.debug("no CAP_NET_ADMIN for a forced %s buffer, using the default limit", name)
                sock.setsockopt(socket.SOL_SOCKET, fallback, size)
        # Error replies then carry only the header, not our whole request.
        with contextlib.suppress(OSError):
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
    except OSError as err:
        sock.close()
        raise ConntrackError("cannot set up the ctnetlink socket", err.errno) from err
    return sock


class DumpSink(Protocol):
    """What the datagrams of a dump go to (:meth:`Conntrack.dump_into`)."""

    def feed(self, buf: bytes, size: int, seq: int) -> netlink.DumpChunk:
        """Take in one datagram of the dump whose request had ``seq``."""
        ...


S = TypeVar("S", bound=DumpSink)


class _Entries:
    """A dump decoded into entries."""

    def __init__(self, layouts: netlink.LayoutCache) -> None:
        self.entries: list[Entry] = []
        self._layouts = layouts

    def feed(self, buf: bytes, size: int, seq: int) -> netlink.DumpChunk:
        return netlink.decode_dump(buf, size, seq, self.entries, self._layouts)


class Conntrack:
    """The conntrack table of the network namespace the socket was opened in.

    Not thread-safe: one operation at a time (VMState serialises them),
    except :meth:`reserve_seqs`.
    """

    def __init__(self, sock: socket.socket | None = None, buffer_size: int = 1 << 20) -> None:
        self._sock = sock if sock is not None else open_netlink_socket()
        self._seq = 0
        # Load numbers its next batch while the one before is in flight.
        self._seq_lock = threading.Lock()
        # A dump's datagrams are at most 32 KiB (the kernel caps them so);
        # the rest of the default is for the replies a create batch piles up.
        self._buf = bytearray(buffer_size)
        #: Dump layouts learned on this table's messages (kept across dumps and socket reopenings).
        self._layouts = netlink.LayoutCache()
        try:
            rcvbuf = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        except OSError as err:
            self._sock.close()
            raise ConntrackError("cannot read the ctnetlink receive buffer size", err.errno) from err
        #: Requests that may be answered before we read: beyond this, replies are lost.
        self.ack_budget = max(32, rcvbuf // ACK_COST // 2)

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()

    def _next_seq(self) -> int:
        return self.reserve_seqs(1)

    def _recv(self) -> tuple[bytes, int]:
        n = self._sock.recv_into(self._buf, len(self._buf), socket.MSG_TRUNC)
        if n > len(self._buf):
            raise ConntrackError("netlink message larger than the receive buffer")
        return bytes(memoryview(self._buf)[:n]), n

    @property
    def layouts(self) -> netlink.LayoutCache:
        """The message layouts learned on this table's dumps (a scan keys messages by them)."""
        return self._layouts

    def dump(self, mark: int) -> list[Entry]:
        """Return every entry (IPv4 and IPv6) whose mark equals ``mark``.

        :param mark: the CONNMARK to select
        :raises ConntrackError: when the dump fails or keeps being interrupted
        """
        sink = self.dump_into(mark, lambda: _Entries(self._layouts))
        assert sink is not None
        return sink.entries

    def dump_into(self, mark: int, sink: Callable[[], S], stop: threading.Event | None = None,
                  overlap: bool = False) -> S | None:
        """Feed every datagram of a dump of the entries with ``mark`` to a new ``sink()``.

        The kernel filters by mark and full mask. An interrupted dump
        (NLM_F_DUMP_INTR) or an overrun (ENOBUFS) is restarted, with a new
        sink, on a fresh socket, a few times at most.

        :param mark: the CONNMARK to select
        :param sink: makes what the datagrams go to (one per attempt)
        :param stop: when set, the dump is abandoned between two datagrams
            and None returned; the table is closed then (the kernel still has
            the rest of the dump queued for its socket, and whoever stopped
            it wants the CPU, not a new socket)
        :param overlap: receive in a second thread while this one feeds the
            sink (:meth:`_dump_overlapped`; not with ``stop``)
        :raises ConntrackError: when the dump fails or keeps being interrupted
        """
        for attempt in range(1, DUMP_ATTEMPTS + 1):
            into = sink()
            try:
                interrupted = self._dump_once(mark, into, stop, overlap)
            except OSError as err:
                if err.errno != errno.ENOBUFS:
                    raise ConntrackError("conntrack dump failed", err.errno) from err
                reason = "overran the receive buffer (ENOBUFS)"
            else:
                if interrupted is None:
                    self.close()
                    return None
                if not interrupted:
                    return into
                reason = "was interrupted by a table change (NLM_F_DUMP_INTR)"
            log.warning("conntrack dump %s, restarting (attempt %d of %d)",
                        reason, attempt, DUMP_ATTEMPTS)
            # The old dump may still be queued on this socket: start clean.
            self._reopen()
        raise ConntrackError("conntrack dump did not complete after %d attempts" % DUMP_ATTEMPTS)

    def _reopen(self) -> None:
        self._sock.close()
        self._sock = open_netlink_socket()

    def _dump_once(self, mark: int, into: DumpSink, stop: threading.Event | None,
                   overlap: bool = False) -> bool | None:
        """Whether the dump was interrupted; None when it was abandoned (``stop``)."""
        seq = self._next_seq()
        self._sock.send(netlink.dump_request(seq, mark))
        if overlap and stop is None:
            return self._dump_overlapped(seq, into)
        interrupted = False
        while True:
            if stop is not None and stop.is_set():
                return None
            data, n = self._recv()
            chunk = into.feed(data, n, seq)
            interrupted = interrupted or chunk.interrupted
            if chunk.done:
                return interrupted

    def _dump_overlapped(self, seq: int, into: DumpSink) -> bool:
        """Feed the dump ``seq`` to ``into`` while a second thread receives it; whether it was interrupted.

        The kernel builds a dump's next datagram inside the recv() that
        returns the previous one, with the GIL let go: a receiving thread
        keeps it busy while this one feeds the sink, and the dump costs about
        the longer of the two instead of their sum. The receiver stops at a
        datagram that ends with the dump's NLMSG_DONE or error; should it take
        one for the end wrongly, this thread receives the rest itself, and
        should it miss the end, it wakes from its socket timeout and sees
        that this thread is done. Either way it is joined before the socket
        serves anything else.
        """
        items: queue.SimpleQueue[tuple[bytes, int] | OSError | ConntrackError | None] = queue.SimpleQueue()
        finished = threading.Event()

        def receive() -> None:
            try:
                while not finished.is_set():
                    try:
                        data, n = self._recv()
                    except TimeoutError:
                        continue
                    items.put((data, n))
                    if _ends_dump(data, n, seq):
                        break
            except (OSError, ConntrackError) as err:
                items.put(err)
                return
            items.put(None)

        self._sock.settimeout(RECEIVER_WAKEUP)
        receiver = threading.Thread(target=receive, name="ctnetlink-dump", daemon=True)
        receiver.start()
        interrupted = False
        receiving = True
        try:
            while True:
                item = items.get() if receiving else None
                if item is None:
                    if receiving:
                        receiver.join()
                        receiving = False
                        self._sock.settimeout(None)
                    item = self._recv()
                elif isinstance(item, BaseException):
                    raise item
                data, n = item
                chunk = into.feed(data, n, seq)
                interrupted = interrupted or chunk.interrupted
                if chunk.done:
                    return interrupted
        finally:
            finished.set()
            receiver.join()
            self._sock.settimeout(None)

    def stats(self) -> TableStats:
        """The namespace's entry count and ``nf_conntrack_max``, asked over this socket.

        Over netlink rather than from ``/proc/sys/net/netfilter``: the count is
        per network namespace, and the socket is in the right one whichever
        thread asks.

        :raises ConntrackError: when the kernel does not answer
        """
        seq = self._next_seq()
        try:
            self._sock.send(netlink.stats_request(seq))
            while True:
                data, n = self._recv()
                found = netlink.decode_stats(data, n, seq)
                if found is not None:
                    break
        except OSError as err:
            raise ConntrackError("reading the conntrack table's size failed", err.errno) from err
        count, maximum = found
        if maximum is None:
            # Kernels before 4.x do not report it; it is one value for all namespaces.
            with open("/proc/sys/net/netfilter/nf_conntrack_max", encoding="ascii") as f:
                maximum = int(f.read())
        return TableStats(count, maximum)

    def create(self, batch: CreateBatch) -> CreateResult:
        """Create each entry of ``batch``; one refusal never stops the others.

        Requests go out many per ``sendmsg``, in runs of at most
        :attr:`ack_budget`. Only the last request of a run asks for an ACK;
        the kernel answers failed requests anyway, so a run costs one round
        trip, and a run never exceeds what the receive buffer can hold in
        replies.

        :param batch: the requests (made from entries by
            :func:`pvevmstate.netlink.create_batch`, or by Load from records)
        :raises ConntrackError: when the socket itself fails
        """
        result = CreateResult()
        unlabeled: list[Entry] = []
        self._create_runs(batch, result, unlabeled)
        if unlabeled:
            # Labels exist only where a ruleset uses them (EOPNOTSUPP otherwise);
            # the entry itself matters more than its labels.
            log.warning("%d entries carry conntrack labels, which this host does not use; "
                        "creating them without", len(unlabeled))
            result.failed[errno.EOPNOTSUPP] -= len(unlabeled)
            if not result.failed[errno.EOPNOTSUPP]:
                del result.failed[errno.EOPNOTSUPP]
            self._create_runs(netlink.create_batch(unlabeled, batch.mark), result, None)
        return result

    def _create_runs(self, batch: CreateBatch, result: CreateResult, unlabeled: list[Entry] | None) -> None:
        """Number ``batch`` unless it is, and create it a run of :attr:`ack_budget` requests at a time."""
        self.number(batch)
        for start in range(0, len(batch), self.ack_budget):
            self._create_batch(batch, start, min(start + self.ack_budget, len(batch)), result, unlabeled)

    def reserve_seqs(self, n: int) -> int:
        """The first of ``n`` consecutive sequence numbers (all within
        1..0x7FFFFFFF), for a batch numbered as it is made. The only call
        that may run beside another of this adapter's: Load makes the next
        batch while the kernel creates the one before."""
        with self._seq_lock:
            if self._seq + n > 0x7FFFFFFF:
                self._seq = 0
            first = self._seq + 1
            self._seq += n
            return first

    def number(self, batch: CreateBatch) -> None:
        """Give an unnumbered ``batch`` its requests' headers (:attr:`CreateBatch.wire`)."""
        if batch.wire is None:
            first = self.reserve_seqs(len(batch))
            requests = [netlink.create_header(len(b), seq) + b for seq, b in enumerate(batch.bodies, first)]
            batch.wire = bytearray(b"".join(requests))
            batch.starts = list(itertools.accumulate(map(len, requests), initial=0))
            batch.first_seq = first

    def _verify_nat(self, wanted: dict[int, Entry]) -> int:
        """How many of the created NAT entries ``wanted`` the kernel mapped elsewhere.

        When another entry already holds the reply tuple a NAT entry asks for,
        the kernel does not refuse it: it picks another port (or address) of
        the range, and the entry is created with a mapping the guest never
        used. Reading each created NAT entry back is the only way to tell.

        :param wanted: created entries whose reply tuple is not their original
            one mirrored, by any distinct keys
        """
        if not wanted:
            return 0
        # Reserved at once: Load may reserve the next chunk's numbers meanwhile, from its own thread.
        first = self.reserve_seqs(len(wanted))
        try:
            self._sock.send(b"".join(netlink.get_request(e, seq) for seq, e in enumerate(wanted.values(), first)))
        except OSError as err:
            raise ConntrackError("sending NAT checks failed", err.errno) from err
        index = dict(enumerate(wanted))
        remapped = answered = 0
        while answered < len(wanted):
            try:
                data, n = self._recv()
            except OSError as err:
                if err.errno == errno.ENOBUFS:
                    self._drain()
                    return remapped
                raise ConntrackError("reading NAT checks failed", err.errno) from err
            for seq, got, _code in netlink.iter_get_replies(data, n, self._layouts):
                i = index.get(seq - first)
                if i is None:
                    continue
                answered += 1
                if got is not None and not _same_reply(wanted[i], got):
                    remapped += 1
        return remapped

    def _create_batch(self, batch: CreateBatch, start: int, stop: int, result: CreateResult,
                      unlabeled: list[Entry] | None) -> None:
        """Create ``batch``'s requests ``start`` to ``stop`` (at most ``ack_budget``)."""
        count = stop - start
        if count <= 0:
            return
        wire, starts = batch.wire, batch.starts
        assert wire is not None  # numbered by _create_runs()
        first = batch.first_seq + start
        last_seq = first + count - 1
        # The last request of the run asks for the ACK that tells the run is
        # done; only while the run is sent (a batch sent again, in other runs,
        # must not ask for ACKs the receive buffer was not sized for).
        at = starts[stop - 1] + netlink.FLAGS_OFFSET
        unacked = wire[at:at + 2]
        wire[at:at + 2] = netlink.CREATE_ACK_FLAGS
        try:
            with memoryview(wire) as view:
                a, end = starts[start], starts[stop]
                while a < end:  # sendmsg by sendmsg, each whole requests and at most MAX_SEND bytes
                    b = end if end - a <= MAX_SEND else starts[bisect.bisect_right(starts, a + MAX_SEND) - 1]
                    if b <= a:  # (no request is that long; never loop)
                        b = starts[bisect.bisect_right(starts, a)]
                    self._sock.send(view[a:b])
                    a = b
        except OSError as err:
            raise ConntrackError("sending create requests failed", err.errno) from err
        finally:
            wire[at:at + 2] = unacked

        entries = batch.entries
        failed = 0
        refused: set[int] = set()
        while True:
            try:
                data, n = self._recv()
            except OSError as err:
                if err.errno == errno.ENOBUFS:
                    # Replies were dropped; we cannot tell which entries failed.
                    log.warning("conntrack replies overran the receive buffer; "
                                "results of %d entries unknown", count - failed)
                    result.unknown += count - failed
                    self._drain()
                    return
                raise ConntrackError("reading create replies failed", err.errno) from err
            for seq, code in netlink.iter_acks(data, n):
                if not first <= seq <= last_seq:
                    continue
                if code:
                    failed += 1
                    result.failed[code] += 1
                    refused.add(start + seq - first)
                    entry = entries.get(start + seq - first)
                    if unlabeled is not None and code == errno.EOPNOTSUPP and entry is not None and entry.labels:
                        unlabeled.append(dataclasses.replace(entry, labels=None))
                if seq == last_seq:
                    result.created += count - failed
                    if entries:
                        result.remapped += self._verify_nat({
                            i: e for i in range(start, stop)
                            if (e := entries.get(i)) is not None and i not in refused and _reply_differs(e)})
                    return

    def _drain(self) -> None:
        self._sock.setblocking(False)
        try:
            while True:
                self._sock.recv_into(self._buf)
        except OSError:
            pass
        finally:
            self._sock.setblocking(True)

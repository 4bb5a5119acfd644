"""The helper's heap: small while it waits for Save, already mapped when Save builds its payload.

A page of memory the process touches for the first time costs a page fault
(the kernel finds and zeroes a page): ~4.4 µs a 4 KiB page on the VMs this
was measured on, so a fresh MiB costs ~1 ms. Save assembles a payload of up
to 1 MiB inside the VM's downtime and allocates several MiB for it (the
columns, the lines, the joined payload): at 5,000 entries that was ~1,400
page faults, ~6 ms of a Save of ~60.

So, with glibc's allocator:

* :func:`configure`, at start: one arena for every thread, blocks of up to
  32 MiB from that heap rather than mappings of their own, and no trimming
  when a block is freed. Memory one step frees is then memory the next one
  reuses, whichever thread asks.
* :func:`trim`, after each background dump: what the dump freed goes back
  to the system at once, and as much memory as Save will touch (at most
  :data:`KEEP_MAX`, :func:`keep_size`) is mapped again, touched and freed, so
  the helper waits for Save with its cache, that memory and little more (the
  idle memory the README states); and half a second after Save or Load was
  answered (``daemon.AFTER_ANSWER``), keeping nothing, so that it lingers with
  as little.
* :class:`Prefault`, during Save's dump, for what is not kept mapped
  (:func:`kept`; all of it before the first background dump): the thread
  that reads the dump touches the memory the assembly will use, a slice
  after each datagram, while it would otherwise wait for the kernel's next
  one. Freed before the assembly starts, the pages stay mapped in the heap
  and the assembly's blocks come from them. Page faults during the dump
  still cost: ~5 MiB at 5,000 entries are ~1,300 faults, ~6 ms of CPU in
  the scan's thread, while the kernel works in the other one on a machine
  where two threads do not get two whole cores. Touched after the
  background dump instead, a Save of 5,000 entries takes ~320 page faults
  instead of ~1,650. What that is worth depends on how busy the machine
  is (``python -m tests.bench.ab``, fresh helpers, alternating): in a slow
  period 57.5 against 60.7 and 52.7 against 54.4 ms at 5,000 entries
  (medians of 14 and 16; 11 of 16 pairs faster) and 305.5 against 309.9
  and 274.1 against 286.7 ms at 50,000 (7 and 6 of 8); in calm periods nothing (38.8 against 37.7 and
  43.9 against 43.2 ms, 8 of 20 pairs faster each time), when the faults
  hide behind the kernel's work. It costs the idle helper that memory.

Elsewhere (musl, or a glibc without these knobs) all of this does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading

log = logging.getLogger(__name__)

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

#: Blocks below this come from the heap (glibc's largest mmap threshold).
MMAP_THRESHOLD = 32 << 20
#: Touched after each datagram of Save's dump: small enough that the reading
#: thread is done with it before the kernel has the next datagram ready
#: (~1 ms each here), large enough that a dump has slices to spare.
SLICE = 256 << 10
#: What Save's assembly uses besides its entries' share, and that share: with
#: these, the assembly after the dump took 0 to 11 page faults at 5,000 and at
#: 50,000 entries (2 MiB as the base left ~200 to ~650 at 5,000). Each page
#: touched ahead costs the scan's thread ~4.4 µs during the dump.
PREFAULT_BASE = 4 << 20
PREFAULT_PER_ENTRY = 200
#: At most this much is touched ahead (a 200,000-entry table).
PREFAULT_MAX = 96 << 20
#: At most this much of it is kept mapped while the helper waits for Save
#: (:func:`trim`): 5 MiB at 5,000 entries, 8 of 14 MiB at 50,000, within
#: the README's idle memory (40 MiB and 300 bytes per cached entry at most).
KEEP_MAX = 8 << 20


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt  # noqa: B018 -- glibc's, or not there
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def _allocator() -> ctypes.CDLL | None:
    """The C library with malloc, memset and free typed for :class:`Prefault`."""
    libc = _libc()
    if libc is not None:
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.memset.restype = ctypes.c_void_p
        libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
        libc.free.restype = None
        libc.free.argtypes = [ctypes.c_void_p]
    return libc


def configure() -> bool:
    """Set the allocator up as the module docstring says; whether it could be.

    Call it before a second thread exists: arenas are made per thread.
    """
    libc = _libc()
    if libc is None:
        return False
    # mallopt returns 1 on success. The thresholds set explicitly also stop
    # glibc from moving them on its own as blocks are freed.
    done = (libc.mallopt(_M_ARENA_MAX, 1) == 1, libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1,
            libc.mallopt(_M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD) == 1)
    if not all(done):
        log.debug("the allocator took only some settings: %s", done)
    return all(done)


class _Kept:
    """How much freed memory :func:`trim` mapped again (threads trim and read it)."""

    lock = threading.Lock()
    size = 0


def trim(keep: int = 0, stop: threading.Event | None = None) -> None:
    """Give the memory the process freed back to the system (glibc's
    malloc_trim), then map ``keep`` bytes again: touched and freed, they stay
    with the heap for the next blocks (:func:`kept`).

    :param stop: set when Save has begun (the background dump's): then
        nothing is trimmed (Save counts on what is mapped), and touching stops
        at the next slice (Save wants the CPU)
    """
    libc = _libc()
    if libc is None:
        return
    with _Kept.lock:
        if stop is not None and stop.is_set():
            return
        libc.malloc_trim(0)
        _Kept.size = 0
        if keep > 0:
            touched = Prefault(keep)
            _Kept.size = touched.fill(stop)
            touched.release()


def kept() -> int:
    """Bytes the last :func:`trim` mapped again (0 once a trim kept none).

    Waits for a :func:`trim` under way: one told to stop ends within a slice.
    """
    with _Kept.lock:
        return _Kept.size


def prefault_size(entries: int) -> int:
    """How much memory Save's assembly of ``entries`` entries is expected to touch."""
    return min(PREFAULT_BASE + PREFAULT_PER_ENTRY * entries, PREFAULT_MAX)


def keep_size(entries: int) -> int:
    """How much of :func:`prefault_size` to keep mapped while waiting for a
    Save of ``entries`` entries (none for an empty table)."""
    return min(prefault_size(entries), KEEP_MAX) if entries else 0


class Prefault:
    """Memory touched a slice at a time (:meth:`step`), then freed for reuse (:meth:`release`).

    The slices are the C library's own blocks, filled by its ``memset``:
    ctypes lets go of the GIL for both calls, so the page faults do not hold
    up the thread that receives the dump (it needs the GIL after each
    datagram, and the kernel makes the next one only when asked).

    :param size: how much to touch in all
    :param mapped: how much of it is mapped already (:func:`kept`): taken
        first, in one block and untouched, so that the slices touched after
        it are memory the heap does not have yet (a slice would otherwise
        come from the very memory kept mapped and touch nothing new, and what
        Save allocates beyond it would fault where it is first used)
    """

    __slots__ = ("_bytes", "_held", "_left", "_libc", "_mapped")

    def __init__(self, size: int, mapped: int = 0) -> None:
        self._libc = _allocator()
        self._held: list[int] = []
        self._left = size if self._libc is not None else 0
        self._bytes = 0
        self._mapped: int | None = None
        if mapped >= size:
            self._left = 0
        elif mapped > 0 and self._libc is not None:
            self._mapped = self._libc.malloc(mapped) or None
            if self._mapped is not None:
                self._left -= mapped

    def step(self) -> None:
        """Touch the next slice, if any is left."""
        if self._left <= 0 or self._libc is None:
            return
        size = min(SLICE, self._left)
        self._left -= size
        block = self._libc.malloc(size)
        if block:
            self._libc.memset(block, 0, size)
            self._held.append(block)
            self._bytes += size

    def fill(self, stop: threading.Event | None = None) -> int:
        """Touch every slice left now, or until ``stop`` is set; :attr:`touched` then."""
        while self._left > 0 and self._libc is not None and not (stop is not None and stop.is_set()):
            self.step()
        return self._bytes

    @property
    def touched(self) -> int:
        """Bytes touched so far and not yet released."""
        return self._bytes

    def release(self) -> None:
        """Free what was touched: the allocator hands it out again."""
        if self._libc is not None:
            for block in self._held:
                self._libc.free(block)
            if self._mapped is not None:
                self._libc.free(self._mapped)
        self._held.clear()
        self._mapped = None
        self._left = self._bytes = 0

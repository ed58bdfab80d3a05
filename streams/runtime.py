"""Process-wide tuning shared by `trackside up` and the faust workers, and the tie of a child to its parent."""

import ctypes
import gc
import os
import signal
import sys
import tempfile
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child, before exec: the kernel kills it when its parent dies, even by kill -9."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def tune_gc() -> None:
    """Collect young objects less often: batches allocate ~100k dicts that all live until landed.

    With CPython's default threshold (700) the collector runs over and over during every
    batch; measured here, validating an event dropped from 10.4 to 6.1 µs with this.
    """
    gc.freeze()
    gc.set_threshold(200_000, 20, 100)


_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_BYTES = 128 << 10  # glibc's initial threshold, kept


def tune_malloc() -> None:
    """At a worker's start, before any thread: every thread allocates from one C heap, and blocks
    of 128 KB and more are mapped apart, always. A rebuild reads pages of rows in a thread of
    the executor; with glibc's defaults that thread got a heap of its own whose freed pages the
    next stages never reused, and freed big blocks (a page of rows as JSON, ~10 MB) raised the
    threshold above which blocks are mapped apart, so later ones stayed in the heap. In a
    14-minute soak, 4 minutes after a restart the worker's C heap held 296 MB free (55 before
    it) while its Python objects had grown 15 MB; with this, 37-54 MB, and the worker's peak
    after the restart was 811 MB instead of 904 (`memory_report`, jobs/README.md). The worker's
    threads take turns on the GIL: one heap costs them nothing. Not in `up`: its embedded
    ClickHouse allocates from many threads at once, and a query that builds many strings took
    5-20% longer with one heap."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_ARENA_MAX, 1)
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)  # a set threshold no longer moves
    except (OSError, AttributeError):  # not glibc
        pass


def release_memory() -> None:
    """Give the C heap's free pages back to the kernel (glibc's malloc_trim). After a rebuild has
    read and dropped page after page of rows, the process would otherwise stay resident at its
    high-water mark: freed large blocks stay in the heap for the next allocation."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def resident_bytes(pid: int) -> int | None:
    """Resident memory of a process (its VmRSS), or None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), None)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def memory_report() -> str:
    """Where the process's memory is, in MB, for a diagnostic log line: resident; Python's own
    allocator (pymalloc: its arenas, the blocks in use in them); the C heap (glibc: in use, free
    but held, mapped apart). Arenas much larger than the blocks in them, or a C heap holding much
    free, is memory a rebuild left behind, not state. Takes a few milliseconds."""
    parts = []
    parts.append(f"resident {(resident_bytes(os.getpid()) or 0) / 2**20:.0f}")
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as out:  # sys._debugmallocstats writes to C's stderr
            os.dup2(out.fileno(), 2)
            try:
                sys._debugmallocstats()
            finally:
                os.dup2(saved, 2)
            out.seek(0)
            stats = {line.split("=")[0].strip("# ").strip(): int(line.split("=")[1].replace(",", ""))
                     for line in out.read().decode().splitlines() if line.startswith("# ") and "=" in line}
        arenas = stats.get("arenas allocated current", 0) << 20  # of 1 MB each (CPython 3.10+)
        parts.append(f"pymalloc arenas {arenas / 2**20:.0f} (blocks in use {stats.get('bytes in allocated blocks', 0) / 2**20:.0f})")
    finally:
        os.close(saved)
    try:
        info = ctypes.CDLL("libc.so.6").mallinfo2
        info.restype = _MallInfo2
        heap = info()
        parts.append(f"C heap in use {heap.uordblks / 2**20:.0f}, free {heap.fordblks / 2**20:.0f}, "
                     f"mapped {heap.hblkhd / 2**20:.0f}")
    except (OSError, AttributeError):  # not glibc 2.33+
        pass
    return "; ".join(parts) + " (MB)"

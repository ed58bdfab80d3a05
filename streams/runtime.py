"""Process-wide tuning shared by `trackside up` and the faust workers, and the tie of a child to its parent."""

import ctypes
import gc
import signal

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


def release_memory() -> None:
    """Give the C heap's free pages back to the kernel (glibc's malloc_trim). After a rebuild has
    read and dropped page after page of rows, the process would otherwise stay resident at its
    high-water mark: freed large blocks stay in the heap for the next allocation."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass

"""Process-wide tuning shared by `trackside up` and the faust workers."""

import gc


def tune_gc() -> None:
    """Collect young objects less often: batches allocate ~100k dicts that all live until landed.

    With CPython's default threshold (700) the collector runs over and over during every
    batch; measured here, validating an event dropped from 10.4 to 6.1 µs with this.
    """
    gc.freeze()
    gc.set_threshold(200_000, 20, 100)

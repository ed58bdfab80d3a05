"""Running it: the embedded stack, the broker and child processes, the alert forwarder, the pipeline watch."""

"""The faust stages: thin agents over per-partition state, rebuilt from the store when a worker takes a partition."""

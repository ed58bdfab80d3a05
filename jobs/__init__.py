"""Batch and one-shot jobs: publishing, the simulator, the demo, benchmarks."""

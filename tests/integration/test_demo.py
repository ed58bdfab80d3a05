"""`trackside demo` (what `make demo` runs) ends by itself, with every run landed and nothing left running."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.integration


def test_demo_lands_every_run_and_prints_the_summary(tmp_path):
    env = {**os.environ, "TRACKSIDE_DATA_DIR": str(tmp_path), "TRACKSIDE_EMBEDDED_PORT": str(free_port())}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "trackside"), "demo"], env=env, capture_output=True, timeout=300
    )
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert "600 of 600 runs landed" in out
    for heading in ("per agent and version", "Alerts sent", "Largest failure clusters"):
        assert heading in out
    assert not list((tmp_path / "demo" / "run").glob("*.pid")), "a child process was left behind"

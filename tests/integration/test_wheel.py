"""The built wheel on its own (issue 11.1): installed with no checkout around it, `trackside up`
creates its store from the SQL inside the wheel and every run of a published fleet lands.

The wheel is built from what infra/Dockerfile copies, installed with `pip install --no-deps
--target` (the dependencies come from this venv), and run with that directory alone on
PYTHONPATH and the working directory outside the checkout.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from jobs.simulate import FleetConfig, simulate
from tests.conftest import RunningStack

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
# What infra/Dockerfile copies before `pip install .`.
SOURCES = ("pyproject.toml", "README.md", "streams", "jobs", "sql")


def pip(*args: str, cwd: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                   cwd=cwd, check=True, capture_output=True, timeout=600)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A directory that holds the installed wheel and nothing else of the project."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in SOURCES:
        origin = ROOT / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(origin, source / name)
    pip("wheel", "--no-deps", "--wheel-dir", str(work / "dist"), str(source), cwd=work)
    (wheel,) = (work / "dist").glob("trackside-*.whl")
    pip("install", "--no-deps", "--target", str(work / "site"), str(wheel), cwd=work)
    shutil.rmtree(source)
    return work / "site"


@pytest.fixture(scope="module")
def wheel_stack(installed, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    yield from RunningStack(outside / "data", {"PYTHONPATH": str(installed)}, trackside=installed / "bin" / "trackside",
                            cwd=outside).with_console().running()


def test_the_code_and_its_sql_come_from_the_wheel(installed, wheel_stack):
    probe = ("import streams, streams.store.migrations as m, streams.store.saved_queries as q; "
             "print(streams.__file__); print(m.MIGRATIONS); print(q.QUERIES); print(len(m.load_migrations()))")
    out = subprocess.run([sys.executable, "-c", probe], env=wheel_stack.env, cwd=wheel_stack.cwd,
                         capture_output=True, check=True, text=True).stdout.split()
    package, migrations, queries, count = out
    for path in (package, migrations, queries):
        assert Path(path).resolve().is_relative_to(installed.resolve()), path
    assert not Path(migrations).is_symlink() and int(count) >= 2
    assert not wheel_stack.cwd.resolve().is_relative_to(ROOT.resolve())


def test_up_from_the_wheel_lands_every_run_of_a_fleet(wheel_stack, tmp_path):
    events = list(simulate(FleetConfig(seed=5, runs=40)))
    fleet = tmp_path / "fleet.jsonl"
    fleet.write_bytes(b"\n".join(orjson.dumps(event) for event in events) + b"\n")
    assert wheel_stack.cli("publish", str(fleet)).returncode == 0
    run_ids = {event["run_id"] for event in events}
    assert wheel_stack.wait_for_count("SELECT count() FROM runs", len(run_ids)) == len(run_ids)
    landed = wheel_stack.cli("sql", "--format", "JSONEachRow", "SELECT run_id FROM runs").stdout.splitlines()
    assert {orjson.loads(line)["run_id"] for line in landed} == run_ids


def test_saved_queries_run_from_the_wheel(wheel_stack):
    result = wheel_stack.cli("sql", "--file", "alerts_firing", "--format", "JSONEachRow", check=False)
    assert result.returncode == 0, result.stderr.decode()


def test_the_console_serves_its_pages_and_scripts_from_the_wheel(wheel_stack):
    # the templates and the shipped chart library are package data: a page and a script load
    import urllib.request

    status, health = wheel_stack.api("/healthz")
    assert status == 200 and health["ok"] is True
    for path, marker in (("/", b"<h1>Fleet"), ("/static/uPlot.iife.min.js", b"uPlot")):
        with urllib.request.urlopen(f"http://127.0.0.1:{wheel_stack.console_port}{path}", timeout=30) as response:
            assert response.status == 200 and marker in response.read()

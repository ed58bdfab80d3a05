"""Every TRACKSIDE_* setting the deployment files use exists in the settings class."""

import re
from pathlib import Path

import pytest

from streams.settings import Settings

INFRA = Path(__file__).parents[2] / "infra"
FILES = sorted(p for p in INFRA.rglob("*") if p.is_file() and p.suffix in {".yaml", ".yml", ".toml", ""}
               and p.name != "README.md")


def test_the_deployment_files_are_there():
    names = {p.relative_to(INFRA).as_posix() for p in FILES}
    assert {"Dockerfile", "compose.yaml", "k8s/trackside.yaml"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_every_setting_used_exists(path):
    used = set(re.findall(r"\bTRACKSIDE_([A-Z0-9_]+)", path.read_text()))
    fields = set(Settings.model_fields)
    # TRACKSIDE_KAFKA_* without a field of its own is passed to librdkafka as is (SPEC §2)
    unknown = {name for name in used if name.lower() not in fields and not name.startswith("KAFKA_")}
    assert not unknown, f"{path.name} uses settings that do not exist: {sorted(unknown)}"
    kafka_unknown = {n for n in used if n.startswith("KAFKA_") and n.lower() not in fields}
    assert not kafka_unknown, f"{path.name}: Kafka settings without a field (passed through untyped): {kafka_unknown}"

"""The agent client is light: importing it pulls in none of the pipeline's heavy dependencies."""

import subprocess
import sys

HEAVY = ("faust", "chdb", "scipy", "sklearn", "polars", "numpy", "pyarrow", "clickhouse_connect", "orjson")


def test_the_agent_client_imports_only_confluent_kafka_and_the_standard_library():
    code = ("import sys; import streams.client; "
            f"print(','.join(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"importing streams.client loaded {loaded}"

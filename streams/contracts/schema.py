"""Prints the JSON Schema of an agent event: `python -m streams.contracts.schema > streams/contracts/schemas/agent-event.json`."""

import json

from streams.contracts.events import json_schema

if __name__ == "__main__":
    print(json.dumps(json_schema(), indent=2))

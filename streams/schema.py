"""Prints the JSON Schema of an agent event: `python -m streams.schema > streams/schemas/agent-event.json`."""

import json

from streams.events import json_schema

if __name__ == "__main__":
    print(json.dumps(json_schema(), indent=2))

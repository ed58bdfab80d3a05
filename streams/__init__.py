"""Trackside: live monitoring of AI agents, from Kafka through faust into ClickHouse."""

__version__ = "0.1.0"

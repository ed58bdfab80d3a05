"""The one exception hierarchy of Trackside: catch `TracksideError` to catch ours."""


class TracksideError(Exception):
    """Base of every error Trackside raises on purpose."""


class ConfigError(TracksideError):
    """A setting is missing, malformed or inconsistent."""


class BrokerError(TracksideError):
    """The Kafka broker cannot be reached or refused a request."""


class StoreError(TracksideError):
    """The ClickHouse store cannot be reached or refused a statement."""


class StoreBusyError(StoreError):
    """The embedded store is open in another process that offers no query service."""

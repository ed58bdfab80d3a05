"""What crosses a topic or a table, defined once: topics, agent events, alerts, table columns."""

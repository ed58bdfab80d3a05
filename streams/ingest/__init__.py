"""The confluent-kafka stage: agent events and OTLP spans in bulk, priced, landed, handed to faust in batches."""

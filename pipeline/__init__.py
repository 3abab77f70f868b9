"""Live customer segments from big and small data, on Kafka, faust and ClickHouse."""

__version__ = "0.1.0"

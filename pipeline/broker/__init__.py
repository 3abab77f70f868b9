"""Kafka-protocol brokers: the embedded one, and topic administration."""

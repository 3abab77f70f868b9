"""Segments: definitions, the predicate compiler, and membership evaluation."""

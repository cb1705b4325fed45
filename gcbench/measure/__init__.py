"""Measurement: gradient equivalence, peak memory, step time."""

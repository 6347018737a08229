"""Benchmarks of every hot path, installed as fastddpm.benchmarks (see `fastddpm bench`)."""

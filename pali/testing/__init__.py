"""Helpers for the test suite that must be importable by Ray workers (step hooks)."""

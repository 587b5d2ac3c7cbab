"""Benchmark helpers behind `python -m jobs.benchmark`: side-by-side timing, the Hugging Face-assembled
reference model, one module per suite (train, decode, data, serve, parallel) and the report writer."""

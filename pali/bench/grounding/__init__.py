"""Probes of what the tiny model learns to ground (shapes, colours, counts, signs); run as modules:
`python -m pali.bench.grounding.vit_probe`, `...breakdown PREDICTIONS --data DIR`, ..."""

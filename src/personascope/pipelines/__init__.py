"""Pipelines: compositions of the rooms below them (models, residual, generation, judges, runs)."""

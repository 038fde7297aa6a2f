"""diffjax.metrics."""

"""diffjax.eval."""

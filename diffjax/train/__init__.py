"""diffjax.train."""

"""diffjax.input."""

"""diffjax.convert."""

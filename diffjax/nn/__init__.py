"""diffjax.nn."""

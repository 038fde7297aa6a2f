"""diffjax.models."""

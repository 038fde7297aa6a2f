"""diffjax.entropy."""

"""diffjax.codecs."""

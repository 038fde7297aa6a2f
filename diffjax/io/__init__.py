"""diffjax.io: the one place image and video files are read and written."""

"""The diffjax error hierarchy.

Every error a user can trigger with bad input derives from :class:`DiffjaxError`, so a
CLI or a script can catch one type and print a one-line message. Subsystems add
subclasses next to their code (e.g. ``diffjax.entropy.bitstream`` subclasses
:class:`BitstreamError`).
"""


class DiffjaxError(Exception):
    """Base class of all diffjax errors."""


class BitstreamError(DiffjaxError, ValueError):
    """A bitstream cannot be decoded: truncated, corrupt, foreign or mismatched."""


class CheckpointError(DiffjaxError, ValueError):
    """A checkpoint or converted model is missing keys, has extra keys or wrong shapes."""


class InputError(DiffjaxError, ValueError):
    """User input (an image, a file, a config value) is unreadable or unsupported."""

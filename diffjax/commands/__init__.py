"""The ``diffjax`` subcommands, one module each (see :mod:`diffjax.cli` for the protocol)."""

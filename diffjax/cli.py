"""The ``diffjax`` command.

Each subcommand is a module of :mod:`diffjax.commands` that defines

* ``HELP``: one line shown in ``diffjax --help``;
* ``add_arguments(parser)``: fills an ``argparse`` parser (description, epilog, args);
* ``run(args) -> int``: does the work and returns the exit status.

Command modules import jax/torch-heavy code inside ``run`` so that ``diffjax --help``
stays instant. Errors derived from :class:`diffjax.DiffjaxError` (and unreadable files)
are printed as one line and exit with status 2, without a traceback. Commands run with
JAX's persistent compilation cache on (:mod:`diffjax.cache`).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> module implementing the subcommand (see the module docstring for the protocol).
COMMANDS = {
    "convert": "diffjax.commands.convert",
    "info": "diffjax.commands.info",
    "compress": "diffjax.commands.compress",
    "decompress": "diffjax.commands.decompress",
    "demo": "diffjax.commands.demo",
    "eval": "diffjax.commands.eval",
    "export": "diffjax.commands.export",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffjax",
        description=(
            "diffjax: diffusion-based neural image and video compression in JAX/Flax. "
            "Run `diffjax COMMAND --help` for the options of one command."
        ),
    )
    from diffjax import __version__

    parser.add_argument("--version", action="version", version=f"diffjax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        cmd_parser = sub.add_parser(
            name,
            help=module.HELP,
            description=module.HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(cmd_parser)
        cmd_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from diffjax.errors import DiffjaxError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 1
    from diffjax.cache import enable_compilation_cache

    enable_compilation_cache()  # warm starts (opt out: DIFFJAX_COMPILATION_CACHE=0)
    try:
        return int(args._run(args) or 0)
    except DiffjaxError as err:
        print(f"diffjax {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
        print(f"diffjax {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"diffjax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Command line: ``pyrovae-pde SUBCOMMAND ...`` (also ``python -m pyrovae_pde``).

Each subcommand lives in a module with ``register(subparsers)``; errors users can fix
(bad files, bad arguments) are printed as one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# Modules contributing subcommands, in the order they appear in --help.
SUBCOMMAND_MODULES = (
    "pyrovae_pde.interfaces.cli_data",
    "pyrovae_pde.interfaces.cli_model",
    "pyrovae_pde.interfaces.cli_imaging",
    "pyrovae_pde.interfaces.cli_analysis",
)


class UserError(Exception):
    """An error caused by input or arguments; shown as one line without a traceback."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    from ..data import ContractError, SimulationError
    from ..data.imaging import ImagingError
    from ..physics import DomainError, SolverInputError
    from .api import ModelError
    from ..inference.train import TrainingDivergedError

    return (UserError, ContractError, SimulationError, DomainError, SolverInputError, KeyError, ModelError,
            TrainingDivergedError,
            FileNotFoundError, FileExistsError, ImagingError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyrovae-pde",
        description="Mechanistic subtypes of neurodegeneration: a physics-informed VAE mixture of "
                    "reaction-diffusion PDEs.")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"pyrovae_pde {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        result = args.handler(args)
    except _user_error_types() as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"pyrovae-pde {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pyrovae-pde {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())

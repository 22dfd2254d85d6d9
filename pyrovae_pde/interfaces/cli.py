"""Command line: ``pyrovae-pde SUBCOMMAND ...`` (also ``python -m pyrovae_pde``).

Each subcommand lives in a module with ``register(subparsers)``; errors users can fix
(bad files, bad arguments: every :class:`~pyrovae_pde.errors.PyrovaePDEError`) are printed as one
line and exit with status 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from ..errors import PyrovaePDEError

# Modules contributing subcommands, in the order they appear in --help.
SUBCOMMAND_MODULES = (
    "pyrovae_pde.interfaces.cli_data",
    "pyrovae_pde.interfaces.cli_model",
    "pyrovae_pde.interfaces.cli_imaging",
    "pyrovae_pde.interfaces.cli_analysis",
    "pyrovae_pde.interfaces.cli_report",
)


# A file that is missing, a directory where a file is expected, no permission: the user's to fix,
# even when raised by the standard library rather than by the package.
_OS_USER_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


class _ArgumentsError(Exception):
    """Arguments the parser refuses; ``main`` prints the message as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit status 2, as for every other user error
        raise _ArgumentsError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def comma_list(text: str) -> list[str]:
    """Names from a comma-separated argument ('diffusion,fisher_kpp' -> ['diffusion', 'fisher_kpp'])."""
    return [part.strip() for part in text.split(",") if part.strip()]


def at_least(low: int):
    """An argparse type: an integer >= ``low``; anything else is refused with the valid range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


_OUTPUT = {"progress": False}


def configure_output(quiet: bool = False, verbose: bool = False) -> None:
    """Where the package's messages go: progress bars on a terminal only; its ``logging`` records
    (one line per training epoch, per model compared, ...) to stderr at INFO when stderr is not a
    terminal (a batch job's log) or with ``--verbose`` (then DEBUG); ``--quiet``: warnings and
    errors only, no progress bars."""
    terminal = sys.stderr.isatty()
    _OUTPUT["progress"] = terminal and not quiet
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.WARNING if terminal else logging.INFO
    logger = logging.getLogger("pyrovae_pde")
    logger.setLevel(level)
    if not any(getattr(h, "_pyrovae_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        handler._pyrovae_cli = True
        logger.addHandler(handler)


def show_progress() -> bool:
    """Whether commands draw progress bars (``configure_output``)."""
    return _OUTPUT["progress"]


def device_name(text: str) -> str:
    """An argparse type: ``cpu``, ``cuda`` or ``cuda:N``; anything else is refused with the choices."""
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


device_name.__name__ = "device"


def add_run_arguments(p: argparse.ArgumentParser, data_help: str, out_help: str) -> None:
    """The fitted run directory, the cohort file and the required ``--out`` of commands that use a run."""
    p.add_argument("run_dir", help="run directory written by fit")
    p.add_argument("data", help=data_help)
    p.add_argument("--out", required=True, help=out_help)


def warn_if_unconverged(model, where: str) -> None:
    """Print the run's convergence warning, naming the flag to change; silent for a converged run."""
    message = model.convergence_warning()
    if message:
        print(f"warning: {where}: {message}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pyrovae-pde",
        description="Mechanistic subtypes of neurodegeneration: a physics-informed VAE mixture of "
                    "reaction-diffusion PDEs.")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"pyrovae_pde {__version__}")
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("--quiet", action="store_true", help="warnings and errors only: no progress, no log lines")
    noise.add_argument("--verbose", action="store_true",
                       help="log lines (one per epoch, per model compared, ...) even on a terminal")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _ArgumentsError as exc:
        print(exc, file=sys.stderr)
        return 2
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    configure_output(args.quiet, args.verbose)
    import matplotlib

    matplotlib.use("Agg")  # the command line writes figures to files; only it chooses a backend
    try:
        result = args.handler(args)
    except (PyrovaePDEError, *_OS_USER_ERRORS) as exc:
        message = str(exc)
        print(f"pyrovae-pde {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pyrovae-pde {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())

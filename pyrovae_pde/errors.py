"""One family of exceptions: everything a user can trigger derives from :class:`PyrovaePDEError`.

Catch ``PyrovaePDEError`` to handle any problem with input, arguments or a run; the CLI prints its
message as one line. Any other exception is a bug in the package and keeps its traceback.

The subclasses also derive from the built-in they replace (``ValueError``, ``KeyError``,
``RuntimeError``, ``FileNotFoundError``, ``FileExistsError``), so code that caught those still works.
This module imports nothing from the package: every room may use it.
"""
from __future__ import annotations

__all__ = [
    "PyrovaePDEError", "InputError", "UnknownNameError", "PathError", "MissingFileError", "ExistingPathError",
    "ContractError", "SimulationError", "ImagingError", "DomainError", "SolverInputError", "ModelError",
    "TrainingDivergedError", "UserError", "RunDirectoryBusyError",
]


class PyrovaePDEError(Exception):
    """Base of every error a user can cause; its message names the problem and the fix."""


class InputError(PyrovaePDEError, ValueError):
    """A value, argument or file content the package cannot use."""


class UnknownNameError(PyrovaePDEError, KeyError):
    """A name (reaction term, model, variable) that is not registered or not present."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


class PathError(PyrovaePDEError, OSError):
    """A path that cannot be read or written as asked."""


class MissingFileError(PathError, FileNotFoundError):
    """A file or run directory that does not exist."""


class ExistingPathError(PathError, FileExistsError):
    """A path that exists but is the wrong kind (a file where a directory is needed, or the reverse)."""


class RunDirectoryBusyError(PathError, BlockingIOError):
    """A run directory another process is writing (``data.locking``)."""


class ContractError(InputError):
    """A dataset that breaks the data contract (``data_schemas/``)."""


class SimulationError(InputError):
    """Simulator arguments out of range."""


class ImagingError(InputError):
    """A NIfTI manifest, image or atlas, or a regional PET table, that cannot be imported or exported."""


class DomainError(InputError):
    """A spatial domain (grid mask, graph adjacency, mesh) that cannot carry the PDE."""


class SolverInputError(InputError):
    """Solver inputs (times, initial states, parameters) with the wrong shape, sign or value."""


class ModelError(InputError):
    """A model used in a way its state does not allow (not fitted, data of another domain, ...)."""


class TrainingDivergedError(PyrovaePDEError, RuntimeError):
    """Training that kept producing NaN/Inf after every roll-back; the last good checkpoint is kept."""


class UserError(InputError):
    """Command-line arguments that do not fit together."""

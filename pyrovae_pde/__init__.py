"""pyrovae_pde: mechanistic subtypes of neurodegeneration with a physics-informed VAE mixture.

Public API::

    from pyrovae_pde import SubtypeModel, compare, load_dataset, save_dataset, simulate, validate_dataset
    from pyrovae_pde.physics import GridDomain, GraphDomain, solve, register_reaction
"""
__version__ = "0.1.0"

from .data import load_dataset, save_dataset, simulate, validate_dataset  # noqa: E402
from .interfaces.api import SubtypeModel, compare  # noqa: E402

__all__ = ["SubtypeModel", "compare", "load_dataset", "save_dataset", "simulate", "validate_dataset", "__version__"]

"""Physics: domains, reaction terms and batched reaction-diffusion solvers (no Pyro here)."""
from .domains import Domain, DomainError, GraphDomain, GridDomain
from .reactions import ReactionTerm, get_reaction, register_reaction, registered_reactions
from .solvers import (
    SPECTRAL_MAX_NODES,
    SolverInputError,
    SolverSettings,
    relative_times,
    resolve_method,
    solve,
    solve_active,
)

__all__ = [
    "Domain", "DomainError", "GraphDomain", "GridDomain", "ReactionTerm", "get_reaction",
    "register_reaction", "registered_reactions", "solve", "solve_active", "relative_times",
    "SolverInputError", "SolverSettings", "SPECTRAL_MAX_NODES", "resolve_method",
]

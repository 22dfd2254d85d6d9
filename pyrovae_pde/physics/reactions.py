"""Reaction terms f(u) of du/dt = -D L u + r f(u), in a registry users can extend.

Every term is a pointwise function of the normalised concentration u in [0, 1]. A term may also
provide its exact flow ``u(s)`` of du/ds = f(u) over reaction time s = r * dt; otherwise the
solver integrates the pointwise ODE with classical RK4 substeps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..errors import InputError, UnknownNameError

Flow = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ReactionTerm:
    """A named reaction term. ``has_rate`` is False for pure diffusion (f = 0, no rate r)."""

    name: str
    f: Callable[[torch.Tensor], torch.Tensor]
    exact_flow: Optional[Flow] = None
    has_rate: bool = True
    description: str = ""

    def flow(self, u: torch.Tensor, s: torch.Tensor, max_substep: float = 0.3,
             substeps: int | None = None) -> torch.Tensor:
        """Advance du/ds = f(u) by reaction time ``s`` (broadcastable to ``u``; dimensionless r*dt).

        Without an exact flow: ``substeps`` RK4 steps, or by default enough that none exceeds
        ``max_substep`` for the largest ``s`` (a fixed count keeps batch entries independent).
        Differentiable in ``u`` and ``s``; the backward pass uses the flow's closed-form
        sensitivities instead of recording the substeps.
        """
        if not self.has_rate:
            return u
        if substeps is None and self.exact_flow is None:
            substeps = max(1, int(torch.ceil(s.detach().abs().max() / max_substep).item()))
        if not (torch.is_grad_enabled() and (u.requires_grad or s.requires_grad)):
            return self._integrate(u, s, substeps)
        return _FlowFunction.apply(u, s, self, substeps)

    def _integrate(self, u: torch.Tensor, s: torch.Tensor, substeps: int | None) -> torch.Tensor:
        if self.exact_flow is not None:
            return self.exact_flow(u, s)
        h = s / substeps
        for _ in range(substeps):
            k1 = self.f(u)
            k2 = self.f(u + 0.5 * h * k1)
            k3 = self.f(u + 0.5 * h * k2)
            k4 = self.f(u + h * k3)
            u = u + h / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
        return u


class _FlowFunction(torch.autograd.Function):
    """phi = flow_s(u0) of the scalar autonomous ODE du/ds = f(u), with the exact sensitivities
    d phi / d s = f(phi) and d phi / d u0 = f(phi) / f(u0) (so no substep is kept for backward).
    Where f(u0) ~ 0 (an equilibrium) the ratio is replaced by its limit exp(f'(u0) s)."""

    @staticmethod
    def forward(ctx, u, s, term, substeps):
        phi = term._integrate(u, s, substeps)
        ctx.save_for_backward(u, s, phi)
        ctx.term = term
        return phi

    @staticmethod
    def backward(ctx, grad):
        u, s, phi = ctx.saved_tensors
        f = ctx.term.f
        f_phi = f(phi)
        grad_u = grad_s = None
        if ctx.needs_input_grad[0]:
            f_u = f(u)
            near_equilibrium = f_u.abs() < torch.finfo(u.dtype).tiny ** 0.5
            # f'(u0) by a central difference: only its value at an equilibrium is used.
            delta = 1e-3
            slope = (f(u + delta) - f(u - delta)) / (2.0 * delta)
            ratio = torch.where(near_equilibrium, torch.exp(slope * s),
                                f_phi / torch.where(near_equilibrium, 1.0, f_u))
            grad_u = (grad * ratio).sum_to_size(u.shape)
        if ctx.needs_input_grad[1]:
            grad_s = (grad * f_phi).sum_to_size(s.shape)
        return grad_u, grad_s, None, None


def _logistic_flow(u: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    # Closed form of du/ds = u(1-u): u0 e^s / (1 - u0 + u0 e^s), written to stay finite for large s.
    decay = torch.exp(-s)
    return u / (u + (1.0 - u) * decay)


_REGISTRY: dict[str, ReactionTerm] = {}


def register_reaction(term: ReactionTerm, overwrite: bool = False) -> ReactionTerm:
    """Add a reaction term to the registry so components can name it."""
    if not term.name.isidentifier():
        raise InputError(f"reaction name {term.name!r} must be an identifier (letters, digits, _)")
    if term.name in _REGISTRY and not overwrite:
        raise InputError(f"reaction {term.name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[term.name] = term
    return term


def get_reaction(name: str) -> ReactionTerm:
    """The registered term called ``name``; an unknown name lists the registered ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError(
            f"unknown reaction term {name!r}; registered terms are: {', '.join(sorted(_REGISTRY))} "
            "(add your own with pyrovae_pde.physics.register_reaction)"
        ) from None


def registered_reactions() -> tuple[str, ...]:
    """Names of all registered reaction terms."""
    return tuple(sorted(_REGISTRY))


register_reaction(ReactionTerm("diffusion", lambda u: torch.zeros_like(u), has_rate=False,
                               description="pure diffusion, f(u) = 0"))
register_reaction(ReactionTerm("fisher_kpp", lambda u: u * (1.0 - u), exact_flow=_logistic_flow,
                               description="Fisher-KPP logistic growth, f(u) = u(1-u)"))
register_reaction(ReactionTerm("saturating", lambda u: u * (1.0 - u) ** 2,
                               description="saturating growth, f(u) = u(1-u)^2"))
register_reaction(ReactionTerm("zeldovich", lambda u: u ** 2 * (1.0 - u),
                               description="Zeldovich (ignition) growth, f(u) = u^2(1-u)"))

"""The generative mixture of PDE subtypes and its amortized guide (pure torch/Pyro; no file I/O).

Generative model, for subjects i = 1..N and components k = 1..K::

    weights          ~ Dirichlet(c * 1_K)                                  # (K,)
    noise_scale      ~ LogNormal(log(noise_median), noise_log_sd)          # ()  inferred, not fixed
    diffusivity[k,i] ~ population_D(k)                                     # (K, N)
    reaction[k,i]    ~ population_r(k)      for components with a rate     # (K_r, N)
    subtype[i]       ~ Categorical(weights)                                # enumerated, summed out
    signal[i, j]     ~ Normal(u_k(t_ij), sqrt(noise_scale^2 + NOISE_FLOOR^2)),  k = subtype[i],
                       j >= 1 observed visits

where u_k solves du/dt = -D L u + r f_k(u) from the subject's first visit. A population prior is
a LogNormal per coordinate, or a mixture of M LogNormals (``population_term_*``, the tied default
after training: a single Gaussian in log space cannot follow a skewed or bounded distribution). The guide is amortized:
an encoder maps all visits of a subject to LogNormal posteriors of every component's D and r.
The subtype is never sampled by the guide: TraceEnum_ELBO marginalises it exactly, and its
posterior given the continuous draws is available in closed form (``log_responsibilities``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.ops.indexing import Vindex
from torch import nn
from torch.nn.functional import softplus

from ..errors import InputError
from ..physics import Domain, get_reaction, solve_active
from ..physics.solvers import DEFAULT_INITIAL_REACTION_STEP, DEFAULT_REACTION_STEP, SolverSettings
from .encoders import GraphEncoder, GridEncoder, PosteriorHead, SubtypeHead
from .likelihood import gaussian_log_likelihood, normal_log_density, observation_sd
from .priors import Priors

SUBJECT_DIM = -1
COMPONENT_DIM = -2
_TERM_BUFFERS = ("population_term_weight", "population_term_loc", "population_term_scale")
MAX_PLATE_NESTING = 2
# Caps the Strang steps per visit interval: only wild guide draws early in training (r*dt far
# beyond the prior) reach it; their fields are saturated and their likelihood negligible anyway.
MAX_STEPS_PER_INTERVAL = 200
THETA_RANGE_SDS = 10.0
# Standard-normal scores at which the amortized q's shape is stored (spacing 0.25: -1, 0, 1 are scores)
SHAPE_SCORES = torch.linspace(-2.5, 2.5, 21)
_MEDIAN, _MINUS_ONE, _PLUS_ONE = 10, 6, 14  # their indices


def _quantile_centre(quantiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Median and half 16-84% range of quantiles (..., M) at SHAPE_SCORES: (...,) each."""
    return quantiles[..., _MEDIAN], 0.5 * (quantiles[..., _PLUS_ONE] - quantiles[..., _MINUS_ONE])


@dataclass
class RefinedPosterior:
    """Per-subject Gaussian posteriors over theta = (log D, log r) for every component, the
    semi-amortized guide's local factors: loc (B, K, 2), cov (B, K, 2, 2) (rate-free components:
    only the log D entries are used)."""

    loc: torch.Tensor
    cov: torch.Tensor


class MixturePDE(nn.Module):
    """Pyro ``model``/``guide`` pair for a K-component mixture of reaction-diffusion PDEs.

    Args:
        domain: the spatial domain shared by the cohort.
        components: reaction term names, one per component (K = 1 is the single-PDE baseline).
        n_visits: number of visit slots T in the data.
        priors: ``Priors``; ``time_scale``: typical follow-up length (encoder input scaling).
        reaction_step, initial_reaction_step: largest r*dt of a Strang step in the model's solves,
            after and within the first visit interval (see ``physics.solve_active``). The step
            counts of a (subject, component) follow max(its own rate, ``step_rate_floor``), the
            reaction prior's median: a component's fields depend on its own (D, r) only, the slower
            half of the prior shares one discretisation, and the simulations of the amortization
            and of SBC solve as the likelihood. (The prior's 97.5% point was measured: 2.5x the cost
            of fit and predict under wide default priors.)
        encoder_stem_voxels: grids larger than this enter the encoder through strided convolutions
            (``GridEncoder``); None: no stem (runs saved before it existed).
    """

    def __init__(self, domain: Domain, components: Sequence[str], n_visits: int, priors: Priors = Priors(),
                 time_scale: float = 1.0, reaction_step: float = DEFAULT_REACTION_STEP,
                 encoder_width: int = 16, initial_reaction_step: float = DEFAULT_INITIAL_REACTION_STEP,
                 encoder_stem_voxels: int | None = GridEncoder.STEM_MAX_VOXELS):
        super().__init__()
        if len(components) == 0:
            raise InputError("a model needs at least one component")
        if len(set(components)) != len(components):
            raise InputError(f"components must be distinct, got {list(components)}")
        self.domain = domain
        self.components = tuple(components)
        self.terms = [get_reaction(name) for name in self.components]  # unknown names fail here
        self.rate_index = [k for k, t in enumerate(self.terms) if t.has_rate]
        self.priors = priors
        self.n_visits = n_visits
        self.reaction_step = reaction_step
        self.initial_reaction_step = initial_reaction_step
        self.step_rate_floor = math.exp(priors.reaction.loc) if self.rate_index else 0.0
        self.time_scale, self.encoder_width = time_scale, encoder_width
        self.encoder_stem_voxels = encoder_stem_voxels
        # Build the body with an identity head to measure its feature size, then attach the real head.
        if domain.kind == "grid":
            probe = GridEncoder(domain, n_visits, head=nn.Identity(), width=encoder_width, time_scale=time_scale,
                                stem_max_voxels=encoder_stem_voxels)
        else:
            probe = GraphEncoder(domain, n_visits, head=nn.Identity(), width=encoder_width, time_scale=time_scale)
        n_features = probe(torch.zeros(1, n_visits, domain.n_nodes), torch.zeros(1, n_visits),
                           torch.ones(1, n_visits, dtype=torch.bool)).shape[-1]
        head = PosteriorHead(n_features, self.n_components, len(self.rate_index),
                             (priors.diffusivity.loc, priors.diffusivity.scale),
                             (priors.reaction.loc, priors.reaction.scale))
        probe.head = head
        self.encoder = probe
        # Amortized p(subtype | scans), trained after the fit on simulated subjects (inference.amortize)
        self.subtype_head = SubtypeHead(n_features, self.n_components)
        self.register_buffer("amortized", torch.tensor(False))  # True once the subtype head is trained
        # Recalibration of the amortized q per (component, coordinate) on held-out simulations
        # (inference.amortize.calibrate): with covariates c = (1, standardised loc, standardised log
        # scale) of q, loc + (shift . c) * scale and scale * exp(log_stretch . c); the standardisation's
        # centre and spread are those of the calibration simulations.
        self.register_buffer("amortized_shift", torch.zeros(self.n_components, 2, 3))
        self.register_buffer("amortized_log_stretch", torch.zeros(self.n_components, 2, 3))
        self.register_buffer("amortized_center", torch.zeros(self.n_components, 2, 2))
        self.register_buffer("amortized_spread", torch.ones(self.n_components, 2, 2))
        # The shape of the recalibrated q beyond a Gaussian: quantiles (K, 2, M) of the recalibrated
        # z at the standard-normal scores SHAPE_SCORES (identity: q is LogNormal); see ``shape``
        self.register_buffer("amortized_quantiles", SHAPE_SCORES.repeat(self.n_components, 2, 1))
        # Temperature of the subtype head's logits, fitted on the same simulations (calibrated logits / T)
        self.register_buffer("amortized_temperature", torch.tensor(1.0))
        # Guide parameters of the global latents. The Dirichlet's concentration is learned in log
        # space: its optimum grows with the cohort (about 1 + N w_k), far beyond what additive
        # steps reach.
        self.weights_log_concentration = nn.Parameter(torch.full((self.n_components,), math.log(10.0)))
        self.noise_loc = nn.Parameter(torch.tensor(math.log(priors.noise_median)))
        # The population prior of each component over theta = (log D, log r): Normal(loc, scale^2)
        # per coordinate, (K, 2) (the log r column of rate-free components is unused). It starts at
        # the base priors and is learned from the cohort (empirical Bayes, see inference.population);
        # the base priors are its hyperprior.
        self.register_buffer("population_loc", self._base_population()[0])
        self.register_buffer("population_scale", self._base_population()[1])
        # The same prior as a mixture of M Gaussians per coordinate, (K, 2, M) each: weight, loc, scale.
        # population_loc/scale are then its mean and sd (the Gaussian that searches use as prior).
        for name, value in zip(_TERM_BUFFERS, self._single_terms(*self._base_population())):
            self.register_buffer(name, value)
        self.register_buffer("population_learned", torch.tensor(False))  # True once fitted by EM
        # True: one population of log D for all components and one of log r for those with a rate
        self.register_buffer("population_tied", torch.tensor(False))
        self.noise_scale_raw = nn.Parameter(torch.tensor(math.log(math.expm1(0.1))))

    @property
    def n_components(self) -> int:
        return len(self.components)

    def _base_population(self) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.priors
        loc = torch.tensor([[p.diffusivity.loc, p.reaction.loc]] * self.n_components)
        scale = torch.tensor([[p.diffusivity.scale, p.reaction.scale]] * self.n_components)
        return loc, scale

    @staticmethod
    def _single_terms(loc: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.ones_like(loc)[..., None], loc[..., None].clone(), scale[..., None].clone()

    @property
    def population_terms(self) -> int:
        """M, the number of Gaussian terms of each population prior (1: a Gaussian)."""
        return self.population_term_loc.shape[-1]

    def set_population(self, loc: torch.Tensor, scale: torch.Tensor,
                       terms: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        """Set the population priors: the Gaussian ``loc``, ``scale`` (K, 2), or with ``terms``
        (weight, loc, scale), each (K, 2, M), the mixture whose mean and sd are ``loc``, ``scale``."""
        with torch.no_grad():
            self.population_loc.copy_(loc.to(self.population_loc))
            self.population_scale.copy_(scale.to(self.population_scale))
            values = self._single_terms(loc, scale) if terms is None else terms
            for name, value in zip(_TERM_BUFFERS, values):
                setattr(self, name, value.detach().to(self.population_loc).clone())

    def population_log_prob(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log densities of log D = a and log r = b, each (..., K), under every component's
        population prior: (log p(a) (..., K), log p(b) (..., K)); b of rate-free components is
        scored against their (unused) log r column."""
        out = []
        for c, x in enumerate((a, b)):
            if self.population_terms == 1:
                loc, scale = self.population_loc[:, c].to(x), self.population_scale[:, c].to(x)
                out.append(normal_log_density(x, loc, scale))
                continue
            w, loc, scale = (getattr(self, n)[:, c].to(x) for n in _TERM_BUFFERS)  # (K, M)
            out.append(torch.logsumexp(torch.log(w) + normal_log_density(x[..., None], loc, scale), dim=-1))
        return out[0], out[1]

    def _population_site(self, rows, coordinate: int, like: torch.Tensor) -> dist.Distribution:
        """The population prior of D (coordinate 0) or r (1) of components ``rows`` as a
        distribution of batch shape (len(rows), 1): LogNormal, or a mixture of LogNormals."""
        if self.population_terms == 1:
            loc = self.population_loc[rows, coordinate:coordinate + 1].to(like)
            return dist.LogNormal(loc, self.population_scale[rows, coordinate:coordinate + 1].to(like))
        w, loc, scale = (getattr(self, n)[rows, coordinate, None].to(like) for n in _TERM_BUFFERS)  # (R, 1, M)
        mixture = dist.MixtureSameFamily(dist.Categorical(probs=w), dist.Normal(loc, scale))
        return dist.TransformedDistribution(mixture, [dist.transforms.ExpTransform()])

    def draw_population(self, batch: int, dtype: torch.dtype, device=None,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log D (B, K), log r (B, K_r) or None) drawn from every component's population prior.
        The random numbers come in a fixed order (standard normals for D, for r, then uniforms
        picking mixture terms), so that every process drawing a batch draws the same values."""
        def normal(*shape):
            return torch.randn(*shape, dtype=dtype, device=device, generator=generator)

        ri = self.rate_index
        eps = [normal(batch, self.n_components), normal(batch, len(ri)) if ri else None]
        picks = [None, None]
        if self.population_terms > 1:
            picks = [torch.rand(batch, self.n_components, dtype=dtype, device=device, generator=generator),
                     torch.rand(batch, len(ri), dtype=dtype, device=device, generator=generator) if ri else None]
        out = []
        for c, rows in enumerate((list(range(self.n_components)), ri)):
            if eps[c] is None:
                out.append(None)
                continue
            w, loc, scale = (getattr(self, n)[rows, c].to(dtype=dtype, device=device) for n in _TERM_BUFFERS)
            if picks[c] is None:
                term = torch.zeros_like(eps[c], dtype=torch.long)
            else:  # inverse CDF of the term weights, (B, R)
                cdf = torch.cumsum(w, dim=-1)
                term = (picks[c][..., None] * cdf[:, -1:] > cdf).sum(-1).clamp_max(self.population_terms - 1)
            index = term[..., None]  # (B, R, 1)
            chosen_loc = torch.gather(loc.expand(batch, *loc.shape), 2, index)[..., 0]
            chosen_scale = torch.gather(scale.expand(batch, *scale.shape), 2, index)[..., 0]
            out.append(chosen_loc + chosen_scale * eps[c])
        return out[0], out[1]

    def submodel(self, subset: Sequence[int]) -> "MixturePDE":
        """The mixture of the components ``subset`` only: same domain, priors and solver settings,
        those components' population priors, the noise scale, the weights' concentrations of those
        components; a fresh encoder (only ever used to seed searches)."""
        subset = list(subset)
        sub = MixturePDE(self.domain, [self.components[k] for k in subset], self.n_visits, self.priors,
                         time_scale=self.time_scale, reaction_step=self.reaction_step, encoder_width=self.encoder_width,
                         initial_reaction_step=self.initial_reaction_step,
                         encoder_stem_voxels=self.encoder_stem_voxels).to(self.noise_loc)
        with torch.no_grad():
            sub.set_population(self.population_loc[subset], self.population_scale[subset],
                               tuple(getattr(self, n)[subset] for n in _TERM_BUFFERS))
            sub.population_learned.copy_(self.population_learned)
            sub.population_tied.copy_(self.population_tied)
            sub.weights_log_concentration.copy_(self.weights_log_concentration[subset])
            sub.noise_loc.copy_(self.noise_loc)
            sub.noise_scale_raw.copy_(self.noise_scale_raw)
        return sub

    def clamp_theta(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log D, log r) clamped to the base prior's centre +- ``THETA_RANGE_SDS`` sds: searches stay
        where the prior has mass (and exp() stays finite); beyond it the prior density is < e^-50."""
        p = self.priors
        a = a.clamp(p.diffusivity.loc - THETA_RANGE_SDS * p.diffusivity.scale,
                    p.diffusivity.loc + THETA_RANGE_SDS * p.diffusivity.scale)
        b = b.clamp(p.reaction.loc - THETA_RANGE_SDS * p.reaction.scale,
                    p.reaction.loc + THETA_RANGE_SDS * p.reaction.scale)
        return a, b

    def rate_mask(self, device=None) -> torch.Tensor:
        """(K,) bool: which components have a reaction rate."""
        mask = torch.zeros(self.n_components, dtype=torch.bool, device=device)
        mask[self.rate_index] = True
        return mask

    def prior_terms(self, dtype: torch.dtype | None = None, device=None) -> tuple[torch.Tensor, ...]:
        """The population prior as (loc of log D, its sd, loc of log r, its sd), each (K,)."""
        loc = self.population_loc.to(dtype=dtype, device=device)
        scale = self.population_scale.to(dtype=dtype, device=device)
        return loc[:, 0], scale[:, 0], loc[:, 1], scale[:, 1]

    # ---------------------------------------------------------------- physics
    def full_reaction(self, reaction: torch.Tensor | None, diffusivity: torch.Tensor) -> torch.Tensor:
        """reaction (..., K_r) -> (..., K) with zeros for rate-free components."""
        out = diffusivity.new_zeros(diffusivity.shape)
        if reaction is not None:
            out[..., self.rate_index] = reaction
        return out

    def predict(self, u0: torch.Tensor, times: torch.Tensor, diffusivity: torch.Tensor,
                reaction: torch.Tensor | None, step_rates: torch.Tensor | None = None,
                coarse: bool = False) -> torch.Tensor:
        """u0 (B, n), times (B, T), diffusivity (B, K), reaction (B, K_r) -> fields (B, K, T, n).

        ``step_rates`` (B,) or (B, K): optional rates that fix the solver's step counts (see ``solve_active``).
        ``coarse``: plain Strang steps of ``reaction_step`` in every interval, for searches whose
        result is corrected with the default solve (a fraction of its cost, tens of times its error).
        """
        full = self.full_reaction(reaction, diffusivity)
        return solve_active(self.domain, u0, times, diffusivity, full, self.terms, self.solver_settings(coarse),
                            step_rates=step_rates)

    def solver_settings(self, coarse: bool = False) -> SolverSettings:
        """The solver of the model's fields; ``coarse``: plain Strang steps of ``reaction_step``."""
        return SolverSettings(method="auto", reaction_step=self.reaction_step, max_steps=MAX_STEPS_PER_INTERVAL,
                              rate_floor=self.step_rate_floor,
                              initial_reaction_step=self.reaction_step if coarse else self.initial_reaction_step,
                              extrapolate=not coarse)

    # ---------------------------------------------------------------- model and guide
    def _plates(self, n_total: int | None, batch: int, index: torch.Tensor | None, device):
        subjects = pyro.plate("subjects", n_total or batch, subsample=index, dim=SUBJECT_DIM, device=device)
        components = pyro.plate("components", self.n_components, dim=COMPONENT_DIM, device=device)
        rates = (pyro.plate("rate_components", len(self.rate_index), dim=COMPONENT_DIM, device=device)
                 if self.rate_index else None)
        return subjects, components, rates

    def model(self, signal: torch.Tensor, times: torch.Tensor, observed: torch.Tensor,
              index: torch.Tensor | None = None, n_total: int | None = None,
              refined: "RefinedPosterior | None" = None) -> torch.Tensor:
        """signal (B, T, n) on active nodes, times (B, T), observed (B, T) bool. ``index``: the
        batch's subject indices among ``n_total`` subjects (minibatching by plate subsampling).
        ``refined`` is the guide's argument (ignored here)."""
        batch, _, n = signal.shape
        p = self.priors
        device = signal.device
        one = signal.new_ones(())  # the globals' priors in the data's dtype and device
        concentration = p.weights_concentration * signal.new_ones(self.n_components)
        weights = pyro.sample("weights", dist.Dirichlet(concentration))  # (K,)
        noise = pyro.sample("noise_scale", dist.LogNormal(math.log(p.noise_median) * one, p.noise_log_sd * one))  # ()
        subjects, components, rates = self._plates(n_total, batch, index, device)
        with subjects:
            with components:
                diffusivity = pyro.sample("diffusivity", self._population_site(slice(None), 0, signal))  # (K, B)
            reaction = None
            if self.rate_index:
                with rates:
                    reaction = pyro.sample("reaction", self._population_site(self.rate_index, 1, signal))  # (K_r, B)
            fields = self.predict(signal[:, 0], times, diffusivity.T, None if reaction is None else reaction.T)
            fields = fields.transpose(0, 1)  # (K, B, T, n)
            subtype = pyro.sample("subtype", dist.Categorical(weights),
                                  infer={"enumerate": "parallel"})  # (B,), or (K, 1, 1) when enumerated
            loc = Vindex(fields)[subtype, torch.arange(batch, device=device)]  # (B, T, n) / (K, 1, B, T, n)
            later = observed[:, 1:, None]  # (B, T-1, 1): likelihood over later observed visits only
            sd = observation_sd(noise)
            pyro.sample("signal", dist.Normal(loc[..., 1:, :], sd).mask(later).to_event(2),
                        obs=signal[:, 1:])
        return subtype

    def encode(self, signal: torch.Tensor, times: torch.Tensor, observed: torch.Tensor):
        """LogNormal posterior parameters (log space): d_loc, d_scale (B, K); r_loc, r_scale (B, K_r)."""
        return self.encoder(signal, times, observed)

    def guide(self, signal: torch.Tensor, times: torch.Tensor, observed: torch.Tensor,
              index: torch.Tensor | None = None, n_total: int | None = None,
              refined: "RefinedPosterior | None" = None) -> None:
        """The amortized guide: the encoder's LogNormal q_k(D, r | x_i) for every component.

        With ``refined`` (semi-amortized), each subject's q_k is instead the given Gaussian over
        (log D, log r) with full covariance (a Laplace approximation found from the encoder's
        guess): log D ~ N(m_a, C_aa), log r | log D ~ N(m_b + C_ab / C_aa (log D - m_a),
        C_bb - C_ab^2 / C_aa). Its parameters carry no gradient.
        """
        pyro.module("mixture", self)
        batch = signal.shape[0]
        pyro.sample("weights", dist.Dirichlet(self.weights_concentration()))  # (K,)
        pyro.sample("noise_scale", dist.LogNormal(self.noise_loc, softplus(self.noise_scale_raw) + 1e-4))  # ()
        subjects, components, rates = self._plates(n_total, batch, index, signal.device)
        with subjects:
            if refined is None:
                d_loc, d_scale, r_loc, r_scale = self.encode(signal, times, observed)
                with components:
                    pyro.sample("diffusivity", dist.LogNormal(d_loc.T, d_scale.T))  # (K, B)
                if self.rate_index:
                    with rates:
                        pyro.sample("reaction", dist.LogNormal(r_loc.T, r_scale.T))  # (K_r, B)
                return
            loc, cov = refined.loc.to(signal.dtype), refined.cov.to(signal.dtype)  # (B, K, 2), (B, K, 2, 2)
            caa = cov[..., 0, 0]
            with components:
                diffusivity = pyro.sample("diffusivity", dist.LogNormal(loc[..., 0].T, caa.sqrt().T))  # (K, B)
            if self.rate_index:
                ri = self.rate_index
                slope = (cov[..., 0, 1] / caa)[:, ri].T  # (K_r, B)
                cond_var = (cov[..., 1, 1] - cov[..., 0, 1] ** 2 / caa)[:, ri].T.clamp_min(1e-12)
                cond_mean = loc[:, ri, 1].T + slope * (diffusivity[ri].log() - loc[:, ri, 0].T)
                with rates:
                    pyro.sample("reaction", dist.LogNormal(cond_mean, cond_var.sqrt()))  # (K_r, B)

    def weights_concentration(self) -> torch.Tensor:
        return torch.exp(self.weights_log_concentration) + 1e-3

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Runs written before version 0.2 stored softplus^-1 of the concentration.
        old = state_dict.pop(prefix + "weights_raw", None)
        if old is not None:
            state_dict[prefix + "weights_log_concentration"] = torch.log(softplus(old) + 1e-3)
        for name, value in zip(("population_loc", "population_scale"), self._base_population()):
            state_dict.setdefault(prefix + name, value)  # before 0.2 the priors were not learned
        singles = self._single_terms(state_dict[prefix + "population_loc"], state_dict[prefix + "population_scale"])
        for name, value in zip(_TERM_BUFFERS, singles):
            state_dict.setdefault(prefix + name, value)  # runs before mixture populations: one term
            # the number of terms M is the saved run's
            setattr(self, name, torch.empty_like(state_dict[prefix + name]).to(self.population_loc))
        state_dict.setdefault(prefix + "population_learned", torch.tensor(False))
        # runs saved before the amortized subtype head: an untrained head, never used
        for name, value in self.subtype_head.state_dict(prefix=prefix + "subtype_head.").items():
            state_dict.setdefault(name, value)
        state_dict.setdefault(prefix + "amortized", torch.tensor(False))
        # runs saved with a constant shift and stretch per (component, coordinate): the intercepts
        shift, stretch = state_dict.get(prefix + "amortized_shift"), state_dict.pop(prefix + "amortized_stretch", None)
        if shift is not None and shift.dim() == 2:
            state_dict[prefix + "amortized_shift"] = torch.cat([shift[..., None], shift.new_zeros(*shift.shape, 2)], -1)
        if stretch is not None:
            state_dict[prefix + "amortized_log_stretch"] = torch.cat(
                [stretch.log()[..., None], stretch.new_zeros(*stretch.shape, 2)], -1)
        for name, value in (("amortized_shift", torch.zeros(self.n_components, 2, 3)),
                            ("amortized_log_stretch", torch.zeros(self.n_components, 2, 3)),
                            ("amortized_center", torch.zeros(self.n_components, 2, 2)),
                            ("amortized_spread", torch.ones(self.n_components, 2, 2)),
                            ("amortized_quantiles", SHAPE_SCORES.repeat(self.n_components, 2, 1))):
            state_dict.setdefault(prefix + name, value)
        state_dict.setdefault(prefix + "amortized_temperature", torch.tensor(1.0))
        state_dict.setdefault(prefix + "population_tied", torch.tensor(False))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---------------------------------------------------------------- sleep phase
    def simulate_fields(self, u0: torch.Tensor, times: torch.Tensor, diffusivity: torch.Tensor,
                        reaction: torch.Tensor | None) -> torch.Tensor:
        """Noise-free fields (B, K, T, n) of the sleep phase's synthetic subjects (see ``predict``).

        Plain Strang steps (``coarse``): on the 6 mm MNI grid 3.5-4.7x faster than the default solve
        and within 0.005 of it, a tenth of typical noise; the encoder is then refined on the real
        subjects' modes.
        """
        return self.predict(u0, times, diffusivity, reaction, coarse=True)

    def simulate_prior(self, u0: torch.Tensor, times: torch.Tensor, observed: torch.Tensor,
                       noise: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Synthetic subjects from every component's prior, sharing real initial fields and visit times
        (fields by the model's coarse solver, see ``predict``).

        u0 (B, n), times (B, T), observed (B, T) -> signal (B, K, T, n) (noise on later visits,
        zero at missing visits), diffusivity (B, K), reaction (B, K_r) drawn from the priors.
        """
        with torch.no_grad():
            log_d, log_r = self.draw_population(u0.shape[0], u0.dtype, u0.device)
            diffusivity, reaction = torch.exp(log_d), None if log_r is None else torch.exp(log_r)
            fields = self.simulate_fields(u0, times, diffusivity, reaction)  # (B, K, T, n)
            fields[:, :, 1:] += noise * torch.randn_like(fields[:, :, 1:])
            fields = fields * observed[:, None, :, None]
        return fields, diffusivity, reaction

    def sleep_loss(self, u0: torch.Tensor, times: torch.Tensor, observed: torch.Tensor,
                   noise: torch.Tensor | float) -> torch.Tensor:
        """Mean -log q_k(theta_k | x_k) over synthetic subjects x_k simulated by component k.

        Trains each component's head towards that component's conditional posterior
        p(theta_k | x, subtype = k), averaged over the prior predictive (the sleep phase of
        wake-sleep); heads of other components receive no signal from x_k.
        """
        fields, diffusivity, reaction = self.simulate_prior(u0, times, observed, noise)
        return self.sleep_nll(fields, times, observed, diffusivity, reaction)

    def sleep_nll(self, fields: torch.Tensor, times: torch.Tensor, observed: torch.Tensor,
                  diffusivity: torch.Tensor, reaction: torch.Tensor | None) -> torch.Tensor:
        """Mean -log q_k(theta_k | x_k) of synthetic subjects: fields (B, K, T, n) simulated by each
        component k from diffusivity (B, K) and reaction (B, K_r), visits times/observed (B, T)."""
        return self._own_component_nll(self.encode(*self.flatten_simulated(fields, times, observed)),
                                       diffusivity, reaction)

    @staticmethod
    def flatten_simulated(fields: torch.Tensor, times: torch.Tensor, observed: torch.Tensor):
        """Synthetic subjects simulated by every component, fields (B, K, T, n) and their visits
        (B, T), as encoder input: (B * K, T, n), (B * K, T), (B * K, T), row b * K + k simulated by k."""
        k = fields.shape[1]
        return (fields.reshape(-1, *fields.shape[2:]), times.repeat_interleave(k, 0),
                observed.repeat_interleave(k, 0))

    def _own_component_nll(self, params, diffusivity: torch.Tensor, reaction: torch.Tensor | None) -> torch.Tensor:
        """Mean -log q of the truth, rows b * K + k simulated by component k (see ``sleep_nll``)."""
        d_loc, d_scale, r_loc, r_scale = params
        batch, k = diffusivity.shape
        device = d_loc.device
        own = torch.arange(k, device=device).repeat(batch)  # component that simulated each row
        rows = torch.arange(batch * k, device=device)
        log_q = dist.Normal(d_loc[rows, own], d_scale[rows, own]).log_prob(diffusivity.log().reshape(-1))
        loss = -log_q.mean()
        if reaction is not None:
            rate_rows = [i for i in range(batch * k) if int(own[i]) in self.rate_index]
            rate_col = torch.tensor([self.rate_index.index(int(own[i])) for i in rate_rows], device=device)
            rate_rows = torch.tensor(rate_rows, device=device)
            truth = reaction.log()[rate_rows // k, rate_col]
            loss = loss - dist.Normal(r_loc[rate_rows, rate_col], r_scale[rate_rows, rate_col]).log_prob(truth).mean()
        return loss

    def encode_amortized(self, signal: torch.Tensor, times: torch.Tensor, observed: torch.Tensor,
                         calibrated: bool = True):
        """One encoder pass: (subtype log-likelihoods (B, K) up to a constant per subject, then the
        LogNormal parameters d_loc, d_scale (B, K), r_loc, r_scale (B, K_r) as ``encode``), with
        the recalibration (``recalibrate`` of q, ``amortized_temperature`` of the subtype logits)
        applied unless ``calibrated=False``."""
        features = self.encoder.features(signal, times, observed)
        d_loc, d_scale, r_loc, r_scale = self.encoder.head(features)
        logits = self.subtype_head(features)
        if not calibrated:
            return logits, d_loc, d_scale, r_loc, r_scale
        d_loc, d_scale = self.recalibrate(d_loc, d_scale, list(range(self.n_components)), 0)
        r_loc, r_scale = self.recalibrate(r_loc, r_scale, self.rate_index, 1)
        return logits / self.amortized_temperature.to(d_loc), d_loc, d_scale, r_loc, r_scale

    def calibration_covariates(self, loc: torch.Tensor, scale: torch.Tensor, components: list[int],
                               coordinate: int) -> torch.Tensor:
        """The recalibration's covariates (..., C, 3) of q's loc and scale (..., C) for ``components``
        (C,) and ``coordinate`` (0: log D, 1: log r): 1, then loc and log scale standardised by
        ``amortized_center``/``amortized_spread`` and clamped to +-3 (no extrapolation beyond)."""
        center = self.amortized_center[components, coordinate].to(loc)  # (C, 2)
        spread = self.amortized_spread[components, coordinate].to(loc)
        standard = (torch.stack([loc, torch.log(scale)], -1) - center) / spread
        return torch.cat([torch.ones_like(loc)[..., None], standard.clamp(-3.0, 3.0)], -1)

    def recalibrate(self, loc: torch.Tensor, scale: torch.Tensor, components: list[int], coordinate: int):
        """q's (loc, scale) (..., C) for ``components`` and ``coordinate`` -> recalibrated: with
        c = ``calibration_covariates``, the centre loc + (shift . c) * scale and the width
        scale * exp(log_stretch . c), then moved to the median of the recalibrated z's quantiles
        (``amortized_quantiles``) and scaled by their half 16-84% range. The recalibrated q is
        loc + scale * shape(eps), eps standard normal (see ``shape``)."""
        if not components:
            return loc, scale
        covariates = self.calibration_covariates(loc, scale, components, coordinate)
        shift = (covariates * self.amortized_shift[components, coordinate].to(loc)).sum(-1)
        log_stretch = (covariates * self.amortized_log_stretch[components, coordinate].to(loc)).sum(-1)
        loc, scale = loc + shift * scale, scale * torch.exp(log_stretch)
        median, spread = _quantile_centre(self.amortized_quantiles[components, coordinate].to(loc))
        return loc + median * scale, scale * spread

    def shape(self, eps: torch.Tensor, coordinate: int) -> torch.Tensor:
        """Standard-normal draws or scores ``eps`` (..., K) -> the recalibrated q's standardised
        deviates for every component (..., K): piecewise linear through (SHAPE_SCORES, the
        standardised ``amortized_quantiles``), unit slope beyond the outer scores; the identity
        for a LogNormal q. q of component k is then loc_k + scale_k * shape(eps)_k (``recalibrate``)."""
        quantiles = self.amortized_quantiles[:, coordinate].to(eps)  # (K, M)
        median, spread = _quantile_centre(quantiles)
        values = (quantiles - median[:, None]) / spread[:, None]
        scores = SHAPE_SCORES.to(eps)
        lead = eps.shape[:-1]
        flat = eps.reshape(-1, eps.shape[-1]).T.contiguous()  # (K, L)
        clamped = flat.clamp(scores[0], scores[-1])
        index = torch.searchsorted(scores, clamped).clamp(1, len(scores) - 1)
        left, right = scores[index - 1], scores[index]
        v_left, v_right = torch.gather(values, 1, index - 1), torch.gather(values, 1, index)
        inside = v_left + (v_right - v_left) * (clamped - left) / (right - left)
        beyond = flat - clamped  # unit slope outside the outer scores
        return (inside + beyond).T.reshape(*lead, eps.shape[-1])

    def amortized_loss(self, fields: torch.Tensor, times: torch.Tensor, observed: torch.Tensor,
                       diffusivity: torch.Tensor, reaction: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Synthetic subjects, fields (B, K, T, n) simulated by every component k from diffusivity
        (B, K) and reaction (B, K_r) -> (mean -log q_k(theta_k | x_k), mean cross-entropy of the
        subtype head against the simulating component); every component appears equally often."""
        logits, *params = self.encode_amortized(*self.flatten_simulated(fields, times, observed), calibrated=False)
        own = torch.arange(fields.shape[1], device=fields.device).repeat(fields.shape[0])
        cross_entropy = torch.nn.functional.cross_entropy(logits, own)
        return self._own_component_nll(params, diffusivity, reaction), cross_entropy

    def distillation_loss(self, signal: torch.Tensor, times: torch.Tensor, observed: torch.Tensor,
                          refined: RefinedPosterior) -> torch.Tensor:
        """Mean over subjects of sum_k KL(N(m_k, diag C_k) || q_k) in log space: moves the encoder's
        LogNormal guide towards given per-subject posteriors (``refined``: loc (B, K, 2), cov
        (B, K, 2, 2), no gradient), matching their means and marginal variances."""
        d_loc, d_scale, r_loc, r_scale = self.encode(signal, times, observed)
        loc = refined.loc.detach().to(signal.dtype)
        var = refined.cov.detach().diagonal(dim1=-2, dim2=-1).to(signal.dtype).clamp_min(1e-12)

        def kl(q_loc, q_scale, p_loc, p_var):
            return (torch.log(q_scale) - 0.5 * torch.log(p_var) + (p_var + (p_loc - q_loc) ** 2) / (2 * q_scale ** 2)
                    - 0.5)

        loss = kl(d_loc, d_scale, loc[..., 0], var[..., 0]).sum(-1)
        if self.rate_index:
            ri = self.rate_index
            loss = loss + kl(r_loc, r_scale, loc[:, ri, 1], var[:, ri, 1]).sum(-1)
        return loss.mean()

    def reset_calibration(self) -> None:
        """The amortized posterior as trained: no recalibration of q, subtype temperature 1."""
        with torch.no_grad():
            for name in ("amortized_shift", "amortized_log_stretch", "amortized_center"):
                getattr(self, name).zero_()
            self.amortized_spread.fill_(1.0)
            self.amortized_quantiles.copy_(SHAPE_SCORES.repeat(self.n_components, 2, 1))
            self.amortized_temperature.fill_(1.0)

    def reinitialize(self, seed: int) -> None:
        """Fresh encoder weights drawn from ``seed`` and the globals' guide at its initial values
        (a restart); the global RNG state is left as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for layer in self.encoder.modules():
                if layer is not self.encoder.head and hasattr(layer, "reset_parameters") and layer is not self:
                    layer.reset_parameters()
            self.encoder.head.reset_output_layer()
            self.subtype_head.reset_parameters()
        with torch.no_grad():
            self.amortized.fill_(False)
            self.reset_calibration()
            self.set_population(*self._base_population())
            self.population_learned.fill_(False)
            self.population_tied.fill_(False)
            self.weights_log_concentration.fill_(math.log(10.0))
            self.noise_loc.fill_(math.log(self.priors.noise_median))
            self.noise_scale_raw.fill_(math.log(math.expm1(0.1)))

    # ---------------------------------------------------------------- closed-form pieces
    def log_likelihood_components(self, signal: torch.Tensor, times: torch.Tensor, observed: torch.Tensor,
                                  diffusivity: torch.Tensor, reaction: torch.Tensor | None,
                                  noise: torch.Tensor) -> torch.Tensor:
        """log p(signal_i | subtype k, D_ik, r_ik, noise) for every component: (B, K).

        diffusivity (B, K), reaction (B, K_r); later observed visits only.
        """
        fields = self.predict(signal[:, 0], times, diffusivity, reaction)  # (B, K, T, n)
        resid = signal[:, None, 1:] - fields[:, :, 1:]
        mask = observed[:, None, 1:, None].to(signal.dtype)
        n_obs = mask.sum(dim=(2, 3)) * signal.shape[-1]
        sq = (resid ** 2 * mask).sum(dim=(2, 3))
        return gaussian_log_likelihood(sq, n_obs, observation_sd(noise))

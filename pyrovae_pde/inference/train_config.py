"""Settings of a fit (``TrainConfig``), what a run records (``TrainState``) and the
train/validation split; the schedule they control is described in ``train``'s module docstring."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError

GUIDES = ("semi-amortized", "amortized")
RESTART_SPREAD_WARNING = 1.0  # nats per subject between the best and worst restart's validation ELBO


def _amortize_default() -> int:
    from . import amortize  # read when a config is made, so that one setting changes every default

    return amortize.DEFAULT_STEPS


@dataclass
class TrainConfig:
    """Settings of a fit (see the module docstring for the schedule)."""

    epochs: int = 40  # the most epochs; a run that reaches its plateau stops earlier
    batch_size: int = 64
    learning_rate: float = 0.01  # Adam on the globals (and on the encoder's wake step if amortized)
    encoder_learning_rate: float = 3e-3
    validation_fraction: float = 0.1
    seed: int = 0
    split_seed: int | None = None  # seed of the train/validation split (default: seed); restarts share it
    device: str = "cpu"
    clip_norm: float = 20.0
    guide: str = "semi-amortized"
    warmup_sleep_steps: int = 200
    sleep_batch_size: int = 32
    sleep_every: int = 4
    search_grid: int = 5
    refine_iterations: int = 2
    distill_steps: int = 200
    learn_population: bool = True  # empirical-Bayes population priors (population.py); False: the base priors
    tie_population: bool = True  # one learned population per parameter, shared by all subtypes
    # Gaussians per coordinate of a tied population (a mixture follows skewed or bounded parameter
    # distributions; benchmarks/RESULTS.md, "Training"); per-subtype populations are one Gaussian
    population_terms: int = 3
    validation_draws: int = 4
    # after the fit: steps of training the encoder and its subtype head on subjects simulated by the
    # fitted model (amortize.py; 0: none, predict then refines every subject)
    amortize_steps: int = field(default_factory=lambda: _amortize_default())
    min_epochs: int = 3
    plateau_window: int = 3
    plateau_tolerance: float = 0.02  # nats per subject
    rollback_drop: float = 5.0  # nats per subject below the best validation ELBO (plus 3 MC SE)
    max_rollbacks: int = 4
    restarts: int = 1
    progress: bool = True
    # data-parallel over torch.distributed (distributed.py; launched by torchrun): each rank holds every P-th
    # subject and takes its own of each global minibatch of batch_size; collectives fail after distributed_timeout s
    distributed: bool = False
    distributed_timeout: float = 600.0

    def __post_init__(self):
        if self.guide not in GUIDES:
            raise InputError(f"guide must be one of {GUIDES}, got {self.guide!r}")
        for name in ("epochs", "batch_size", "restarts", "plateau_window", "population_terms"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.amortize_steps < 0:
            raise InputError(f"amortize_steps must be >= 0, got {self.amortize_steps}")
        if not self.learning_rate > 0 or not self.encoder_learning_rate > 0:
            raise InputError("learning rates must be > 0")


@dataclass
class TrainState:
    """What a run records: its history and its convergence diagnostics (saved in model.json).

    ``history``: one record per epoch (train and validation ELBO per subject, learning-rate
    scale). ``converged``: the validation ELBO reached a plateau before ``epochs``;
    ``stop_reason``; ``elbo_slope``: slope of the smoothed validation ELBO over the last
    ``plateau_window`` epochs (nats per subject and epoch); ``rollbacks`` and ``skipped_steps``;
    ``restart_elbos``: the final validation ELBO of every restart (their spread is in
    ``restart_spread``); ``restart``: which restart this state belongs to.
    """

    epoch: int = 0
    history: list = field(default_factory=list)
    best_val: float = math.inf  # best validation loss (negative ELBO per subject)
    best_epoch: int = -1
    stopped_early: bool = False
    converged: bool = False
    stop_reason: str = "not started"
    elbo_slope: float = math.nan
    rollbacks: int = 0
    skipped_steps: int = 0
    lr_scale: float = 1.0
    restart: int = 0
    restart_elbos: list = field(default_factory=list)
    initial_noise: float = math.nan
    initial_weights: list = field(default_factory=list)
    prior_check: list = field(default_factory=list)  # prior_check.PriorCheck.as_dict() per parameter
    amortization: dict = field(default_factory=dict)  # amortize.AmortizationReport.as_dict(); {}: none

    @property
    def restart_spread(self) -> float:
        vals = [v for v in self.restart_elbos if math.isfinite(v)]
        return float(max(vals) - min(vals)) if len(vals) > 1 else math.nan

    def diagnostics(self) -> dict:
        """The convergence record written to model.json."""
        return {"converged": self.converged, "stop_reason": self.stop_reason, "epochs_run": self.epoch,
                "best_epoch": self.best_epoch, "best_validation_elbo": -self.best_val,
                "elbo_slope_per_epoch": self.elbo_slope, "rollbacks": self.rollbacks,
                "skipped_steps": self.skipped_steps, "restarts": max(1, len(self.restart_elbos)),
                "restart_elbos": self.restart_elbos, "restart_spread": self.restart_spread,
                "prior_check": self.prior_check, "amortization": self.amortization}


def split_indices(n: int, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Reproducible train/validation split of n subjects (no validation set below 10 subjects)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * validation_fraction)) if n >= 10 else 0
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def convergence_warning(diag: dict | None) -> str | None:
    """A one-line warning naming what to change when a fit with the diagnostics ``diag``
    (``TrainState.diagnostics``; None: not recorded) did not converge, else None."""
    if diag is None:
        return ("this run does not record whether its fit converged (written by an older version); refit it "
                "with 'pyrovae-pde fit' to check")
    if diag.get("stop_reason") == "max_epochs":
        slope = diag.get("elbo_slope_per_epoch", float("nan"))
        trend = (f"was still changing ({slope:+.3g} nats per subject and epoch)" if slope == slope
                 else "had too few epochs to show a plateau")
        return (f"the fit did NOT converge: its validation ELBO {trend} when it reached the most epochs "
                f"({diag['epochs_run']}); results from it may be "
                f"artefacts of the unfinished fit. Refit with a larger --epochs (e.g. --epochs "
                f"{max(2 * diag['epochs_run'], 10)})")
    if not diag.get("converged"):
        return f"the fit did NOT converge ({diag.get('stop_reason')}); refit it (see 'pyrovae-pde fit --help')"
    spread = diag.get("restart_spread")
    if spread is not None and spread == spread and spread > RESTART_SPREAD_WARNING:
        return (f"the {diag['restarts']} restarts ended {spread:.2f} nats per subject apart: the fit may depend on "
                "its start; refit with more --restarts")
    return None

"""Settings of a fit (``TrainConfig``), what a run records (``TrainState``) and the
train/validation split; the schedule they control is described in ``train``'s module docstring."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError

GUIDES = ("semi-amortized", "amortized")


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
    validation_draws: int = 4
    min_epochs: int = 3
    plateau_window: int = 3
    plateau_tolerance: float = 0.02  # nats per subject
    rollback_drop: float = 5.0  # nats per subject below the best validation ELBO (plus 3 MC SE)
    max_rollbacks: int = 4
    restarts: int = 1
    progress: bool = True
    # data-parallel over torch.distributed (distributed.py; launched by torchrun): each rank takes every
    # P-th subject of each global minibatch of batch_size; collectives fail after distributed_timeout seconds
    distributed: bool = False
    distributed_timeout: float = 600.0

    def __post_init__(self):
        if self.guide not in GUIDES:
            raise InputError(f"guide must be one of {GUIDES}, got {self.guide!r}")
        for name in ("epochs", "batch_size", "restarts", "plateau_window"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
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
                "prior_check": self.prior_check}


def split_indices(n: int, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Reproducible train/validation split of n subjects (no validation set below 10 subjects)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * validation_fraction)) if n >= 10 else 0
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])

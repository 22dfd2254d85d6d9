"""User-facing model class: ``SubtypeModel(components=[...]).fit(ds).posterior(new_ds)``."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import xarray as xr

from .. import __version__
from ..data import ContractError, atomic_write, validate_dataset
from ..data.cohort import CohortTensors, cohort_tensors, domain_from_dataset
from ..errors import ModelError
from ..inference.posterior import posterior_dataset
from ..inference.train import TrainConfig, TrainState, train
from ..model.module import MixturePDE
from ..model.priors import LogNormalPrior, Priors, cohort_priors
from ..physics import Domain, GraphDomain, GridDomain, get_reaction
from ..physics.solvers import DEFAULT_INITIAL_REACTION_STEP, DEFAULT_REACTION_STEP

RESTART_SPREAD_WARNING = 1.0  # nats per subject between the best and worst restart's validation ELBO
MODEL_FILE = "model.pt"
CONFIG_FILE = "model.json"


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; asking for CUDA where there is none is a clear error."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


class SubtypeModel:
    """A mixture of reaction-diffusion PDE subtypes with an amortized guide.

    Args:
        components: reaction-term names (K = 1 is the single-PDE baseline).
        priors: ``Priors``, or a dict ``{"diffusivity": (lo, hi), "reaction": (lo, hi)}`` of
            central 95% intervals; what is not given is derived at fit time from the cohort's
            follow-up and its domain's Laplacian (``model.priors.cohort_priors``).
        reaction_step, initial_reaction_step: largest r*dt of the solver's Strang steps during
            fitting and prediction, after and within the first visit interval.
    """

    def __init__(self, components: Sequence[str] = ("fisher_kpp", "saturating", "zeldovich"),
                 priors: Priors | dict | None = None, reaction_step: float = DEFAULT_REACTION_STEP,
                 encoder_width: int = 16, initial_reaction_step: float = DEFAULT_INITIAL_REACTION_STEP):
        if isinstance(components, str):
            components = [c for c in components.split(",") if c]
        self.components = tuple(components)
        for name in self.components:
            get_reaction(name)  # KeyError listing the registered names
        if not self.components:
            raise ModelError("give at least one component")
        if len(set(self.components)) != len(self.components):
            raise ModelError(f"components must be distinct, got {list(self.components)}")
        self.prior_overrides: dict[str, LogNormalPrior] = {}
        if isinstance(priors, dict):
            unknown = set(priors) - {"diffusivity", "reaction"}
            if unknown:
                raise ModelError(f"priors: unknown name(s) {sorted(unknown)}; give 'diffusivity' and/or 'reaction'")
            self.prior_overrides = {name: value if isinstance(value, LogNormalPrior) else LogNormalPrior(*value)
                                    for name, value in priors.items()}
            priors = None
        self.priors_given: Priors | None = priors
        # None until fit: what the user did not give is derived from the cohort (cohort_priors)
        self.priors: Priors | None = priors
        self.reaction_step = reaction_step
        self.initial_reaction_step = initial_reaction_step
        self.encoder_width = encoder_width
        self.module_: MixturePDE | None = None
        self.domain_: Domain | None = None
        self.history_: TrainState | None = None
        self.time_scale_: float | None = None

    # ------------------------------------------------------------------ fitting
    def _tensors(self, ds: xr.Dataset, source: str) -> CohortTensors:
        validate_dataset(ds, source=source)
        if self.domain_ is not None:
            other = domain_from_dataset(ds)
            if other.fingerprint() != self.domain_.fingerprint():
                raise ModelError(
                    f"{source}: its domain ({ds.attrs['domain']}, {other.n_nodes} active nodes, shape "
                    f"{other.spatial_shape}) differs from the one this model was fitted on "
                    f"({self.domain_.kind}, {self.domain_.n_nodes} nodes, shape {self.domain_.spatial_shape}); "
                    "the mask/adjacency must be identical: refit on this domain")
        domain = self.domain_ or domain_from_dataset(ds)
        data = cohort_tensors(ds, domain)
        if self.module_ is not None:
            data = _pad_visits(data, self.module_.n_visits, source)
        return data

    def fit(self, ds: xr.Dataset, epochs: int = TrainConfig.epochs, batch_size: int = TrainConfig.batch_size,
            learning_rate: float = TrainConfig.learning_rate, seed: int = 0, device: str = "cpu",
            checkpoint_dir: str | os.PathLike | None = None, resume: bool = False, progress: bool = True,
            source: str = "<training dataset>", restarts: int = 1, **train_options) -> "SubtypeModel":
        """Fit to a contract dataset (validated first); ``epochs`` is the most epochs (a run stops
        at the plateau of its validation ELBO), ``restarts`` fits from other seeds and keeps the
        best. ``train_options`` go to ``TrainConfig``. ``convergence_`` holds the diagnostics."""
        dev = resolve_device(device)
        torch.manual_seed(seed)
        self.domain_ = None
        data = self._tensors(ds, source)
        self.domain_ = domain_from_dataset(ds)
        tau = data.times - data.times[:, :1]
        self.time_scale_ = float(torch.nan_to_num(tau, nan=0.0).max()) or 1.0
        self.priors = self.priors_given or cohort_priors(follow_up(data), *self.domain_.spectral_range(),
                                                         **self.prior_overrides)
        self.module_ = MixturePDE(self.domain_, self.components, data.signal.shape[1], self.priors,
                                  time_scale=self.time_scale_, reaction_step=self.reaction_step,
                                  initial_reaction_step=self.initial_reaction_step,
                                  encoder_width=self.encoder_width)
        config = TrainConfig(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                             device=str(dev), progress=progress, restarts=restarts, **train_options)
        self.history_ = train(self.module_, data, config, checkpoint_dir=checkpoint_dir, resume=resume)
        self.module_.to("cpu")
        return self

    @property
    def convergence_(self) -> dict | None:
        """The fit's convergence diagnostics (see ``TrainState.diagnostics``); None if unknown."""
        return self.history_.diagnostics() if self.history_ is not None else None

    @property
    def converged_(self) -> bool:
        diag = self.convergence_
        return bool(diag and diag.get("converged"))

    def convergence_warning(self) -> str | None:
        """A one-line warning naming what to change when the fit did not converge, else None."""
        diag = self.convergence_
        if diag is None:
            return ("this run does not record whether its fit converged (written by an older version); refit it "
                    "with 'pyrovae-pde fit' to check")
        if diag.get("stop_reason") == "max_epochs":
            slope = diag.get("elbo_slope_per_epoch", float("nan"))
            return (f"the fit did NOT converge: its validation ELBO was still changing ({slope:+.3g} nats per subject "
                    f"and epoch) when it reached the most epochs ({diag['epochs_run']}); results from it may be "
                    f"artefacts of the unfinished fit. Refit with a larger --epochs (e.g. --epochs "
                    f"{max(2 * diag['epochs_run'], 10)})")
        if not diag.get("converged"):
            return f"the fit did NOT converge ({diag.get('stop_reason')}); refit it (see 'pyrovae-pde fit --help')"
        spread = diag.get("restart_spread")
        if spread is not None and spread == spread and spread > RESTART_SPREAD_WARNING:
            return (f"the {diag['restarts']} restarts ended {spread:.2f} nats per subject apart: the fit may depend on "
                    "its start; refit with more --restarts")
        return None

    def _require_fitted(self) -> MixturePDE:
        if self.module_ is None:
            raise ModelError("this model is not fitted yet: call fit(ds) or SubtypeModel.load(dir)")
        return self.module_

    # ------------------------------------------------------------------ posterior
    def posterior(self, ds: xr.Dataset, n_particles: int | None = None, seed: int = 0, device: str = "cpu",
                  source: str = "<dataset>", refine: bool = True, n_iter: int = 3) -> xr.Dataset:
        """Posterior summary for the subjects of ``ds`` (any cohort on the fitted domain).

        Returns the posterior contract: ``subtype_prob`` (subject, subtype), ``diffusivity`` and
        ``reaction`` means with ``_sd``, ``_q05``, ``_q95`` (subject, subtype), ``weights`` (subtype).
        By default each subject's posterior given each subtype is the Laplace approximation
        refined from the encoder's guess (``n_iter`` Levenberg-Marquardt iterations);
        ``n_particles`` > 0 turns each Laplace approximation into an importance-sampling proposal
        (``n_particles`` solves per subject and subtype) for skewed posteriors; the default does so
        with 128 draws on domains of at most 256 nodes (graphs), and not on larger ones.
        ``refine=False`` uses the encoder's guide alone with ``n_particles`` (default 8) importance draws.
        """
        module = self._require_fitted()
        data = self._tensors(ds, source)
        dev = resolve_device(device)
        module.to(dev)
        try:
            post = posterior_dataset(module, data.to(dev), n_particles=n_particles, seed=seed, refine=refine,
                                     n_iter=n_iter)
        finally:
            module.to("cpu")
        post.attrs["model_components"] = ",".join(self.components)
        return post

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``model.json`` and ``model.pt`` into ``directory`` (each atomically)."""
        module = self._require_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        domain = self.domain_
        domain_payload = {"kind": domain.kind, "laplacian_fingerprint": domain.fingerprint()}
        tensors = {"state_dict": module.state_dict()}
        if domain.kind == "grid":
            mask = np.zeros(int(np.prod(domain.spatial_shape)), dtype=np.int8)
            mask[domain.active_index] = 1
            tensors["mask"] = torch.as_tensor(mask.reshape(domain.spatial_shape))
            domain_payload["spacing"] = list(domain.spacing)
        else:
            lap = domain.laplacian.toarray()
            tensors["adjacency"] = torch.as_tensor(np.diag(np.diag(lap)) - lap)
        config = {
            "pyrovae_pde_version": __version__, "components": list(self.components),
            "priors": self.priors.as_dict(), "reaction_step": self.reaction_step,
            "initial_reaction_step": self.initial_reaction_step,
            "encoder_width": self.encoder_width, "n_visits": module.n_visits, "time_scale": self.time_scale_,
            "domain": domain_payload, "history": asdict(self.history_) if self.history_ else None,
            "convergence": self.history_.diagnostics() if self.history_ else None,
        }
        atomic_write(directory / MODEL_FILE, lambda tmp: torch.save(tensors, tmp))
        atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "SubtypeModel":
        """Load a model written by ``save`` (or by ``pyrovae-pde fit``)."""
        directory = Path(directory)
        for name in (CONFIG_FILE, MODEL_FILE):
            if not (directory / name).exists():
                raise ModelError(f"{directory}: no {name} here; is this a run directory written by "
                                 "'pyrovae-pde fit' or SubtypeModel.save?")
        config = json.loads((directory / CONFIG_FILE).read_text())
        tensors = torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=False)
        model = cls(config["components"], Priors.from_dict(config["priors"]), config["reaction_step"],
                    config["encoder_width"],
                    config.get("initial_reaction_step", DEFAULT_INITIAL_REACTION_STEP))
        if config["domain"]["kind"] == "grid":
            model.domain_ = GridDomain(tensors["mask"].numpy(), config["domain"]["spacing"])
        else:
            model.domain_ = GraphDomain(tensors["adjacency"].numpy())
        model.time_scale_ = config["time_scale"]
        model.module_ = MixturePDE(model.domain_, model.components, config["n_visits"], model.priors,
                                   time_scale=model.time_scale_, reaction_step=model.reaction_step,
                                   encoder_width=model.encoder_width,
                                   initial_reaction_step=model.initial_reaction_step)
        model.module_.load_state_dict(tensors["state_dict"])
        if config.get("history"):
            model.history_ = TrainState(**config["history"])
        return model


def follow_up(data: CohortTensors) -> float:
    """The cohort's typical follow-up: median time from first to last visit over subjects with
    at least two visits (1.0 if none has)."""
    span = (torch.nan_to_num(data.times, nan=-math.inf).amax(dim=1) - data.times[:, 0])[data.observed.sum(1) > 1]
    return float(span.median()) if span.numel() else 1.0


def _pad_visits(data: CohortTensors, n_visits: int, source: str) -> CohortTensors:
    """Pad a cohort with missing visit slots up to the fitted model's ``n_visits``."""
    t = data.signal.shape[1]
    if t == n_visits:
        return data
    if t > n_visits:
        raise ContractError(f"{source}: variable 'signal' has {t} visit slots but the model was fitted with "
                            f"{n_visits}; refit with data that has at least {t} visit slots")
    extra = n_visits - t
    pad = lambda x, value: torch.cat([x, x.new_full((x.shape[0], extra, *x.shape[2:]), value)], dim=1)  # noqa: E731
    return CohortTensors(data.subjects, pad(data.signal, 0.0), pad(data.times, float("nan")),
                         pad(data.observed, False))

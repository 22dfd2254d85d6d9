"""User-facing model class: ``SubtypeModel(components=[...]).fit(ds).posterior(new_ds)``."""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import torch
import xarray as xr

from .. import __version__
from ..data import atomic_write, validate_dataset
from ..data.cohort import CohortTensors, LazyCohort, cohort_tensors, domain_from_dataset, follow_up, pad_visits
from ..data.contract import read_json_file, read_torch_file
from ..errors import ModelError, PyrovaePDEError
from ..inference import distributed as ddp
from ..inference.amortize import TrustRule
from ..inference.posterior import posterior_dataset
from ..inference.ppc import DEFAULT_THRESHOLD
from ..inference.quadrature import DEFAULT_TOLERANCE
from ..inference.train import TrainConfig, TrainState, train
from ..inference.train_config import convergence_warning
from ..model.module import MixturePDE
from ..model.priors import LogNormalPrior, Priors, cohort_priors
from ..physics import Domain, GraphDomain, GridDomain, get_reaction, resolve_method
from ..physics.solvers import DEFAULT_INITIAL_REACTION_STEP, DEFAULT_REACTION_STEP

if TYPE_CHECKING:  # the analyses load their modules when called
    from ..inference.comparison import Comparison
    from ..inference.evidence import ModelEvidence
    from ..inference.ppc import PPCResult

MODEL_FILE = "model.pt"
CONFIG_FILE = "model.json"
RUN_CONFIG_KEYS = ("components", "priors", "reaction_step", "encoder_width", "domain", "time_scale", "n_visits")


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
        self.seed_: int | None = None  # the seed of the fit (None if unknown)

    # ------------------------------------------------------------------ fitting
    def tensors(self, ds: xr.Dataset, source: str = "<dataset>", lazy: bool = False) -> CohortTensors | LazyCohort:
        """``ds`` validated and gathered onto the active nodes, as the module sees it.

        signal (N, T, n_nodes), times (N, T) in the file's time unit, observed (N, T); on a fitted
        model the domain must be the fitted one and the visit slots are padded to its ``n_visits``.
        ``source`` names ``ds`` in error messages. ``lazy=True``: a ``LazyCohort`` instead, whose signal
        is read (and checked) only for the subjects asked for, as each rank of a distributed run does.
        """
        validate_dataset(ds, source=source, signal_values=not lazy)
        if self.domain_ is not None:
            other = domain_from_dataset(ds)
            if other.fingerprint() != self.domain_.fingerprint():
                raise ModelError(
                    f"{source}: its domain ({ds.attrs['domain']}, {other.n_nodes} active nodes, shape "
                    f"{other.spatial_shape}) differs from the one this model was fitted on "
                    f"({self.domain_.kind}, {self.domain_.n_nodes} nodes, shape {self.domain_.spatial_shape}); "
                    "the mask/adjacency must be identical: refit on this domain")
        domain = self.domain_ or domain_from_dataset(ds)
        if lazy:
            fitted = self.module_ is not None  # then padded to the fitted visit slots
            return LazyCohort(ds, domain, source=source, n_visits=self.module_.n_visits if fitted else None)
        data = cohort_tensors(ds, domain)
        if self.module_ is not None:
            data = pad_visits(data, self.module_.n_visits, source)
        return data

    def fit(self, ds: xr.Dataset, epochs: int = TrainConfig.epochs, batch_size: int = TrainConfig.batch_size,
            learning_rate: float = TrainConfig.learning_rate, seed: int = 0, device: str = "cpu",
            checkpoint_dir: str | os.PathLike | None = None, resume: bool = False, progress: bool = True,
            source: str = "<training dataset>", restarts: int = TrainConfig.restarts,
            **train_options) -> "SubtypeModel":
        """Fit to a contract dataset (validated first); ``epochs`` is the most epochs (a run stops
        at the plateau of its validation ELBO), ``restarts`` fits from other seeds and keeps the
        best. ``train_options`` go to ``TrainConfig``. ``convergence_`` holds the diagnostics. With
        ``distributed=True`` (in torchrun) each rank reads only its subjects from ``ds`` (``LazyCohort``)."""
        dev = resolve_device(device)
        torch.manual_seed(seed)
        self.domain_ = None
        data = self.tensors(ds, source, lazy=bool(train_options.get("distributed")))
        self.domain_ = domain_from_dataset(ds)
        tau = data.times - data.times[:, :1]
        self.time_scale_ = float(torch.nan_to_num(tau, nan=0.0).max()) or 1.0
        self.priors = self.priors_given or cohort_priors(follow_up(data), *self.domain_.spectral_range(),
                                                         **self.prior_overrides)
        self.module_ = MixturePDE(self.domain_, self.components, data.times.shape[1], self.priors,
                                  time_scale=self.time_scale_, reaction_step=self.reaction_step,
                                  initial_reaction_step=self.initial_reaction_step,
                                  encoder_width=self.encoder_width)
        config = TrainConfig(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                             device=str(dev), progress=progress, restarts=restarts, **train_options)
        self.history_ = train(self.module_, data, config, checkpoint_dir=checkpoint_dir, resume=resume)
        self.module_.to("cpu")
        self.seed_ = seed
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
        return convergence_warning(self.convergence_)

    def _require_fitted(self) -> MixturePDE:
        if self.module_ is None:
            raise ModelError("this model is not fitted yet: call fit(ds) or SubtypeModel.load(dir)")
        return self.module_

    # ------------------------------------------------------------------ posterior
    def posterior(self, ds: xr.Dataset, n_particles: int | None = None, seed: int = 0, device: str = "cpu",
                  source: str = "<dataset>", refine: bool | str = "auto", n_iter: int = 3,
                  distributed: bool = False, trust: TrustRule | None = None) -> xr.Dataset | None:
        """Posterior summary for the subjects of ``ds`` (any cohort on the fitted domain).

        Returns the posterior contract: ``subtype_prob`` (subject, subtype), ``diffusivity`` and
        ``reaction`` means with ``_sd``, ``_q05``, ``_q95`` (subject, subtype), ``weights`` (subtype).
        By default each subject's posterior given each subtype is the Laplace approximation
        refined from the encoder's guess (``n_iter`` Levenberg-Marquardt iterations);
        ``n_particles`` > 0 turns each Laplace approximation into an importance-sampling proposal
        (``n_particles`` solves per subject and subtype) for skewed posteriors; the default does so
        with 128 draws on domains of at most 256 nodes (graphs), and not on larger ones.
        ``refine="auto"`` (default): a model amortized by ``fit`` takes the encoder's posterior
        alone for the subjects whose check passes and refines the others (variable ``refined``,
        attribute ``n_refined``; ``trust``: an ``inference.amortize.TrustRule``, the rule of that
        check); ``refine=True`` refines every subject; ``refine=False`` uses the encoder alone (see
        ``inference.posterior.posterior_dataset``).
        ``distributed=True`` (in torchrun): rank r of P reads and predicts only the subjects r, r + P,
        ... of ``ds``; rank 0 returns the whole cohort's posterior (see ``posterior_dataset``), the others None.
        """
        module = self._require_fitted()
        dev = resolve_device(device)
        with ddp.process_group(str(dev), TrainConfig.distributed_timeout, "predict", enabled=distributed):
            cohort = self.tensors(ds, source, lazy=distributed)
            data, share = ddp.read_own(cohort) if distributed else (cohort, None)
            module.to(dev)
            try:
                post = posterior_dataset(module, data.to(dev), n_particles=n_particles, seed=seed, refine=refine,
                                         n_iter=n_iter, share=share, trust=trust)
            finally:
                module.to("cpu")
        if post is not None:
            post.attrs["model_components"] = ",".join(self.components)
        return post

    # ------------------------------------------------------------------ analyses
    def evidence(self, ds: xr.Dataset, method: str = "quadrature", n_draws: int = 200, seed: int = 0,
                 n_particles: int = 32, tolerance: float = DEFAULT_TOLERANCE, elbo_repeats: int = 4,
                 keep_fields: bool = False, source: str = "<dataset>") -> "ModelEvidence":
        """Log evidence log p(ds | model) (nats, summed over subjects; ``log_evidence`` and its
        ``log_evidence_se``), the pointwise marginal likelihood (draws, subject) and the ELBO.

        ``method``: ``"quadrature"`` of each subject's latents (``tolerance`` nats) or
        ``"importance"`` (``n_particles`` Laplace-proposal draws per subject and component;
        ``keep_fields=True`` keeps their solutions, for ``check``/``forecast``/``to_inference_data``);
        ``n_draws`` posterior draws of the globals; ``elbo_repeats`` draws of the ELBO (0: skipped).
        Mixture populations (the default fit) are held at their fitted values, not integrated: to
        rank models use ``compare`` (base priors). See ``inference.evidence.model_evidence``.
        """
        from ..inference.evidence import model_evidence

        module = self._require_fitted()
        return model_evidence(module, self.tensors(ds, source), method=method, n_particles=n_particles,
                              n_draws=n_draws, seed=seed, tolerance=tolerance, elbo_repeats=elbo_repeats,
                              keep_fields=keep_fields)

    def check(self, ds: xr.Dataset, n_draws: int = 200, n_particles: int = 32, seed: int = 0,
              threshold: float = DEFAULT_THRESHOLD, evidence: "ModelEvidence | None" = None,
              source: str = "<dataset>") -> "PPCResult":
        """Posterior predictive check: ``n_draws`` cohorts replicated from the posterior, p-values of
        total burden, spread (nodes above ``threshold``, signal units) and max per later visit.

        Returns a ``PPCResult``: ``table`` of p-values, ``verdicts()`` one line per statistic.
        ``evidence``: an importance ``evidence(ds, method="importance", keep_fields=True)`` to reuse.
        """
        from ..inference.ppc import posterior_predictive_check

        module = self._require_fitted()
        return posterior_predictive_check(module, self.tensors(ds, source), n_draws=n_draws, n_particles=n_particles,
                                          seed=seed, threshold=threshold, evidence=evidence)

    def forecast(self, ds: xr.Dataset, times, n_draws: int = 200, n_particles: int = 32, seed: int = 0,
                 subjects: Sequence[str] | None = None, evidence: "ModelEvidence | None" = None,
                 source: str = "<dataset>") -> xr.Dataset:
        """Forecast the subjects of ``ds`` (or only ``subjects``) at ``times``, with 90% predictive bands.

        ``times``: absolute times in the unit and origin of ``ds``'s ``time``, shared by all subjects
        (M,) or one row per subject (N, M); none before a subject's first visit. Returns a Dataset
        with dims (subject, time, [subtype], space), space ``node`` on a graph or the grid's (z,) y, x
        (zeros outside the mask): ``mean``, ``q05``, ``q50``, ``q95`` (mixed over the subtype
        posterior), ``mean_by_subtype``, ``q05_by_subtype``, ``q95_by_subtype``, ``subtype_prob``
        (subject, subtype) and ``forecast_time`` (subject, time). ``evidence``: an importance
        ``evidence`` of the same subjects to reuse.
        """
        from ..inference.forecast import forecast

        module = self._require_fitted()
        if subjects is not None:
            known = {str(s) for s in ds["subject"].values}
            unknown = [s for s in subjects if s not in known]
            if unknown:
                raise ModelError(f"{source}: no subject {unknown[0]!r} in the file")
            ds = ds.sel(subject=list(subjects))
        return forecast(module, self.tensors(ds, source), times, n_draws=n_draws, n_particles=n_particles, seed=seed,
                        evidence=evidence, space_coords=_space_coords(ds),
                        time_unit=str(ds.attrs.get("time_unit", "")))

    def to_inference_data(self, ds: xr.Dataset, n_draws: int = 100, n_particles: int = 32, seed: int = 0,
                          evidence: "ModelEvidence | None" = None, predictive: bool = True, elbo_repeats: int = 4,
                          source: str = "<dataset>"):
        """The posterior on ``ds`` as ArviZ InferenceData (arviz 0.x) / DataTree (arviz 1.x).

        Groups: ``posterior`` (weights, noise_scale, per-subject diffusivity, reaction and
        subtype_prob; ``n_draws`` draws of the globals), ``posterior_predictive`` (unless
        ``predictive=False``), ``log_likelihood`` (subject: the input of ``az.loo``/``az.compare``),
        ``observed_data`` and ``constant_data``; see ``inference.arviz_export``. ``evidence``: an
        importance ``evidence`` to reuse (``keep_fields=True`` when ``predictive``).
        """
        from ..inference.arviz_export import to_inference_data

        module = self._require_fitted()
        return to_inference_data(module, self.tensors(ds, source), n_draws=n_draws, n_particles=n_particles,
                                 seed=seed, evidence=evidence, predictive=predictive, elbo_repeats=elbo_repeats,
                                 space_coords=_space_coords(ds))

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``model.json`` and ``model.pt`` into ``directory`` (each atomically)."""
        module = self._require_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        domain = self.domain_
        domain_payload = {"kind": domain.kind, "laplacian_fingerprint": domain.fingerprint(),
                          "n_nodes": domain.n_nodes,
                          "solver": resolve_method(domain, module.solver_settings().method)}
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
            "encoder_width": self.encoder_width, "encoder_stem_voxels": module.encoder_stem_voxels,
            "n_visits": module.n_visits, "time_scale": self.time_scale_,
            "domain": domain_payload, "history": asdict(self.history_) if self.history_ else None,
            "convergence": self.history_.diagnostics() if self.history_ else None, "seed": self.seed_,
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
        fix = f"refit the model (pyrovae-pde fit ... --out {directory})"
        config = read_json_file(directory / CONFIG_FILE, fix)
        missing = [key for key in RUN_CONFIG_KEYS if key not in config]
        if missing:
            raise ModelError(f"{directory / CONFIG_FILE}: no {missing[0]!r} entry (written by pyrovae_pde "
                             f"{config.get('pyrovae_pde_version', 'unknown')}, read by {__version__}); {fix}")
        tensors = read_torch_file(directory / MODEL_FILE, fix)
        try:
            model = cls._from_files(config, tensors)
        except PyrovaePDEError as exc:
            raise ModelError(f"{directory}: {exc}; {fix}") from None
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelError(f"{directory}: {MODEL_FILE} does not match {CONFIG_FILE} ({reason}); the run was "
                             f"written by pyrovae_pde {config.get('pyrovae_pde_version', 'unknown')} and is read by "
                             f"{__version__}: {fix}") from None
        return model

    @classmethod
    def _from_files(cls, config: dict, tensors: dict) -> "SubtypeModel":
        model = cls(config["components"], Priors.from_dict(config["priors"]), config["reaction_step"],
                    config["encoder_width"],
                    config.get("initial_reaction_step", DEFAULT_INITIAL_REACTION_STEP))
        if config["domain"]["kind"] == "grid":
            model.domain_ = GridDomain(tensors["mask"].numpy(), config["domain"]["spacing"])
        else:
            model.domain_ = GraphDomain(tensors["adjacency"].numpy())
        recorded = config["domain"].get("laplacian_fingerprint")
        if recorded is not None and recorded != model.domain_.fingerprint():
            raise ModelError(f"{MODEL_FILE} holds a different domain (fingerprint {model.domain_.fingerprint()}) from "
                             f"the one {CONFIG_FILE} records ({recorded}): the two files come from different runs")
        model.time_scale_ = config["time_scale"]
        model.module_ = MixturePDE(model.domain_, model.components, config["n_visits"], model.priors,
                                   time_scale=model.time_scale_, reaction_step=model.reaction_step,
                                   encoder_width=model.encoder_width,
                                   initial_reaction_step=model.initial_reaction_step,
                                   # absent: saved before the encoder had a stem
                                   encoder_stem_voxels=config.get("encoder_stem_voxels"))
        model.module_.load_state_dict(tensors["state_dict"])
        if config.get("history"):
            model.history_ = TrainState(**config["history"])
        model.seed_ = config.get("seed")
        return model


def compare(models: Mapping[str, "SubtypeModel | Sequence[SubtypeModel]"], ds: xr.Dataset, n_draws: int = 200,
            seed: int = 0, folds: int = 5, elbo_draws: int = 4, source: str = "<dataset>",
            population: str = "base") -> "Comparison":
    """Compare fitted models on one cohort, like ``az.compare``: name -> a model, or a list of fits
    of the same components (repeats with other seeds, whose spread enters the evidence's SE).

    Returns a ``Comparison``: ``table`` (one row per model: log evidence and SE, PSIS-LOO,
    ``folds``-fold cross-validated lpd, ELBO; nats), the ``verdict`` line and ``warnings``. A model
    whose fits did not converge is flagged, not ranked. ``n_draws``: posterior draws of the globals;
    ``elbo_draws``: draws of each fit's ELBO (0: not computed); ``population``: ``"base"``
    (default: every model under its base priors, so that no mixture wins by reshaping a
    population) or ``"learned"`` (each fit's learned population priors). See ``inference.comparison``.
    """
    from ..inference.comparison import FittedRun, compare_models

    runs: dict[str, list[FittedRun]] = {}
    for name, fits in models.items():
        fits = [fits] if isinstance(fits, SubtypeModel) else list(fits)
        if not fits:
            raise ModelError(f"compare: model {name!r} has no fitted model")
        if len({m.components for m in fits}) > 1:
            raise ModelError(f"compare: the repeats of {name!r} have different components "
                             f"{sorted({','.join(m.components) for m in fits})}; give each its own name")
        runs[name] = [FittedRun(m._require_fitted(), m.tensors(ds, source), m.converged_,
                                -1 if m.seed_ is None else m.seed_) for m in fits]
    return compare_models(runs, n_draws=n_draws, seed=seed, folds=folds, elbo_draws=elbo_draws,
                          population=population)


def _space_coords(ds: xr.Dataset) -> dict[str, np.ndarray]:
    """The spatial dims of ``ds``'s signal with their coordinates (graphs: ``node`` names if any)."""
    if ds.attrs["domain"] == "grid":
        return {dim: ds[dim].values for dim in ds["signal"].dims[2:]}
    return {"node": ds["node"].values} if "node" in ds.coords else {}

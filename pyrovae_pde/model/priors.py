"""LogNormal priors on diffusivity and reaction rate, specified by a central 95% interval."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InputError

Z95 = 1.959963984540054  # standard-normal quantile of 0.975


@dataclass(frozen=True)
class LogNormalPrior:
    """LogNormal(loc, scale) on a positive rate; ``low``/``high`` is its central 95% interval."""

    low: float
    high: float

    def __post_init__(self):
        if not (0 < self.low < self.high) or not math.isfinite(self.high):
            raise InputError(f"a prior interval needs 0 < LO < HI, got LO={self.low}, HI={self.high}")

    @property
    def loc(self) -> float:
        return 0.5 * (math.log(self.low) + math.log(self.high))

    @property
    def scale(self) -> float:
        return (math.log(self.high) - math.log(self.low)) / (2 * Z95)

    def as_dict(self) -> dict:
        return {"low": self.low, "high": self.high}


@dataclass(frozen=True)
class Priors:
    """Priors of the mixture. Defaults put the paper's ranges at the central 95% intervals."""

    diffusivity: LogNormalPrior = LogNormalPrior(0.01, 1.0)
    reaction: LogNormalPrior = LogNormalPrior(0.01, 0.1)
    weights_concentration: float = 1.0  # symmetric Dirichlet on mixture weights
    noise_median: float = 0.05  # LogNormal prior on the observation noise sd ...
    noise_log_sd: float = 1.5  # ... with this sd of log(noise)

    def as_dict(self) -> dict:
        return {"diffusivity": self.diffusivity.as_dict(), "reaction": self.reaction.as_dict(),
                "weights_concentration": self.weights_concentration, "noise_median": self.noise_median,
                "noise_log_sd": self.noise_log_sd}

    @classmethod
    def from_dict(cls, d: dict) -> "Priors":
        return cls(LogNormalPrior(**d["diffusivity"]), LogNormalPrior(**d["reaction"]),
                   d["weights_concentration"], d["noise_median"], d["noise_log_sd"])


# Default prior ranges in units of the cohort's own time scales (see ``cohort_priors``).
REACTION_TIMES = (0.1, 10.0)  # r * T at the ends of the central 95% interval of r
DIFFUSION_TIMES = (0.2, 1.0)  # D * lambda_max * T and D * lambda_2 * T at the ends of that of D


def cohort_priors(follow_up: float, slowest_rate: float, fastest_rate: float,
                  diffusivity: LogNormalPrior | None = None, reaction: LogNormalPrior | None = None) -> Priors:
    """Default priors wide enough for a cohort's own time scales.

    ``follow_up`` T: the cohort's typical follow-up (median time from first to last visit);
    ``slowest_rate`` lambda_2 and ``fastest_rate`` lambda_max: the smallest positive and the
    largest eigenvalue of the domain's Laplacian. The central 95% intervals are

    * r in [0.1 / T, 10 / T]: below, growth changes the field by a few percent over the follow-up
      (indistinguishable from none); above, it saturates within the first interval;
    * D in [0.2 / (lambda_max T), 1 / (lambda_2 T)]: below, even the finest pattern the domain
      resolves barely diffuses over the follow-up; above, diffusion equilibrates the slowest
      mode within it, so larger D cannot be told apart.

    ``diffusivity`` / ``reaction``: user priors that replace the defaults.
    """
    t = follow_up if follow_up > 0 and math.isfinite(follow_up) else 1.0
    if reaction is None:
        reaction = LogNormalPrior(REACTION_TIMES[0] / t, REACTION_TIMES[1] / t)
    if diffusivity is None:
        if not (fastest_rate > 0 and math.isfinite(fastest_rate)):  # a domain with no diffusion at all
            diffusivity = Priors().diffusivity
        else:
            low = DIFFUSION_TIMES[0] / (fastest_rate * t)
            high = DIFFUSION_TIMES[1] / (max(slowest_rate, 1e-12 * fastest_rate) * t)
            diffusivity = LogNormalPrior(low, max(high, 100.0 * low))
    return Priors(diffusivity, reaction)


def parse_prior_option(text: str) -> tuple[str, LogNormalPrior]:
    """Parse the CLI form ``name=LO,HI`` (name: diffusivity or reaction)."""
    name, _, rest = text.partition("=")
    name = name.strip()
    if name not in ("diffusivity", "reaction"):
        raise InputError(f"--prior {text!r}: name must be 'diffusivity' or 'reaction'")
    try:
        low, high = (float(v) for v in rest.split(","))
    except ValueError:
        raise InputError(f"--prior {text!r}: expected {name}=LO,HI with two numbers") from None
    return name, LogNormalPrior(low, high)

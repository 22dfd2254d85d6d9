"""The observation model's formulas, written once: the observation sd (the learned noise scale
plus a floor) and the Gaussian log densities that the model, the Laplace approximations, the
quadrature and the evidence all use. Works on floats and on tensors alike."""
from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2 * math.pi)
# The observation sd is sqrt(noise_scale^2 + NOISE_FLOOR^2). The floor stands for the solver's
# own discretisation error (about 1e-3, see physics tests); it keeps noise-free data well posed
# instead of letting the inferred noise collapse until every subtype's likelihood underflows.
NOISE_FLOOR = 1e-3


def observation_sd(noise):
    """The model's observation sd for noise scale ``noise``: sqrt(noise^2 + NOISE_FLOOR^2)."""
    return (noise ** 2 + NOISE_FLOOR ** 2) ** 0.5


def gaussian_log_likelihood(sse, n_obs, sd):
    """log N(residuals; 0, sd^2) summed over ``n_obs`` values whose squared residuals sum to ``sse``."""
    log_sd = torch.log(sd) if torch.is_tensor(sd) else math.log(sd)
    return -0.5 * sse / sd ** 2 - n_obs * (log_sd + 0.5 * LOG_2PI)


def normal_log_density(x, loc, scale):
    """log N(x; loc, scale^2), elementwise (``scale`` a tensor)."""
    return -0.5 * ((x - loc) / scale) ** 2 - torch.log(scale) - 0.5 * LOG_2PI

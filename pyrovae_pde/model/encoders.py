"""Amortized encoders: all of a subject's visits (irregular times, some missing) -> LogNormal
posterior parameters of every component's diffusivity and reaction rate.

Each visit slot contributes four input features per node (see ``visit_features``). Grids go
through a conv net (2-D or 3-D), graphs through graph convolutions over the normalised adjacency.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..physics import Domain

N_FEATURES = 4  # input features per visit slot, see visit_features


def visit_features(signal: torch.Tensor, times: torch.Tensor, observed: torch.Tensor,
                   time_scale: float) -> torch.Tensor:
    """signal (B, T, n), times (B, T), observed (B, T) -> features (B, 4T, n).

    Per visit slot: the signal, its change since the first visit (scaled up: that change is
    what carries D and r), a present flag and the scaled time; all zero at missing visits.
    """
    present = observed.to(signal.dtype)
    tau = torch.nan_to_num(times - times[:, :1], nan=0.0) / time_scale * present
    n = signal.shape[-1]
    values = signal * present[..., None]
    change = 4.0 * (signal - signal[:, :1]) * present[..., None]
    return torch.cat([values, change, present[..., None].expand(-1, -1, n), tau[..., None].expand(-1, -1, n)],
                     dim=1)


class PosteriorHead(nn.Module):
    """Maps a feature vector to LogNormal (loc, scale) of D for K components and r for K_r of them.

    Outputs are parameterised around the prior: loc = prior_loc + prior_scale * 6 tanh(raw / 6),
    so an untrained encoder proposes the prior's centre and no output leaves +-6 prior sds
    (which keeps every draw finite in float32).
    """

    def __init__(self, in_features: int, n_components: int, n_rate_components: int,
                 d_prior: tuple[float, float], r_prior: tuple[float, float], hidden: int = 256):
        super().__init__()
        self.k, self.k_rate = n_components, n_rate_components
        n_out = 2 * (n_components + n_rate_components)
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, n_out))
        self.reset_output_layer()
        prior_loc = [d_prior[0]] * n_components + [r_prior[0]] * n_rate_components
        prior_scale = [d_prior[1]] * n_components + [r_prior[1]] * n_rate_components
        self.register_buffer("prior_loc", torch.tensor(prior_loc))
        self.register_buffer("prior_scale", torch.tensor(prior_scale))

    def reset_output_layer(self) -> None:
        """Small output weights and zero biases: an untrained head proposes the prior (see forward)."""
        with torch.no_grad():
            self.net[-1].weight.mul_(0.3)
            self.net[-1].bias.zero_()

    def forward(self, features: torch.Tensor):
        """features (B, F) -> (d_loc (B, K), d_scale (B, K), r_loc (B, K_r), r_scale (B, K_r)) in log space."""
        raw = self.net(features)
        n_loc = self.k + self.k_rate
        loc = self.prior_loc + self.prior_scale * 6.0 * torch.tanh(raw[:, :n_loc] / 6.0)
        # log(scale / prior_scale) in (-9, 1), smoothly (a hard clamp would trap it at a bound).
        scale = self.prior_scale * torch.exp(-9.0 + 10.0 * torch.sigmoid(raw[:, n_loc:] + math.log(9.0)))
        return loc[:, : self.k], scale[:, : self.k], loc[:, self.k:], scale[:, self.k:]


class GridEncoder(nn.Module):
    """Conv net over a 2-D/3-D grid; visits enter as channels (4 per visit slot + the mask).

    Grids of more than ``stem_max_voxels`` voxels in their box (3-D PET) first go through a stem of
    narrow 2x2(x2) patch convolutions until at most that many remain, so that no wide activation is
    stored at full resolution (``tests/test_physics_large.py``: at 2 mm, 90 instead of 599 MB per
    subject for backward). The 2-D paper grid has no stem.
    ``stem_max_voxels=None``: no stem (runs saved before the stem existed).
    """

    STEM_MAX_VOXELS = 2 ** 12
    STEM_WIDTH = 16

    def __init__(self, domain: Domain, n_visits: int, head: PosteriorHead | None = None, width: int = 32,
                 time_scale: float = 1.0, stem_max_voxels: int | None = STEM_MAX_VOXELS, **head_kwargs):
        super().__init__()
        self.domain = domain
        self.time_scale = float(time_scale)
        ndim = domain.ndim
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        pool = nn.AdaptiveAvgPool2d if ndim == 2 else nn.AdaptiveAvgPool3d
        shape = list(domain.spatial_shape)
        channels = N_FEATURES * n_visits + 1
        layers: list[nn.Module] = []
        pad = nn.ConstantPad2d if ndim == 2 else nn.ConstantPad3d
        while stem_max_voxels is not None and math.prod(shape) > stem_max_voxels:
            # 2x2(x2) patches (padded to even sizes): each voxel read once, a quarter of a 3x3x3 kernel's work
            padding = [p for size in reversed(shape) for p in (0, size % 2)]
            layers += [pad(padding, 0.0), conv(channels, self.STEM_WIDTH, 2, stride=2),
                       nn.GroupNorm(4, self.STEM_WIDTH), nn.SiLU()]
            channels, shape = self.STEM_WIDTH, [(s + 1) // 2 for s in shape]
        layers += [conv(channels, width, 3, padding=1), nn.GroupNorm(4, width), nn.SiLU()]
        size, channels = min(shape), width
        while size > 8:
            out = min(2 * channels, 128)
            layers += [conv(channels, out, 3, stride=2, padding=1), nn.GroupNorm(4, out), nn.SiLU()]
            channels = out
            size = (size + 1) // 2
        layers += [conv(channels, channels, 3, padding=1), nn.GroupNorm(4, channels), nn.SiLU(), pool(4),
                   nn.Flatten()]
        self.body = nn.Sequential(*layers)
        mask = np.zeros(int(np.prod(domain.spatial_shape)), dtype=np.float32)
        mask[domain.active_index] = 1.0
        self.register_buffer("mask", torch.tensor(mask).reshape(1, 1, *domain.spatial_shape))
        self.head = head or PosteriorHead(channels * 4 ** ndim, **head_kwargs)

    def features(self, signal, times, observed) -> torch.Tensor:
        """signal (B, T, n_nodes), times (B, T), observed (B, T) -> the heads' input (B, F)."""
        feats = visit_features(signal, times, observed, self.time_scale)  # (B, 4T, n)
        grid = self.domain.scatter(feats)  # (B, 4T, *space)
        x = torch.cat([grid, self.mask.expand(grid.shape[0], -1, *grid.shape[2:])], dim=1)
        return self.body(x)

    def forward(self, signal, times, observed):
        """signal (B, T, n_nodes), times (B, T), observed (B, T) -> LogNormal params (see PosteriorHead)."""
        return self.head(self.features(signal, times, observed))


class GraphEncoder(nn.Module):
    """Two graph convolutions (symmetric-normalised adjacency with self loops), then an MLP."""

    def __init__(self, domain: Domain, n_visits: int, head: PosteriorHead | None = None, width: int = 32,
                 time_scale: float = 1.0, **head_kwargs):
        super().__init__()
        self.time_scale = float(time_scale)
        lap = domain.laplacian.toarray()
        adjacency = np.diag(np.diag(lap)) - lap
        adjacency = (adjacency > 0).astype(np.float32) + np.eye(lap.shape[0], dtype=np.float32)
        d = 1.0 / np.sqrt(adjacency.sum(axis=1))
        self.register_buffer("propagate", torch.tensor(d[:, None] * adjacency * d[None, :]))
        self.lin1 = nn.Linear(N_FEATURES * n_visits, width)
        self.lin2 = nn.Linear(width, width)
        n = domain.n_nodes
        self.head = head or PosteriorHead(n * width + N_FEATURES * n_visits * 2, **head_kwargs)

    def features(self, signal, times, observed) -> torch.Tensor:
        """signal (B, T, n_nodes), times (B, T), observed (B, T) -> the heads' input (B, F)."""
        feats = visit_features(signal, times, observed, self.time_scale).transpose(1, 2)  # (B, n, 4T)
        h = torch.nn.functional.silu(self.propagate @ self.lin1(feats))
        h = torch.nn.functional.silu(self.propagate @ self.lin2(h))  # (B, n, width)
        pooled = torch.cat([feats.mean(dim=1), feats.amax(dim=1)], dim=-1)  # (B, 2 * 4T)
        return torch.cat([h.flatten(1), pooled], dim=-1)

    def forward(self, signal, times, observed):
        """signal (B, T, n_nodes), times (B, T), observed (B, T) -> LogNormal params (see PosteriorHead)."""
        return self.head(self.features(signal, times, observed))


class SubtypeHead(nn.Module):
    """Encoder features (B, F) -> amortized subtype log-likelihoods (B, K), up to a per-subject constant.

    Trained by cross-entropy on simulated subjects with every component equally often
    (``inference.amortize``), so softmax(output + log w) is p(subtype | scans) under weights w.
    Zero output weights at initialisation: an untrained head says nothing (uniform).
    """

    def __init__(self, in_features: int, n_components: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, n_components))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
        with torch.no_grad():
            self.net[-1].weight.zero_()
            self.net[-1].bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)

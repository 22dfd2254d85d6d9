"""From a validated contract dataset to the domain and tensors the model consumes."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr

from ..errors import ContractError
from ..physics import Domain, GraphDomain, GridDomain
from .contract import grid_spacing


def domain_from_dataset(ds: xr.Dataset) -> Domain:
    """The ``GridDomain`` (mask + spacing from coordinates) or ``GraphDomain`` of a contract dataset."""
    if ds.attrs["domain"] == "grid":
        spacing = grid_spacing(ds)
        return GridDomain(np.asarray(ds["mask"].values), spacing)
    return GraphDomain(np.asarray(ds["adjacency"].values, dtype=float))


@dataclass
class CohortTensors:
    """A cohort on the active nodes of its domain.

    signal: (N, T, n_nodes), 0 at missing visits; times: (N, T), NaN at missing visits;
    observed: (N, T) bool, True where a visit is present.
    """

    subjects: list[str]
    signal: torch.Tensor
    times: torch.Tensor
    observed: torch.Tensor

    @property
    def n_subjects(self) -> int:
        return len(self.subjects)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "CohortTensors":
        dtype = dtype or self.signal.dtype
        return CohortTensors(self.subjects, self.signal.to(device, dtype), self.times.to(device, dtype),
                             self.observed.to(device))

    def subset(self, index: np.ndarray | torch.Tensor) -> "CohortTensors":
        index = torch.as_tensor(index, dtype=torch.long)
        return CohortTensors([self.subjects[i] for i in index.tolist()], self.signal[index],
                             self.times[index], self.observed[index])


def cohort_tensors(ds: xr.Dataset, domain: Domain, dtype: torch.dtype = torch.float32) -> CohortTensors:
    """Gather a contract dataset's signal onto the domain's active nodes."""
    signal = torch.as_tensor(np.asarray(ds["signal"].values, dtype=float))
    n, t = signal.shape[:2]
    active = domain.gather(signal.reshape(n * t, *domain.spatial_shape)).reshape(n, t, domain.n_nodes)
    times = torch.as_tensor(np.asarray(ds["time"].values, dtype=float))
    observed = ~torch.isnan(times)
    active = torch.nan_to_num(active, nan=0.0)
    return CohortTensors([str(s) for s in ds["subject"].values], active.to(dtype), times.to(dtype), observed)


def follow_up(data: CohortTensors) -> float:
    """The cohort's typical follow-up: median time from first to last visit over subjects with
    at least two visits (1.0 if none has)."""
    span = (torch.nan_to_num(data.times, nan=-math.inf).amax(dim=1) - data.times[:, 0])[data.observed.sum(1) > 1]
    return float(span.median()) if span.numel() else 1.0


def pad_visits(data: CohortTensors, n_visits: int, source: str) -> CohortTensors:
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

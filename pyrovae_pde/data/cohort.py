"""From a validated contract dataset to the domain and tensors the model consumes."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr

from ..errors import ContractError
from ..physics import Domain, GraphDomain, GridDomain
from .contract import IN_MEMORY, check_signal, grid_spacing


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
    return _on_domain(ds["signal"].values, ds["time"].values, [str(s) for s in ds["subject"].values], domain, dtype)


def _on_domain(values: np.ndarray, time: np.ndarray, subjects: list[str], domain: Domain,
               dtype: torch.dtype) -> CohortTensors:
    """Signal values (n, T, *space) and times (n, T) of ``subjects`` as tensors on the domain's active nodes."""
    signal = torch.as_tensor(np.asarray(values, dtype=float))
    n, t = signal.shape[:2]
    active = domain.gather(signal.reshape(n * t, *domain.spatial_shape)).reshape(n, t, domain.n_nodes)
    times = torch.as_tensor(np.asarray(time, dtype=float))
    observed = ~torch.isnan(times)
    active = torch.nan_to_num(active, nan=0.0)
    return CohortTensors(subjects, active.to(dtype), times.to(dtype), observed)


class LazyCohort:
    """A contract dataset whose signal is read only for the subjects asked for: opened by
    ``load_dataset(path, lazy=True)`` (and validated but for the signal's values), the signal stays
    on disk and each rank of a distributed fit or predict reads its own subjects.

    subjects (N,), times (N, T), observed (N, T): every subject's, in memory (T padded to
    ``n_visits`` if given). ``subset(index)`` reads the signal of the subjects ``index``, checks it
    against the contract (``contract.check_signal``) and returns their ``CohortTensors``
    (signal (n, T, n_nodes)); ``read_subjects`` counts the subjects read so far.
    """

    def __init__(self, ds: xr.Dataset, domain: Domain, dtype: torch.dtype = torch.float32,
                 source: str = IN_MEMORY, n_visits: int | None = None):
        self.ds, self.domain, self.dtype, self.source, self.n_visits = ds, domain, dtype, source, n_visits
        self._time = np.asarray(ds["time"].values, dtype=float)
        self.subjects = [str(s) for s in ds["subject"].values]
        times = torch.as_tensor(self._time)
        whole = CohortTensors(self.subjects, times.new_zeros((len(self.subjects), times.shape[1], 0)),
                              times.to(dtype), ~torch.isnan(times))
        if n_visits is not None:
            whole = pad_visits(whole, n_visits, source)
        self.times, self.observed = whole.times, whole.observed
        self.read_subjects = 0

    @property
    def n_subjects(self) -> int:
        return len(self.subjects)

    def subset(self, index: np.ndarray | torch.Tensor) -> CohortTensors:
        """The subjects ``index`` (positions in the file), read from it, in the order given."""
        index = np.asarray(torch.as_tensor(index, dtype=torch.long).cpu(), dtype=np.int64)
        signal = self.ds["signal"]
        unique, inverse = np.unique(index, return_inverse=True)  # the file is read in ascending order
        values = (np.asarray(signal.isel(subject=unique).values)[inverse] if len(index)
                  else np.zeros((0, *signal.shape[1:])))
        subjects = [self.subjects[i] for i in index.tolist()]
        check_signal(values, self._time[index], subjects, self.source)
        self.read_subjects += len(unique)
        data = _on_domain(values, self._time[index], subjects, self.domain, self.dtype)
        return data if self.n_visits is None else pad_visits(data, self.n_visits, self.source)


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

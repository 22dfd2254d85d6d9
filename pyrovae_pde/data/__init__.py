"""Data: the contract (schema, validator, atomic I/O), cohort tensors and simulators."""
from .cohort import CohortTensors, cohort_tensors, domain_from_dataset
from .contract import (
                       SCHEMA_VERSION,
                       ContractError,
                       atomic_write,
                       describe,
                       load_dataset,
                       load_schema,
                       save_dataset,
                       validate_dataset,
)
from .simulate import BENCHMARKS, SimulationError, simulate

__all__ = [
    "SCHEMA_VERSION", "ContractError", "atomic_write", "describe", "load_dataset", "load_schema",
    "save_dataset", "validate_dataset", "CohortTensors", "cohort_tensors", "domain_from_dataset",
    "BENCHMARKS", "SimulationError", "simulate",
]

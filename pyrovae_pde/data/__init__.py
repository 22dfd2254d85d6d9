"""Data: the contract (schema, validator, atomic I/O), cohort tensors, simulators, connectomes and regional tables."""
from .cohort import CohortTensors, LazyCohort, cohort_tensors, domain_from_dataset
from .connectomes import Connectome, available_connectomes, load_connectome
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
from .regional import cohort_to_regional_table, import_regional
from .simulate import BENCHMARKS, SimulationError, simulate

__all__ = [
    "SCHEMA_VERSION", "ContractError", "atomic_write", "describe", "load_dataset", "load_schema",
    "save_dataset", "validate_dataset", "CohortTensors", "LazyCohort", "cohort_tensors", "domain_from_dataset",
    "BENCHMARKS", "SimulationError", "simulate", "Connectome", "available_connectomes", "load_connectome",
    "cohort_to_regional_table", "import_regional",
]

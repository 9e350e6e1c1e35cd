"""Compatibility layers between megatron-prior and the megatron-core / TE it runs on."""

from megatron_prior.compat.cpu_shim import PATCHED_MODULES, TESTED_MCORE_VERSIONS
from megatron_prior.compat.cpu_shim import apply as apply_cpu_shim
from megatron_prior.compat.cpu_shim import is_applied as cpu_shim_applied
from megatron_prior.compat.no_te import apply as apply_no_te_defaults
from megatron_prior.compat.no_te import have_transformer_engine

__all__ = [
    "PATCHED_MODULES",
    "TESTED_MCORE_VERSIONS",
    "apply_cpu_shim",
    "apply_no_te_defaults",
    "cpu_shim_applied",
    "have_transformer_engine",
]

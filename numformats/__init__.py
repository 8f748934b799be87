"""Number formats: the registry (records, families, verify gates) and, in submodules, the exact grids.

Importing this package imports neither torch nor the gguf package: `grids` (torch) and `ggufpack`
(gguf) are imported by name where their numerics are needed.
"""

from shrink.numformats.registry import (ALIASES, PROFILE_RUNTIMES, COMPUTE_CLASSES, FALLBACK, FAMILIES, FORMATS, RUNTIMES,
                                        UNQUANTIZED, UPCAST, Family, Gate, NumberFormat, fallback_chain,
                                        family_hint, fitting_format, format_by_gguf_type, gate_for, gguf_activations, get_format,
                                        matmul_compute_class, mixture_name, resolve_weights, runtime_families, runtime_for, stored_format,
                                        vocabulary_format, wilson_interval)

__all__ = ["ALIASES", "COMPUTE_CLASSES", "FALLBACK", "FAMILIES", "FORMATS", "RUNTIMES", "UNQUANTIZED", "UPCAST", "PROFILE_RUNTIMES",
           "Family", "Gate", "NumberFormat", "fallback_chain", "family_hint", "fitting_format", "format_by_gguf_type", "gate_for", "gguf_activations",
           "get_format", "matmul_compute_class", "mixture_name", "resolve_weights", "runtime_families", "runtime_for", "stored_format",
           "vocabulary_format", "wilson_interval"]

"""One backend per artifact kind (GGUF, ONNX): it exports, opens a runner, times, generates and says
what it stores (for the roofline: `artifact_costing`). Everything else asks the registry by name (`backend("gguf")`) or by path
(`backend_for(path)`), so adding a kind is one class and one line here."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

from shrink.archspec import ArchSpec, Formats
from shrink.errors import ShrinkError
from shrink.export.costing import fallback_ops, planned_weights
from shrink.export.gguf_backend import GGUFBackend
from shrink.export.manifest import manifest_path, read_manifest
from shrink.export.onnx_backend import OnnxBackend
from shrink.export.runtimes import Runner


class Backend(Protocol):
    kind: str  # `shrink export --format` name
    runtime: str  # the runtime that executes it, as reports name it
    default_quant: str  # `--quant` when none is given and the model brings no grid of its own

    def matches(self, path: Path) -> bool: ...

    def artifact_in(self, folder: Path) -> Path: ...

    def export(self, loaded: Any, output: Path, quant: str | None = None, *, pad_to_uniform: bool = False,
               block_size: int | None = None, logits: str | None = None) -> dict: ...

    def check_quant(self, quant: str | None, block_size: int | None = None) -> None:
        """Refuse a weight type (and block size) this kind cannot store, before any model loads."""
        ...

    def open_runner(self, path: Path, max_tokens: int, threads: int | None = None) -> Runner: ...

    def time(self, path: Path, threads: int, prompt: list[int], gen: list[int],
             repeats: int) -> tuple[list[float], list[float]]: ...

    def generate(self, path: Path, prompt: str, max_tokens: int, threads: int | None) -> tuple[str, int, float]: ...

    def tokenizer(self, path: Path) -> AbstractContextManager[Callable[[str], list[int]] | None]: ...

    def stored_formats(self, path: Path, spec: ArchSpec) -> tuple[ArchSpec, Formats]: ...

    def stored_quant(self, path: Path) -> str: ...

    def costed_spec(self, spec: ArchSpec, family: str | None, lm_head_kept: bool = True) -> ArchSpec: ...


BACKENDS: dict[str, Backend] = {b.kind: b for b in (GGUFBackend(), OnnxBackend())}
FORMATS = tuple(BACKENDS)


def backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ShrinkError(f"Unknown export format '{name}'; choose one of: {', '.join(FORMATS)}.")
    return BACKENDS[name]


def runtime_of(kind: str) -> str:
    """The runtime that executes an artifact kind ('gguf' -> 'llama.cpp'); another name is its own."""
    return BACKENDS[kind].runtime if kind in BACKENDS else kind


def backend_for(path: str | Path) -> Backend:
    """The backend of an artifact on disk: a .gguf file or a directory holding model.onnx."""
    path = Path(path)
    for candidate in BACKENDS.values():
        if candidate.matches(path):
            return candidate
    if not path.exists():
        raise ShrinkError(f"Artifact '{path}' does not exist.")
    raise ShrinkError(f"'{path}' is neither a .gguf file nor a directory holding model.onnx.")


def artifact_costing(artifact: str | Path) -> tuple[ArchSpec | None, dict]:
    """The artifact's ArchSpec (from its manifest) and the formats its file stores, read from the file
    itself, so that the roofline costs the bytes its runtime reads (an untied lm_head copy included)."""
    artifact = Path(artifact)
    own = manifest_path(artifact)
    manifest = read_manifest(own) if own.is_file() else None
    if manifest is None:
        return None, {}
    spec, stored = backend_for(artifact).stored_formats(artifact, ArchSpec.from_dict(manifest["archspec"]))
    return spec, {k: v for k, v in asdict(stored).items() if k != "ssm_state"}


def costed_spec(spec: ArchSpec, family: str | None, runtime: str, *, lm_head_kept: bool = True) -> ArchSpec:
    """`spec` in the formats an export of `family` (or of one stored format) to `runtime` stores: that
    backend's rule; PyTorch (no artifact) stores the family's grid in place of the weights."""
    if runtime in BACKENDS:
        return BACKENDS[runtime].costed_spec(spec, family, lm_head_kept)
    weights = planned_weights(family, runtime)
    return spec.with_formats(weights=weights.name, ops=fallback_ops(spec, weights))

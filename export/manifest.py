"""The manifest written beside every artifact: what it was made from, how, and how it verified.

`<file>.manifest.json` beside a GGUF, `manifest.json` inside an ONNX directory. Its sha256 of every
artifact file lets `shrink verify` detect tampering or corruption before running anything.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from shrink import __version__
from shrink.errors import ShrinkError
from shrink.storage import atomic_write_text

MANIFEST_NAME = "manifest.json"
_TOOLS = ("torch", "transformers", "gguf", "llama_cpp_python", "onnx", "onnxruntime", "onnxscript", "numpy")


def manifest_path(artifact: Path) -> Path:
    return artifact / MANIFEST_NAME if artifact.is_dir() else artifact.with_name(artifact.name + ".manifest.json")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def artifact_files(artifact: Path) -> dict[str, dict[str, Any]]:
    paths = [artifact] if artifact.is_file() else sorted(p for p in artifact.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    root = artifact.parent if artifact.is_file() else artifact
    return {str(p.relative_to(root)): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in paths}


def tool_versions() -> dict[str, str]:
    versions = {"shrink": __version__, "python": platform.python_version()}
    for dist in _TOOLS:
        try:
            versions[dist] = metadata.version(dist.replace("_", "-"))
        except metadata.PackageNotFoundError:
            pass
    return versions


def write_manifest(artifact: Path, *, source: str, source_hash: str, spec: Any, export: dict, verify: dict | None) -> Path:
    data = {
        "shrink_manifest": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "artifact": artifact.name,
        "source": {"model": source, "weights_sha256": source_hash},
        "archspec": spec.to_dict(),
        "export": export,
        "tools": tool_versions(),
        "files": artifact_files(artifact),
        "verify": verify,
    }
    path = manifest_path(artifact)
    atomic_write_text(path, json.dumps(data, indent=2))
    return path


def read_manifest(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShrinkError(f"Manifest '{path}' does not exist.") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShrinkError(f"Manifest '{path}' is not readable JSON ({err}).") from None
    if not isinstance(data, dict) or "files" not in data:
        raise ShrinkError(f"'{path}' is not a shrink manifest (it has no 'files').")
    return data


def hash_mismatches(artifact: Path, manifest: dict) -> list[str]:
    """Files whose sha256 or presence differs from the manifest's record."""
    recorded = manifest["files"]
    actual = artifact_files(artifact)
    if artifact.is_file() and len(recorded) == 1:  # a renamed single-file artifact is still itself
        (name, entry), = recorded.items()
        return [] if entry["sha256"] == actual[artifact.name]["sha256"] else [f"{artifact.name}: sha256 differs from {name}'s"]
    problems = [f"{name}: missing" for name in recorded if name not in actual]
    problems += [f"{name}: sha256 differs" for name in recorded if name in actual and actual[name]["sha256"] != recorded[name]["sha256"]]
    problems += [f"{name}: not in the manifest" for name in actual if name not in recorded]
    return problems

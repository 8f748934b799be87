"""The readers a user can feed (profile and recipe TOML, ArchSpec JSON, manifests, GGUF and safetensors
headers, .txt, .jsonl and .parquet data files), each behind one call, and hypothesis strategies that mutate a valid input
of each: shared by tests/test_fuzz.py (a few hundred cases) and benchmarks/fuzz_readers.py (10,000 each).

A reader passes a case when it returns or raises ShrinkError with one sentence; anything else (a
traceback from inside the reader) is a finding.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

PROFILE = '''name = "board"
title = "A board"
kind = "cpu"
runtimes = ["llama.cpp"]
[memory]
bandwidth_GBps = 50.0
capacity_GB = 16
source = "manual"
[compute]
fp32 = 1.0
int8 = 4.0
source = "sheet"
[efficiency]
bandwidth = 0.7
compute = 0.5
reasoning = "measured once"
'''
RECIPE = '''description = "fuzz"

[[step]]
name = "prune"
params = 0.6
axis = "width"

[[step]]
name = "quantize"
format = "int4"

[[step]]
name = "verify"
max_kl = 0.5
'''
ARCHSPEC = {"family": "llama", "vocab_size": 64, "hidden_size": 32, "tied_embeddings": False, "layers": [
    {"mixer": {"kind": "attention", "num_heads": 4, "num_kv_heads": 2, "head_dim": 8},
     "ffn": {"width": 48}, "norms": 2}],
    "formats": {"weights": "q4_0", "embeddings": "q8_0", "ops": [["ffn.down", "q8_0"]]}}
MANIFEST = {"format": 1, "source": {"model": "gemma-3-270m"}, "files": {"model.gguf": "0" * 64},
            "export": {"quant": "q8_0"}, "verify": {"metrics": {"top1_agreement": 0.97, "mean_kl": 0.003}}}


def read_profile(path: Path) -> object:
    from shrink.hardware.profiles import load_profile_file

    return load_profile_file(path)


def read_recipe(path: Path) -> object:
    from shrink.flows.recipe import parse_recipe

    return parse_recipe(path)


def read_archspec(path: Path) -> object:
    from shrink.model import load_spec

    return load_spec(str(path))


def read_manifest(path: Path) -> object:
    from shrink.export.manifest import read_manifest as read

    return read(path)


def read_gguf(path: Path) -> object:
    from shrink.ggufmeta import gguf_formats

    return gguf_formats(path)


def read_safetensors(path: Path) -> object:
    """A Hugging Face directory whose model.safetensors is the case, beside a valid config.json."""
    from shrink.model import load

    (path.parent / "config.json").write_text(SEEDS["config.json"])
    return load(str(path.parent))


def read_data(path: Path) -> object:
    from shrink.compress.data import read_texts

    return read_texts(str(path))


def _mutated_text(seed: str) -> st.SearchStrategy[str]:
    """The valid text with a slice replaced, cut short, or a line duplicated or dropped."""
    lines = seed.splitlines(keepends=True)

    @st.composite
    def mutate(draw) -> str:
        kind = draw(st.sampled_from(["replace", "truncate", "duplicate", "drop", "junk"]))
        if kind == "truncate":
            return seed[: draw(st.integers(0, len(seed)))]
        if kind in ("duplicate", "drop"):
            i = draw(st.integers(0, len(lines) - 1))
            return "".join(lines[:i] + ([lines[i]] * 2 if kind == "duplicate" else []) + lines[i + 1:])
        if kind == "junk":
            return draw(st.text(max_size=200))
        start = draw(st.integers(0, len(seed)))
        end = draw(st.integers(start, min(len(seed), start + 20)))
        return seed[:start] + draw(st.text(max_size=20)) + seed[end:]

    return mutate()


def _mutated_json(seed: dict) -> st.SearchStrategy[str]:
    """Valid JSON of the wrong shapes (values swapped for other JSON) and broken JSON text."""
    values = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats() | st.text(max_size=8),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                          max_leaves=6)

    @st.composite
    def reshaped(draw) -> str:
        data = json.loads(json.dumps(seed))
        node = data
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else list(range(len(node)))))
            if not isinstance(node[key], (dict, list)) or draw(st.booleans()):
                node[key] = draw(values)
                break
            node = node[key]
        return json.dumps(data, allow_nan=True)

    return reshaped() | _mutated_text(json.dumps(seed, indent=1))


def _mutated_bytes(seed: bytes) -> st.SearchStrategy[bytes]:
    """The valid file with bytes flipped in its header, cut short, or random bytes after the magic."""

    @st.composite
    def mutate(draw) -> bytes:
        kind = draw(st.sampled_from(["flip", "truncate", "random"]))
        if kind == "truncate":
            return seed[: draw(st.integers(0, min(len(seed), 4096)))]
        if kind == "random":
            return seed[:4] + draw(st.binary(max_size=512))
        data = bytearray(seed)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, min(len(data), 2048) - 1))] = draw(st.integers(0, 255))
        return bytes(data)

    return mutate()


def readers() -> dict[str, tuple[object, st.SearchStrategy, str]]:
    """name -> (reader, strategy of file contents, file name)."""
    seeds = tiny_seeds()
    return {
        "profile TOML": (read_profile, _mutated_text(PROFILE), "board.toml"),
        "recipe TOML": (read_recipe, _mutated_text(RECIPE), "recipe.toml"),
        "ArchSpec JSON": (read_archspec, _mutated_json(ARCHSPEC), "spec.json"),
        "manifest JSON": (read_manifest, _mutated_json(MANIFEST), "manifest.json"),
        "GGUF header": (read_gguf, _mutated_bytes(seeds["model.gguf"]), "model.gguf"),
        "safetensors header": (read_safetensors, _mutated_bytes(seeds["model.safetensors"]), "model.safetensors"),
        "data .txt": (read_data, _mutated_text(TEXT) | st.binary(max_size=300), "data.txt"),
        "data .jsonl": (read_data, _mutated_text(JSONL), "data.jsonl"),
        "data .parquet": (read_data, _mutated_bytes(seeds["data.parquet"]), "data.parquet"),
    }


TEXT = "The first document.\n\nThe second one, with a second line\nhere.\n\n\nA third.\n"
JSONL = '{"text": "one document"}\n{"text": "another", "id": 2}\n\n{"text": "a third \\u00e9"}\n'
SEEDS: dict[str, Any] = {}  # file name -> content of the valid files the byte strategies mutate


def tiny_seeds() -> dict[str, Any]:
    """Small valid files, made once: a tiny random Llama as a Q8_0 GGUF and as a Hugging Face directory
    (its model.safetensors and config.json), and a Parquet file of texts."""
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    from tiny_models import build

    from shrink.export.gguf import export_gguf
    from shrink.families import spec_from_model
    from shrink.model import LoadedModel, save

    if SEEDS:
        return SEEDS
    model = build("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1, vocab_size=64)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tiny.gguf"
        export_gguf(LoadedModel(model, None, spec_from_model(model), "tiny"), path, "q8_0")
        SEEDS["model.gguf"] = path.read_bytes()
        saved = save(model, Path(folder) / "hf")
        SEEDS["model.safetensors"] = (saved / "model.safetensors").read_bytes()
        SEEDS["config.json"] = (saved / "config.json").read_text()
        pq.write_table(pa.table({"text": ["one document", "another one", None, "a third"]}), Path(folder) / "d.parquet")
        SEEDS["data.parquet"] = (Path(folder) / "d.parquet").read_bytes()
    return SEEDS


def one_case(reader, content: str | bytes, path: Path) -> str | None:
    """None when the reader returned or raised a one-sentence ShrinkError, else the finding."""
    import logging

    from shrink.errors import ShrinkError

    logging.getLogger("transformers").setLevel(logging.ERROR)  # its warnings about a damaged file are not findings

    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    try:
        reader(path)
    except ShrinkError as err:
        text = str(err)
        if not text or "\n" in text.strip():
            return f"ShrinkError that is not one sentence: {text!r}"
    except Exception as err:  # noqa: BLE001 — what the fuzzer is looking for
        return f"{type(err).__name__}: {err}"
    return None

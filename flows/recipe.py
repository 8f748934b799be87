"""Recipes: an ordered list of typed steps (prune, trim-vocab, distill, quantize, gguf-quantize, export,
verify, bench) written in TOML.

    [[step]]
    name = "prune"
    params = 0.6

    [[step]]
    name = "distill"
    tokens = 12288

The bench step times the exported artifact on this machine. Each step's keys are the fields of its config dataclass below; an unknown step name, an unknown key or
a value of the wrong type is an error that names the file and the line. The same steps are callable
from Python: `parse_recipe(path)` gives [(name, config)] and `STEPS` maps names to config classes.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from shrink.errors import ShrinkError
from shrink.typecheck import accepts
from shrink.flows import defaults


@dataclass(frozen=True)
class PruneStep:
    params: float | None = None  # fraction of the non-embedding parameters to keep
    ffn: int | None = None
    heads: int | None = None
    hidden: int | None = None
    layers: int | None = None
    axis: str = defaults.PRUNE_AXIS
    search: bool = False


@dataclass(frozen=True)
class TrimVocabStep:
    """Vocabulary trimming (flows/vocab.py): the tokens the run's text uses; later steps tokenize with the
    trimmed tokenizer and read the teacher over the kept tokens. Follow it with a distill step."""
    vocab: int | None = None  # tokens to keep in all
    coverage: float | None = None  # or: the share of the calibration tokens the kept tokens cover


@dataclass(frozen=True)
class PuzzleStep:
    """A per-layer choice of block variants (flows/puzzle.py) under the run's target and budget, or
    under these; follow it with a distill step (global distillation of the assembled model)."""
    target: str | None = None  # None: the run's --target
    budget: str | None = None  # time per output token, e.g. "3ms"; None: the run's budget
    weights: str | None = None  # the format the blocks are costed in; None: the model's own
    bld_steps: int = 60
    # the artifact the child becomes (gguf, onnx): only variants its runtime runs, costed as that export
    # stores them (weights then names a quantization family, as the planner writes it); None: any variant
    export: str | None = None
    work: str | None = None  # where trained variants and scores are kept (the planner's); None: beside the step's output


@dataclass(frozen=True)
class KVShareStep:
    """Cross-layer KV sharing (flows/kvshare.py); follow it with a distill step to recover."""
    groups: str = ""  # "0-1,2-3": the layers that share (the first owns the cache); empty: chosen
    pairs: int | None = None  # with groups empty: how many pairs share, the most alike first; None: all that fit
    init: str = "mean"  # mean: the owner's K/V projections start as the group's mean (AcrossKV); owner: its own


@dataclass(frozen=True)
class SingleInputKVStep:
    """SwiftKV's SingleInputKV and its first training stage (flows/swiftkv.py); a distill step after it
    is SwiftKV's second stage."""
    k: int | None = None  # layers from k on take K/V from a norm of layer k's input; None: half the layers
    tokens: int = defaults.DISTILL_TOKENS  # stage one's budget (new norm, Q/K/V from layer k on); 0: untrained
    lr: float = defaults.DISTILL_LR
    queries: bool = True  # stage one trains the query projections of the layers from k on too, as SwiftKV does


@dataclass(frozen=True)
class DistillStep:
    tokens: int = defaults.DISTILL_TOKENS
    lr: float = defaults.DISTILL_LR
    loss: str = defaults.DISTILL_LOSS
    batch_size: int = defaults.BATCH_SIZE


@dataclass(frozen=True)
class QuantizeStep:
    format: str = defaults.QUANT_FORMAT
    runtime: str = defaults.QUANT_RUNTIME
    calibration: str = defaults.CALIBRATION
    qad: bool = False
    tokens: int = defaults.QAD_TOKENS
    lr: float | None = None  # None: the grid's default (compress/quant/run.py: qad_lr)


@dataclass(frozen=True)
class GGUFQuantizeStep:
    """llama.cpp's own quantizer on the model (flows/gguf_search.py): a file type, shrink's importance
    matrix, per-tensor overrides; writes the GGUF artifact itself (no export step needed)."""
    file_type: str = "auto"  # Q4_K_M, IQ4_XS, ...; auto: every candidate measured, the best KL within --budget
    overrides: str = ""  # tensor=format,... on top of the file type (token_embd.weight=q4_0)
    imatrix: bool = True  # weigh the rounding by shrink's importance matrix from the calibration text


@dataclass(frozen=True)
class ExportStep:
    format: str = defaults.EXPORT_FORMAT
    quant: str | None = None  # for an unquantized model; a quantized student brings its own grid


@dataclass(frozen=True)
class VerifyStep:
    min_top1: float | None = None  # against the original; None with max_kl None: reported, not gated
    max_kl: float | None = None
    reason: str | None = None  # where the bounds come from (a planned run: the format registry's gate)


@dataclass(frozen=True)
class BenchStep:
    threads: int | None = None  # default: every core
    prompt_len: int = defaults.BENCH_PROMPT_LEN
    gen_len: int = defaults.BENCH_GEN_LEN
    repeats: int = defaults.BENCH_REPEATS


STEPS: dict[str, type] = {"prune": PruneStep, "trim-vocab": TrimVocabStep, "puzzle": PuzzleStep, "kv-share": KVShareStep,
                          "single-input-kv": SingleInputKVStep, "distill": DistillStep, "quantize": QuantizeStep,
                          "gguf-quantize": GGUFQuantizeStep, "export": ExportStep, "verify": VerifyStep,
                          "bench": BenchStep}


def step_to_dict(name: str, config: Any) -> dict[str, Any]:
    """A step as a TOML table would give it (defaults included), for reports and recipe files."""
    return {"name": name, **asdict(config)}


def recipe_toml(steps: list[tuple[str, Any]], description: str) -> str:
    """The TOML text of a recipe (what the planner writes into the run directory)."""
    lines = [f"description = {_toml_value(description)}"]
    for name, config in steps:
        lines += ["", "[[step]]"] + [f"{key} = {_toml_value(value)}" for key, value in step_to_dict(name, config).items()
                                     if value is not None]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _line_of(lines: list[str], step_index: int, key: str | None = None) -> int:
    """1-based line of the step's [[step]] header, or of `key` inside that step's table."""
    headers = [i for i, line in enumerate(lines) if re.match(r"\s*\[\[\s*step\s*\]\]", line)]
    start = headers[step_index] if step_index < len(headers) else 0
    if key is None:
        return start + 1
    end = headers[step_index + 1] if step_index + 1 < len(headers) else len(lines)
    for i in range(start, end):
        if re.match(rf"\s*{re.escape(key)}\s*=", lines[i]):
            return i + 1
    return start + 1


def parse_recipe(path: str | Path) -> list[tuple[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise ShrinkError(f"No recipe at '{path}'.")
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ShrinkError(f"{path}: not valid TOML ({err}).") from None
    unknown_top = set(data) - {"step", "description"}
    lines = text.splitlines()
    if unknown_top:
        key = sorted(unknown_top)[0]
        line = next((i + 1 for i, text_line in enumerate(lines) if re.match(rf"\s*\[?{re.escape(key)}\b", text_line)), 1)
        raise ShrinkError(f"{path}:{line}: unknown top-level key '{key}'; a recipe holds [[step]] tables.")
    steps = data.get("step", [])
    if not steps:
        raise ShrinkError(f"{path}: the recipe has no [[step]] tables.")
    if not isinstance(steps, list) or not all(isinstance(table, dict) for table in steps):
        raise ShrinkError(f"{path}: 'step' must be [[step]] tables, one per step.")
    parsed = []
    for index, table in enumerate(steps):
        name = table.get("name")
        if not isinstance(name, str) or name not in STEPS:
            raise ShrinkError(f"{path}:{_line_of(lines, index, 'name')}: unknown step '{name}'; steps: {', '.join(STEPS)}.")
        config_class = STEPS[name]
        known = {f.name: f for f in fields(config_class)}
        for key, value in table.items():
            if key == "name":
                continue
            if key not in known:
                raise ShrinkError(f"{path}:{_line_of(lines, index, key)}: step '{name}' has no key '{key}'; "
                                  f"its keys: {', '.join(known)}.")
            if not accepts(value, str(known[key].type)):
                raise ShrinkError(f"{path}:{_line_of(lines, index, key)}: '{key}' of step '{name}' must be "
                                  f"{known[key].type}, not {value!r}.")
        parsed.append((name, config_class(**{k: v for k, v in table.items() if k != "name"})))
    return parsed


def shipped_recipes() -> dict[str, Path]:
    folder = Path(__file__).resolve().parent.parent / "recipes"
    return {p.stem: p for p in sorted(folder.glob("*.toml"))}

"""Calibration, training and evaluation text: from files, a Hugging Face dataset, or the teacher itself.

Sources (`--data`):
- a .txt file (documents separated by blank lines), a .jsonl file (one object per line, a text
  field), a .parquet file (a text column);
- a Hugging Face dataset name, through `datasets` (needs the network, or the local HF cache);
- nothing: the teacher writes its own corpus from varied seed prompts (data-free distillation, as
  in LLM-QAT), sampled once, cached on disk keyed by the teacher's weights and the settings.

Texts are tokenized, joined with EOS and packed into fixed-length sequences, then split into
calibration / train / held-out evaluation by a seeded permutation, so every run on the same input
sees the same split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shrink.errors import ShrinkError
from shrink.model import weights_hash
from shrink.progress import ProgressLines
from shrink.storage import atomic_write_text, cache_dir

log = logging.getLogger("shrink")

# Varied on purpose (facts, instructions, code, numbers, dialogue, stories, other languages): the
# teacher's continuations of these cover more of its behaviour than any one register would.
SEED_PROMPTS = [
    "The history of the printing press", "Here is a recipe for a simple tomato soup:", "def merge_sort(items):",
    "Dear hiring manager,", "The three laws of thermodynamics state that", "Once upon a time, in a village by the sea,",
    "Q: What causes the seasons on Earth?\nA:", "SELECT name, COUNT(*) FROM orders", "The stock market today",
    "In 1969, the Apollo 11 mission", "Photosynthesis is the process by which", "A haiku about autumn:",
    "The quarterly report shows revenue of", "User: Can you help me plan a trip to Japan?\nAssistant:",
    "Les avantages du vélo en ville sont", "Die wichtigsten Erfindungen des 20. Jahrhunderts", "import numpy as np\n",
    "The main differences between TCP and UDP are", "Instructions: assemble the shelf by", "Breaking news:",
    "The theorem states that for every prime number", "My favourite childhood memory is", "Chapter 1\n\nThe rain had",
    "To install the package, run", "El cambio climático afecta", "A good night's sleep helps", "The patient presented with",
    "function fetchData(url) {", "Top 10 tips for learning a language:", "The court ruled that",
]


@dataclass(frozen=True)
class DataSplit:
    calibration: Any  # LongTensor [n, seq_len]
    train: Any
    evaluation: Any
    source: str

    def sizes(self) -> dict[str, int]:
        return {name: int(getattr(self, name).shape[0]) for name in ("calibration", "train", "evaluation")}


@dataclass(frozen=True)
class GenerationSettings:
    prompts: int = 4 * len(SEED_PROMPTS)  # each seed prompt sampled four times
    new_tokens: int = 192
    batch: int = 24  # prompts sampled together (left-padded): decode reads the weights once per step
    temperature: float = 1.0
    top_k: int = 50  # what transformers samples with by default; made explicit so the sampler below is cheap
    top_p: float = 0.95
    seed: int = 0


def read_texts(source: str, text_field: str = "text") -> list[str]:
    """Documents from a file or a Hugging Face dataset name."""
    path = local_file(source)
    if path is not None:
        if path.suffix == ".txt":
            texts = [block.strip() for block in _utf8(path).split("\n\n")]
        elif path.suffix == ".jsonl":
            texts = _read_jsonl(path, text_field)
        else:
            texts = _read_parquet(path, text_field)
    else:
        texts = _read_hub_dataset(source, text_field)
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ShrinkError(f"'{source}' holds no text.")
    return texts


def local_file(source: str) -> Path | None:
    """The data file `source` names, checked to exist and be of a kind read here, or None for a Hugging
    Face dataset name: commands call it before loading a model, so a typo costs no minutes."""
    path = Path(source)
    if path.suffix not in (".txt", ".jsonl", ".parquet") and not path.exists():
        return None
    if not path.is_file():
        raise ShrinkError(f"Data file '{path}' does not exist.")
    if path.suffix not in (".txt", ".jsonl", ".parquet"):
        raise ShrinkError(f"Data file '{path}' must be .txt, .jsonl or .parquet.")
    return path


def _utf8(path: Path) -> str:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ShrinkError(f"'{path}' is not UTF-8 text (byte {err.start} cannot be decoded); save it as UTF-8.") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as read_text reads them


def _read_jsonl(path: Path, field: str) -> list[str]:
    texts = []
    for number, line in enumerate(_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ShrinkError(f"'{path}' line {number} is not JSON ({err.msg}).") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise ShrinkError(f"'{path}' line {number} has no string field '{field}' (choose one with --text-field).")
        texts.append(record[field])
    return texts


def _read_parquet(path: Path, field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ShrinkError("Reading Parquet needs pyarrow: pip install pyarrow.") from None
    try:
        values = pq.read_table(path, columns=[field]).column(field).to_pylist()  # decoding strings can fail too
    except Exception as err:  # pyarrow raises several types for bad files and missing columns
        raise ShrinkError(f"Could not read column '{field}' from '{path}' ({(str(err).splitlines() or [type(err).__name__])[0]}).") from None
    return [str(value) for value in values if value is not None]


def _read_hub_dataset(name: str, field: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise ShrinkError(f"'{name}' is not a file, and loading Hugging Face datasets needs `pip install datasets`.") from None
    try:
        dataset = datasets.load_dataset(name, split="train")
    except Exception as err:  # offline, unknown name, gated: all end the same way for the user
        raise ShrinkError(f"Could not load the Hugging Face dataset '{name}' ({str(err).splitlines()[0][:160]}); "
                          "offline, pass a .txt/.jsonl/.parquet file or omit --data to let the teacher write its own.") from None
    if field not in dataset.column_names:
        raise ShrinkError(f"Dataset '{name}' has no column '{field}'; columns: {', '.join(dataset.column_names)}.")
    return list(dataset[field])


def teacher_texts(loaded: Any, settings: GenerationSettings = GenerationSettings()) -> list[str]:
    """The teacher's own continuations of the seed prompts, cached by weights and settings."""
    if loaded.tokenizer is None:
        raise ShrinkError("The teacher has no tokenizer, so it cannot write its own data; pass --data.")
    key = hashlib.sha256((weights_hash(loaded.model) + json.dumps(asdict(settings), sort_keys=True)).encode()).hexdigest()[:24]
    path = cache_dir("data") / f"teacher-{key}.jsonl"
    if path.is_file():
        return _read_jsonl(path, "text")
    texts = _sample(loaded, settings)
    atomic_write_text(path, "".join(json.dumps({"text": t}) + "\n" for t in texts))
    log.info("Teacher-written corpus cached in %s", path)
    return texts


class _TopKTopP:
    """Temperature, then top-k, then top-p inside the k: what transformers' warpers do, but top-p sorts
    k values instead of the whole vocabulary (262,144 per row for Gemma: about a third of each
    sampling step on 2 cores)."""

    def __init__(self, settings: GenerationSettings) -> None:
        self.settings = settings

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        values, indices = (scores / self.settings.temperature).topk(self.settings.top_k, dim=-1)  # sorted, largest first
        probs = values.softmax(-1)
        beyond = probs.cumsum(-1) - probs > self.settings.top_p  # the mass before it already reaches top_p
        filtered = torch.full_like(scores, float("-inf"))
        return filtered.scatter_(-1, indices, values.masked_fill(beyond, float("-inf")))


class _StepLines:
    """Called by generate at every decoding step (as a stopping criterion that never stops), counting
    the steps on `lines` with the tokens per second they make."""

    def __init__(self, lines: ProgressLines) -> None:
        self.lines = lines

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
        elapsed = time.perf_counter() - self.lines.started
        tokens = (self.lines.here + 1) * input_ids.shape[0]
        self.lines.advance(1, f"{tokens / elapsed:.0f} tokens/s" if elapsed > 0 else "")
        return False


def _sample(loaded: Any, settings: GenerationSettings) -> list[str]:
    import torch
    from rich.progress import Progress

    tokenizer, model = loaded.tokenizer, loaded.model
    prompts = [SEED_PROMPTS[i % len(SEED_PROMPTS)] for i in range(settings.prompts)]
    torch.manual_seed(settings.seed)
    texts = []
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues at the right edge
    pad_token = tokenizer.pad_token
    if pad_token is None:  # Llama 3 ships none: pad the prompts with EOS (masked out, never generated from)
        tokenizer.pad_token = tokenizer.eos_token
    pad = tokenizer.pad_token_id
    batches = -(-len(prompts) // settings.batch)
    lines = ProgressLines("teacher writing calibration text", batches * settings.new_tokens, "step")
    try:
        with Progress(transient=True) as progress, torch.no_grad(), lines:
            task = progress.add_task("teacher writing calibration text", total=len(prompts))
            for start in range(0, len(prompts), settings.batch):
                chunk = prompts[start:start + settings.batch]
                batch = tokenizer(chunk, return_tensors="pt", padding=True)
                out = model.generate(**batch, max_new_tokens=settings.new_tokens, do_sample=True, pad_token_id=pad,
                                     temperature=1.0, top_k=0, top_p=1.0,  # transformers' own warpers off:
                                     logits_processor=[_TopKTopP(settings)],  # the same filter, cheaper
                                     stopping_criteria=[_StepLines(lines)] if lines.enabled else None)
                texts += tokenizer.batch_decode(out, skip_special_tokens=True)
                progress.advance(task, len(chunk))
    finally:
        tokenizer.padding_side, tokenizer.pad_token = padding_side, pad_token
    return texts


def pack(token_lists: list[list[int]], seq_len: int, separator: int | None) -> Any:
    """Concatenate documents (separated by `separator`) and cut into full sequences of seq_len."""
    import torch

    if seq_len < 2:
        raise ShrinkError(f"Sequence length must be at least 2, got {seq_len}.")
    stream: list[int] = []
    for tokens in token_lists:
        stream.extend(tokens)
        if separator is not None:
            stream.append(separator)
    count = len(stream) // seq_len
    if count == 0:
        raise ShrinkError(f"The data holds {len(stream)} tokens, fewer than one sequence of {seq_len}.")
    return torch.tensor(stream[: count * seq_len], dtype=torch.long).view(count, seq_len)


def split(sequences: Any, fractions: tuple[float, float, float] = (0.25, 0.5, 0.25), seed: int = 0,
          source: str = "") -> DataSplit:
    """Seeded, deterministic calibration / train / evaluation split (every part gets at least one)."""
    import torch

    n = int(sequences.shape[0])
    if n < 3:
        raise ShrinkError(f"Only {n} packed sequence(s): need at least 3 for calibration, train and evaluation.")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    calib = max(1, round(n * fractions[0] / sum(fractions)))
    evaluation = max(1, round(n * fractions[2] / sum(fractions)))
    train = n - calib - evaluation
    if train < 1:
        calib, train = calib - 1, 1
    index = torch.tensor(order)
    return DataSplit(sequences[index[:calib]], sequences[index[calib:calib + train]],
                     sequences[index[calib + train:]], source)


def prepare(loaded: Any, data: str | None = None, seq_len: int = 256, text_field: str = "text", seed: int = 0,
            settings: GenerationSettings = GenerationSettings(), tokenizer: Any = None) -> DataSplit:
    """Texts from `data` (or the teacher), tokenized with the model's tokenizer (or `tokenizer`: a
    student's trimmed vocabulary, compress/vocab.py), packed and split."""
    tokenizer = tokenizer or loaded.tokenizer
    if tokenizer is None:
        raise ShrinkError("The model has no tokenizer, so text cannot be turned into tokens for it.")
    texts = read_texts(data, text_field) if data else teacher_texts(loaded, settings)
    tokens = [tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    sequences = pack(tokens, seq_len, tokenizer.eos_token_id)
    return split(sequences, seed=seed, source=data or "teacher-generated")

"""Quantizing to GGUF by measurement: llama.cpp's own file types beside shrink's mixtures, the best
KL to the original within the budget wins.

What a llama.cpp user does without shrink is run `llama-quantize` with a file type (Q4_K_M, IQ4_XS,
...) and, often, an importance matrix. Every such output is a candidate here, made by llama.cpp's own
quantizer (export/llamacpp_quantize.py) with and without shrink's importance matrix. Beside them,
shrink's mixtures: a file type for the blocks with the vocabulary tensors on another type (on a small
model the 262,144-row output projection is most of the time per token, and llama.cpp's file types
keep it on 6-8 bits). Each candidate is measured: its KL to the original on held-out text, and its
time per token (measured here on `host`, else the roofline on the target from the types the file
stores). Mixtures are proposed by an additive prediction (a file type's measured KL and time, plus the
measured change of moving only the vocabulary to another type) and then measured like the others:
nothing is chosen on a prediction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from shrink.errors import ShrinkError
from shrink.export.llamacpp_quantize import quantize_gguf, tensor_rows
from shrink.export.runtimes import LlamaCppRunner
from shrink.export.verify import ReferenceLogProbs, meets_gate
from shrink.ggufmeta import gguf_formats
from shrink.numformats.filetypes import COMMON, file_type
from shrink.numformats.registry import FORMATS
from shrink.units import fmt_time

VOCABULARY_TENSORS = ("token_embd.weight", "output.weight")
# the types llama.cpp's quantizer writes that the vocabulary may take, widest first
VOCABULARY_TYPES = ("q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "iq4_nl", "q4_k", "q4_1", "q4_0", "iq4_xs")
MIXTURES_TRIED = 4  # predicted-best mixtures made and measured (each costs a quantization and a KL pass)
LAYER_GROUPS = 6  # contiguous groups of layers whose sensitivity is measured (one KL pass each)
UPGRADE = "q8_0"  # what a sensitive group's block weights are raised to


@dataclass(frozen=True)
class Cost:
    tpot_s: float
    by: str  # measured (here) or estimated (roofline on the target)
    ttft_s: float | None = None
    memory_bytes: float | None = None
    roofline_tpot_s: float | None = None  # a measured file's estimate too: it anchors the estimated candidates


@dataclass
class Option:
    """One quantization: a llama.cpp file type, with or without the importance matrix, with overrides."""
    file_type: str
    imatrix: bool
    overrides: dict[str, str] = field(default_factory=dict)  # GGUF tensor -> registry format
    path: Path | None = None
    bytes: int = 0
    vocabulary: str = ""  # the type the token embedding is stored in (read from the file)
    weights: str = ""  # the type holding most block-weight bytes (read from the file)
    cost: Cost | None = None
    kl: float | None = None
    top1: float | None = None
    fits: bool = False

    @property
    def source(self) -> str:
        return "shrink mixture" if self.overrides else "llama.cpp file type"

    @property
    def label(self) -> str:
        text = self.file_type + (" + imatrix" if self.imatrix else "")
        vocab = {fmt for name, fmt in self.overrides.items() if name in VOCABULARY_TENSORS}
        if vocab:
            text += f", vocabulary {'/'.join(sorted(vocab))}"
        layers: dict[str, set[int]] = {}
        others = 0
        for name, fmt in self.overrides.items():
            if name.startswith("blk.") and name.split(".")[1].isdigit():
                layers.setdefault(fmt, set()).add(int(name.split(".")[1]))
            elif name not in VOCABULARY_TENSORS:
                others += 1
        for fmt, numbers in sorted(layers.items()):
            text += f", layers {_spans(numbers)} on {fmt}"
        if others:
            text += f", {others} other tensor override(s)"
        return text

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(path=str(self.path) if self.path else None, label=self.label, source=self.source)
        return data


def _spans(numbers: set[int]) -> str:
    """{0, 1, 2, 6} -> '0-2,6'."""
    ordered, spans = sorted(numbers), []
    for number in ordered:
        if spans and number == spans[-1][1] + 1:
            spans[-1][1] = number
        else:
            spans.append([number, number])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


def overrides_text(overrides: dict[str, str]) -> str:
    """{tensor: format} -> 'tensor=format,...', the recipe's form (parse_overrides reads it back)."""
    return ",".join(f"{name}={fmt}" for name, fmt in sorted(overrides.items()))


def parse_overrides(text: str) -> dict[str, str]:
    """'token_embd.weight=q4_0,blk.0.ffn_down.weight=q8_0' -> {tensor: format}."""
    overrides = {}
    for item in (part.strip() for part in text.split(",") if part.strip()):
        name, sep, fmt = item.partition("=")
        if not sep or not name.strip() or not fmt.strip():
            raise ShrinkError(f"A tensor override is tensor=format (token_embd.weight=q4_0), not '{item}'.")
        overrides[name.strip()] = fmt.strip().lower()
    return overrides


@dataclass
class Search:
    """Makes and measures options from one F16 GGUF into `folder`; `cost` times or estimates a file,
    `fits` judges a cost against the budget."""
    source: Path
    folder: Path
    reference: ReferenceLogProbs
    cost: Callable[[Path], Cost]
    fits: Callable[[Cost], bool]
    imatrix: dict[str, Any] | None = None
    status: Callable[[str], None] = lambda message: None
    options: list[Option] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rows = tensor_rows(self.source)

    def _write(self, option: Option) -> None:
        quantize_gguf(self.source, option.path, option.file_type, overrides=option.overrides,
                      imatrix=self.imatrix if option.imatrix else None, rows=self.rows)

    def make(self, option: Option) -> Option:
        """Quantize, cost, measure the KL; recorded in self.options."""
        option.path = self.folder / f"option-{len(self.options):03d}.gguf"
        previous = self.best()
        self._write(option)
        option.bytes = option.path.stat().st_size
        stored = gguf_formats(option.path).formats
        option.vocabulary, option.weights = stored.embeddings, stored.weights
        option.cost = self.cost(option.path)
        option.fits = self.fits(option.cost)
        runner = LlamaCppRunner(option.path, max(len(ids) for ids in self.reference.sequences))
        option.kl, option.top1 = self.reference.score(runner)
        self.status(f"{option.label}: {fmt_time(option.cost.tpot_s)}/token ({option.cost.by})"
                    + f", KL {option.kl:.4f}, top-1 {option.top1:.1%}")
        self.options.append(option)
        # only the best file so far stays on disk (a search makes dozens of model-sized files)
        if self.best() is not option:
            option.path.unlink()
        elif previous is not None:
            previous.path.unlink(missing_ok=True)
        return option

    def confirmed(self) -> Option | None:
        """The best within the budget, timed again where time is measured (timings here vary by 10-20%
        from run to run): an option slower the second time is judged by its slower time, and the next
        best is tried when it no longer fits."""
        while (best := self.best()) is not None and best.cost.by == "measured":
            if not best.path.exists():  # only the best so far is kept on disk
                self._write(best)
            again = self.cost(best.path)
            if again.tpot_s > best.cost.tpot_s:
                best.cost, best.fits = again, self.fits(again)
                self.status(f"{best.label} timed again: {fmt_time(again.tpot_s)}/token (measured)")
            if best.fits:
                return best
        return best

    def why_none(self) -> str:
        """Why no option is the best: none fits the budget, or none that fits passes its verify gate."""
        scored = [o for o in self.options if o.kl is not None and o.cost is not None]
        if not scored:
            return "no option could be made"
        fitting = [o for o in scored if o.fits]
        if not fitting:
            fastest = min(scored, key=lambda o: o.cost.tpot_s)
            return (f"none of its {len(scored)} options fits the budget (the fastest: {fastest.label}, "
                    f"{fmt_time(fastest.cost.tpot_s)}/token {fastest.cost.by})")
        closest = min(fitting, key=lambda o: o.kl)
        return (f"{len(fitting)} of its {len(scored)} options fit the budget but none passes its format's verify gate "
                f"(the lowest KL: {closest.label}, KL {closest.kl:.3f}, top-1 {closest.top1:.1%})")

    def best(self) -> Option | None:
        """The lowest measured KL within the budget, among the options whose measured quality would pass
        their stored format's verify gate (a lower-KL file that fails it ends a run at verify)."""
        fitting = [o for o in self.options if o.fits and o.kl is not None
                   and meets_gate(o.top1, o.kl, self.reference.positions, o.weights)]
        return min(fitting, key=lambda o: o.kl) if fitting else None


def vocabulary_types(rows: dict[str, int]) -> list[str]:
    """The vocabulary types whose blocks divide the embedding's rows (Gemma 3's 640 takes no K-quant)."""
    width = rows["token_embd.weight"]
    return [t for t in VOCABULARY_TYPES if width % FORMATS[t].block == 0]


def narrowest_vocabulary(width: int) -> str:
    """The vocabulary type with the fewest bits whose blocks divide `width` (what the cheapest mixture
    may store the embedding in)."""
    return min(vocabulary_types({"token_embd.weight": width}), key=lambda t: FORMATS[t].bits_per_element)


def vocabulary_overrides(rows: dict[str, int], fmt: str) -> dict[str, str]:
    return {name: fmt for name in VOCABULARY_TENSORS if name in rows}


def run_search(search: Search, file_types: tuple[str, ...] = COMMON, *, plain: bool = False) -> Option | None:
    """llama.cpp's file types, then vocabulary moves measured alone on the F16 blocks, then the
    mixtures they predict best within the budget. Returns the lowest measured KL within the budget
    (None: nothing fits)."""
    make_file_types(search, file_types, plain=plain)
    alone, base = make_vocabulary_moves(search)
    make_mixtures(search, alone, base)
    make_layer_upgrades(search)
    return search.confirmed()


def make_file_types(search: Search, file_types: tuple[str, ...] = COMMON, *, plain: bool = False) -> None:
    """Each file type as llama.cpp makes it: with the importance matrix when there is one, and also
    without it when `plain` (what a llama.cpp user without a matrix ships). Each is scored, even one
    that misses the budget: its blocks may fit beside a narrower vocabulary."""
    with_matrix = search.imatrix is not None
    for kind in file_types:
        for imatrix in ([True] if with_matrix else []) + ([False] if plain or not with_matrix else []):
            if not (file_type(kind).needs_imatrix and not imatrix):
                search.make(Option(kind, imatrix))


def make_vocabulary_moves(search: Search) -> tuple[dict[str, Option], Option]:
    """The vocabulary alone on each type it can take, the blocks kept in F16 (its KL and time apart
    from the blocks'), and the F16 file itself."""
    with_matrix = search.imatrix is not None
    alone = {fmt: search.make(Option("F16", with_matrix, vocabulary_overrides(search.rows, fmt)))
             for fmt in vocabulary_types(search.rows)}
    return alone, search.make(Option("F16", False))


def make_mixtures(search: Search, alone: dict[str, Option], base: Option, tries: int = MIXTURES_TRIED) -> None:
    for option in _predicted_mixtures(search, alone, base, search.rows)[:tries]:
        search.make(option)


def _predicted_mixtures(search: Search, alone: dict[str, Option], base: Option, rows: dict[str, int]) -> list[Option]:
    """Mixtures (a scored file type's blocks, another vocabulary type) predicted within the budget,
    best predicted KL first: KL and time add the vocabulary move's measured change to the file type's."""
    ranked = []
    for option in [o for o in search.options if not o.overrides and o.file_type != "F16"]:
        own = alone.get(option.vocabulary, base if option.vocabulary == base.vocabulary else None)
        if own is None:
            continue
        for fmt, moved in alone.items():
            if fmt == option.vocabulary:
                continue
            tpot = option.cost.tpot_s + moved.cost.tpot_s - own.cost.tpot_s
            predicted = replace(option.cost, tpot_s=tpot)
            if search.fits(predicted):
                kl = option.kl + moved.kl - own.kl
                # the vocabulary was measured moved with the matrix (when there is one): made the same way
                ranked.append((kl, Option(option.file_type, option.imatrix or moved.imatrix,
                                          vocabulary_overrides(rows, fmt))))
    made = {(o.file_type, o.imatrix, tuple(sorted(o.overrides.items()))) for o in search.options}
    unique = []
    for kl, option in sorted(ranked, key=lambda pair: pair[0]):
        key = (option.file_type, option.imatrix, tuple(sorted(option.overrides.items())))
        if key not in made:
            made.add(key)
            unique.append(option)
    return unique


def make_layer_upgrades(search: Search, groups: int = LAYER_GROUPS, upgrade: str = UPGRADE) -> Option | None:
    """Per-layer mixed precision by measured sensitivity: from the best option within the budget, raise
    each group of contiguous layers' block weights to `upgrade` alone (the KL it buys and the time it
    costs, both measured), then raise together the groups that buy most KL per unit of time while the
    summed time still fits, and measure that. Returns the combined option (None: nothing to try)."""
    start = search.best()
    if start is None or FORMATS[start.weights].bits_per_element >= FORMATS[upgrade].bits_per_element:
        return None
    layers = sorted({int(name.split(".")[1]) for name in search.rows if name.startswith("blk.")})
    size = max(1, -(-len(layers) // groups))
    gains = []
    for first in range(0, len(layers), size):
        chosen = set(layers[first:first + size])
        raised = {name: upgrade for name in search.rows if name.startswith("blk.")
                  and int(name.split(".")[1]) in chosen and search.rows[name] % FORMATS[upgrade].block == 0}
        option = search.make(Option(start.file_type, start.imatrix, {**start.overrides, **raised}))
        gains.append((start.kl - option.kl, option.cost.tpot_s - start.cost.tpot_s, raised))
    combined, tpot = dict(start.overrides), start.cost.tpot_s
    picked = 0
    for kl_gain, extra, raised in sorted(gains, key=lambda g: g[0] / max(g[1], 1e-9), reverse=True):
        if kl_gain > 0 and search.fits(replace(start.cost, tpot_s=tpot + max(extra, 0.0))):
            combined.update(raised)
            tpot += max(extra, 0.0)
            picked += 1
    if picked < 2:  # one group alone was measured already
        return None
    return search.make(Option(start.file_type, start.imatrix, combined))

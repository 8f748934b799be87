"""Vocabulary trimming (Ushio et al., "An Efficient Multilingual Language Model Compression through
Vocabulary Trimming", 2023): keep the tokens a deployment's text uses, slice the embedding and the
output projection to them, and rewrite the tokenizer so that it never produces a removed token.

What is kept, in this order of obligation:
1. Every token any text may need: the 256 byte pieces (`<0x00>`..`<0xFF>` of a SentencePiece-style BPE
   with byte fallback; the 256 byte symbols of a byte-level BPE), every added or special token (BOS, EOS,
   padding, chat markers, a tokenizer's reserved tokens) and the unknown token. With the byte pieces
   kept, every text stays encodable: a character whose token was removed falls back to its bytes.
2. The tokens the calibration text (the teacher's own text, or `--data`) uses, most frequent first,
   where a token's frequency is its count plus the model's expected count on the same text (its
   next-token probabilities summed over the positions): a few thousand documents show a few thousand
   distinct tokens, and the model's predictions rank the tail they are too short to sample. Each
   token comes with its merge ancestors: the tokens BPE passes through when it builds it from its characters.
   That closure is what makes the trimmed tokenizer give exactly the original's ids on any text whose
   original tokenization uses kept tokens only: BPE never merges across the boundary of a final token,
   so the merges inside a token's span are those of BPE run on the token alone; if every token on those
   paths is kept, every merge the original applies survives and is still the lowest-ranked one present.
3. When a size is asked for that the ranking does not fill (without the model's counts), tokens the
   text never used, by their merge rank (BPE learns its most frequent pairs first).

The tokenizer is rewritten, not wrapped: the vocabulary gets new dense ids in the original order, a
merge survives only when both its inputs and its result are kept (so no merge produces a removed token,
and every merge reads tokens that exist), added tokens and the post-processor's special ids are
renumbered. A model that came from a GGUF gets a trimmed copy of that GGUF's tokenizer keys (tokens,
scores, types and merges subset the same way, special ids renumbered): llama.cpp's SentencePiece
tokenizer merges any adjacent pair whose concatenation is a token, by score, which on a subset of the
vocabulary is again what the subset of merges does.

Across vocabularies (distillation, verification) everything runs in the trimmed id space: text is
tokenized with the trimmed tokenizer, and the original model is read through `vocabmap.kept_view`:
trimmed ids go in as the original ids of the same tokens; out comes its next-token distribution
carried over to the trimmed ids, each removed token's probability given to the first piece the trimmed
tokenizer spells it with (`first_pieces`, recorded with the trim). That is the target: the sliced model
alone only renormalizes over the kept tokens, and distillation teaches it to spell what it can no longer
say in one token. The mass the original puts on removed tokens is reported beside every figure
(`vocabmap.outside_mass`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from shrink import blocks
from shrink.compress.data import pack, read_texts, teacher_texts
from shrink.errors import ShrinkError
from shrink.families import spec_from_model
from shrink.storage import cache_dir
from shrink.tokenizerjson import bpe_tokenizer_json
from shrink.vocabmap import VocabTrim, record, trim_of

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
HELD_OUT_EVERY = 5  # every 5th document of the calibration text is held out to measure coverage


@dataclass
class _BPE:
    """A Hugging Face BPE tokenizer's parts, as trimming reads them."""
    spec: dict  # tokenizer.json
    kind: str  # "byte_fallback" (SentencePiece-style) or "byte_level"
    tokens: list[str | None]  # id -> token text (vocabulary and added tokens)
    ids: dict[str, int]  # model vocabulary text -> id
    ranks: dict[tuple[str, str], int]  # merge -> rank
    added: set[int]
    first_merge: dict[str, int] = field(default_factory=dict)  # token text -> rank of the first merge making it


def _bpe(tokenizer: Any) -> _BPE:
    spec = bpe_tokenizer_json(tokenizer, "vocabulary trimming rewrites tokenizer.json, so it needs a fast tokenizer.",
                              "vocabulary trimming supports BPE tokenizers (SentencePiece-style with byte fallback, "
                              "or byte-level).")
    model = spec["model"]
    if model.get("byte_fallback"):
        kind = "byte_fallback"
    elif "ByteLevel" in json.dumps(spec.get("pre_tokenizer")):
        kind = "byte_level"
    else:
        raise ShrinkError("The tokenizer's BPE neither falls back to bytes nor works on bytes, so removing a token "
                          "could leave text it cannot encode; vocabulary trimming needs one of the two.")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ShrinkError("The tokenizer's BPE marks word pieces with a prefix or suffix, which vocabulary trimming "
                          "does not rewrite.")
    added = {entry["id"]: entry["content"] for entry in spec.get("added_tokens", [])}
    size = max([len(tokenizer), *(i + 1 for i in model["vocab"].values()), *(i + 1 for i in added)])
    tokens: list[str | None] = [None] * size
    for text, token_id in model["vocab"].items():
        tokens[token_id] = text
    for token_id, text in added.items():
        tokens[token_id] = text
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" ", 1)) for m in model.get("merges", [])]
    ranks = {pair: rank for rank, pair in reversed(list(enumerate(merges)))}
    first: dict[str, int] = {}
    for rank, (left, right) in enumerate(merges):
        first.setdefault(left + right, rank)
    return _BPE(spec, kind, tokens, dict(model["vocab"]), ranks, set(added), first)


def byte_alphabet() -> list[str]:
    """The 256 characters byte-level BPE writes bytes as (GPT-2's table)."""
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def required_ids(tokenizer: Any, bpe: _BPE | None = None) -> set[int]:
    """The ids every trimmed vocabulary keeps: byte pieces, added and special tokens, the unknown token."""
    bpe = bpe or _bpe(tokenizer)
    if bpe.kind == "byte_fallback":
        pieces = {i for i, text in enumerate(bpe.tokens) if text is not None and _BYTE_PIECE.fullmatch(text)}
        if len(pieces) != 256:
            raise ShrinkError(f"The tokenizer falls back to bytes but has {len(pieces)} of the 256 byte pieces, so a "
                              "trimmed vocabulary could not encode every text.")
    else:
        pieces = {bpe.ids[c] for c in byte_alphabet() if c in bpe.ids}
        if len(pieces) != 256:
            raise ShrinkError(f"The byte-level tokenizer has {len(pieces)} of the 256 byte symbols, so a trimmed "
                              "vocabulary could not encode every text.")
    special = {i for i in getattr(tokenizer, "all_special_ids", []) if isinstance(i, int)}
    unk = bpe.spec["model"].get("unk_token")
    if unk is not None and unk in bpe.ids:
        special.add(bpe.ids[unk])
    return pieces | bpe.added | special


def merge_path(bpe: _BPE, text: str) -> list[str]:
    """The tokens BPE passes through when it builds `text` from its characters (the characters that are
    tokens, then each merge's result in order)."""
    return _run_bpe(bpe, text)[1]


def _run_bpe(bpe: _BPE, text: str) -> tuple[list[str], list[str]]:
    """BPE on the characters of `text` the way Hugging Face's runs it, the lowest-ranked pair first, the
    leftmost of equals: (the final symbols, the tokens passed through)."""
    symbols = list(text)
    seen = [s for s in symbols if s in bpe.ids]
    while len(symbols) > 1:
        best, where = None, -1
        for i in range(len(symbols) - 1):
            rank = bpe.ranks.get((symbols[i], symbols[i + 1]))
            if rank is not None and (best is None or rank < best):
                best, where = rank, i
        if best is None:
            break
        symbols[where:where + 2] = [symbols[where] + symbols[where + 1]]
        seen.append(symbols[where])
    return symbols, seen


def first_pieces(bpe: _BPE, kept: list[int]) -> tuple[int, ...]:
    """Per original id, the trimmed id of the first token the trimmed tokenizer spells its text with
    (itself when kept; -1 for a row without text): BPE run on the token's characters with the merges
    that survive the trim, a character that is no kept token falling back to its first byte."""
    new = {old: index for index, old in enumerate(kept)}
    vocab = {text: new[i] for text, i in bpe.ids.items() if i in new}
    ranks = {pair: rank for pair, rank in bpe.ranks.items()
             if pair[0] in vocab and pair[1] in vocab and pair[0] + pair[1] in vocab}
    trimmed = replace(bpe, ids=vocab, ranks=ranks)
    mapped = []
    for token_id, text in enumerate(bpe.tokens):
        if token_id in new:
            mapped.append(new[token_id])
        elif not text:
            mapped.append(-1)
        else:
            first = _run_bpe(trimmed, text)[0][0]
            mapped.append(vocab[first] if first in vocab else vocab[f"<0x{first.encode()[0]:02X}>"])
    return tuple(mapped)


@dataclass
class Selection:
    trim: VocabTrim
    report: dict


def split_texts(texts: list[str]) -> tuple[list[str], list[str]]:
    """(counted, held out): every HELD_OUT_EVERY-th document is held out to measure coverage."""
    if len(texts) < HELD_OUT_EVERY:
        return texts, texts
    held = [t for i, t in enumerate(texts) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    return [t for i, t in enumerate(texts) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1], held


def select(tokenizer: Any, texts: list[str], size: int | None = None, coverage: float | None = None,
           expected: Any = None) -> Selection:
    """The ids to keep: `size` of them in all, or the fewest whose frequency-ranked tokens cover the
    share `coverage` of the tokens of `texts` (with everything required and every merge ancestor).
    `expected` (a float per id: the model's predicted probabilities summed over the positions of the
    same text, `expected_counts`) is added to each token's count: the rank of tokens the text used
    rarely or not at all then follows what the model expects of such text, rather than chance."""
    if (size is None) == (coverage is None):
        raise ShrinkError("Trim the vocabulary to a size (--vocab N) or to a coverage (--vocab-coverage 0.999): one of the two.")
    if coverage is not None and not 0.0 < coverage <= 1.0:
        raise ShrinkError(f"--vocab-coverage must be in (0, 1], got {coverage}.")
    bpe = _bpe(tokenizer)
    original = len(bpe.tokens)
    required = required_ids(tokenizer, bpe)
    if size is not None and not len(required) <= size < original:
        raise ShrinkError(f"--vocab {size} must be at least the {len(required):,} tokens every trimmed vocabulary keeps "
                          f"(256 byte pieces, {len(bpe.added):,} added and special tokens) and below the "
                          f"{original:,} the tokenizer has.")
    counts: Counter = Counter()
    for ids in tokenizer(texts, add_special_tokens=False).input_ids:
        counts.update(ids)
    total = sum(counts.values())
    if total == 0:
        raise ShrinkError("The calibration text holds no tokens, so there is nothing to rank the vocabulary by.")
    kept = set(required)
    covered = sum(counts[i] for i in kept)
    if expected is not None:
        if len(expected) < original:
            raise ShrinkError(f"The model predicts {len(expected)} tokens but the tokenizer has {original}.")
        score = {i: counts.get(i, 0) + float(expected[i]) for i in range(original)}
        ranked = sorted((i for i in score if score[i] > 0 and bpe.tokens[i] is not None), key=lambda i: (-score[i], i))
    else:
        ranked = sorted(counts, key=lambda i: (-counts[i], i))
    listed = set(ranked)
    unseen = sorted((i for i, text in enumerate(bpe.tokens) if text is not None and i not in listed and i not in kept),
                    key=lambda i: (bpe.first_merge.get(bpe.tokens[i], -1), i))

    def with_ancestors(token_id: int) -> set[int]:
        text = bpe.tokens[token_id]
        if token_id in bpe.added or text is None:
            return {token_id}
        return {token_id} | {bpe.ids[t] for t in merge_path(bpe, text)}

    for token_id in ranked + (unseen if size is not None else []):
        if size is not None and len(kept) >= size:
            break
        if coverage is not None and covered >= coverage * total:
            break
        if token_id in kept:
            continue
        new = with_ancestors(token_id) - kept
        if size is not None and len(kept) + len(new) > size:
            continue  # its ancestors do not fit: a later, shorter token may
        kept |= new
        covered += sum(counts[i] for i in new)
    trim = VocabTrim(tuple(sorted(kept)), original, first_pieces(bpe, sorted(kept)))
    report = {"original_vocab": original, "kept_vocab": trim.size, "required": len(required),
              "calibration_tokens": total, "calibration_distinct": len(counts),
              "calibration_token_coverage": covered / total,
              "ranked_by": "count + model's expected count" if expected is not None else "count, then merge rank"}
    if expected is not None:
        report["calibration_expected_mass_kept"] = float(sum(float(expected[i]) for i in kept)) / float(sum(expected))
    return Selection(trim, report)


# ---------------------------------------------------------------------------------------------
# the tokenizer, rewritten


def trimmed_tokenizer_json(tokenizer: Any, trim: VocabTrim) -> dict:
    """tokenizer.json of the trimmed tokenizer: renumbered vocabulary, surviving merges, renumbered
    added tokens and post-processor ids."""
    bpe = _bpe(tokenizer)
    if len(bpe.tokens) != trim.original_size:
        raise ShrinkError(f"The tokenizer has {len(bpe.tokens)} tokens, not the {trim.original_size} this trim was made for.")
    new = trim.new_ids()
    spec = copy.deepcopy(bpe.spec)
    model = spec["model"]
    model["vocab"] = {text: new[i] for text, i in bpe.ids.items() if i in new}
    vocab = model["vocab"]
    pair = lambda m: tuple(m) if not isinstance(m, str) else tuple(m.split(" ", 1))  # noqa: E731
    model["merges"] = [m for m in model.get("merges", [])
                       if (lambda a, b: a in vocab and b in vocab and a + b in vocab)(*pair(m))]
    unk = model.get("unk_token")
    if unk is not None and unk not in vocab:
        model["unk_token"] = None
    spec["added_tokens"] = [dict(entry, id=new[entry["id"]]) for entry in spec.get("added_tokens", []) if entry["id"] in new]
    spec["post_processor"] = _renumbered(spec.get("post_processor"), new)
    return spec


def _renumbered(processor: Any, new: dict[int, int]) -> Any:
    """The post-processor with every special token id renumbered (all of them are kept)."""
    if processor is None:
        return None
    kind = processor.get("type")
    processor = copy.deepcopy(processor)
    if kind == "Sequence":
        processor["processors"] = [_renumbered(p, new) for p in processor["processors"]]
    elif kind == "TemplateProcessing":
        for entry in processor.get("special_tokens", {}).values():
            entry["ids"] = [new[i] for i in entry["ids"]]
    elif kind in ("BertProcessing", "RobertaProcessing"):
        for key in ("sep", "cls"):
            processor[key] = [processor[key][0], new[processor[key][1]]]
    elif kind != "ByteLevel":
        raise ShrinkError(f"The tokenizer's post-processor ({kind}) is not one vocabulary trimming renumbers.")
    return processor


def trimmed_tokenizer(tokenizer: Any, trim: VocabTrim) -> Any:
    """A Hugging Face tokenizer over the trimmed vocabulary (its class and settings kept)."""
    from transformers import AutoTokenizer

    spec = trimmed_tokenizer_json(tokenizer, trim)
    new = trim.new_ids()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for stale in ("tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json"):
            Path(tmp, stale).unlink(missing_ok=True)
        Path(tmp, "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
        config_path = Path(tmp, "tokenizer_config.json")
        config = json.loads(config_path.read_text())
        if "added_tokens_decoder" in config:
            config["added_tokens_decoder"] = {str(new[int(k)]): v for k, v in config["added_tokens_decoder"].items()
                                              if int(k) in new}
        config_path.write_text(json.dumps(config))
        trimmed = AutoTokenizer.from_pretrained(tmp)
    if len(trimmed) != trim.size:
        raise ShrinkError(f"The rewritten tokenizer has {len(trimmed)} tokens, not the {trim.size} kept; "
                          "its class rebuilds the vocabulary in a way trimming cannot follow.")
    return trimmed


def trimmed_gguf_tokenizer(source: Path, trim: VocabTrim) -> Path:
    """A tokenizer-only GGUF with the keys of `source` (a GGUF) subset to the kept tokens: what a GGUF
    export of the trimmed model copies. Written once into the cache, keyed by the source and the trim."""
    import gguf
    from gguf import GGUFReader, GGUFValueType

    digest = hashlib.sha256(f"{Path(source).resolve()}:{Path(source).stat().st_size}:{trim.kept}".encode()).hexdigest()[:24]
    target = cache_dir("vocab") / f"tokenizer-{digest}.gguf"
    if target.is_file():
        return target
    reader = GGUFReader(str(source))
    fields = {name: f for name, f in reader.fields.items() if name.startswith("tokenizer.")}
    strings = lambda f: [bytes(f.parts[i]) for i in f.data]  # noqa: E731
    tokens = strings(fields["tokenizer.ggml.tokens"])
    if len(tokens) != trim.original_size:
        raise ShrinkError(f"'{source}' holds {len(tokens)} tokens, not the {trim.original_size} this trim was made for.")
    new = trim.new_ids()
    kept_tokens = [tokens[i] for i in trim.kept]
    present = set(kept_tokens)
    tmp = target.with_name(f".{target.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), "tokenizer")
    for name, f in fields.items():
        kind = f.types[0]
        if kind == GGUFValueType.ARRAY and f.types[1] == GGUFValueType.STRING:
            values = strings(f)
            if name == "tokenizer.ggml.merges":
                values = [m for m in values if all(p in present for p in (*m.split(b" ", 1), m.replace(b" ", b"", 1)))]
            elif len(values) == trim.original_size:
                values = [values[i] for i in trim.kept]
            writer.add_array(name, values)
        elif kind == GGUFValueType.ARRAY:
            values = [f.parts[i][0].item() for i in f.data]
            writer.add_array(name, [values[i] for i in trim.kept] if len(values) == trim.original_size else values)
        elif kind == GGUFValueType.STRING:
            writer.add_string(name, bytes(f.parts[f.data[0]]).decode())
        else:
            value = f.parts[f.data[0]][0].item()
            if name.endswith("_token_id"):
                if value not in new:
                    raise ShrinkError(f"'{source}' names token {value} as {name}, which the trim removed.")
                value = new[value]
            writer.add_key_value(name, value, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    tmp.replace(target)
    return target


# ---------------------------------------------------------------------------------------------
# the model, sliced


def trim_model(loaded: Any, trim: VocabTrim) -> Any:
    """A new LoadedModel over the kept tokens: embedding rows and lm_head rows sliced (one table when
    tied), config and special ids renumbered, tokenizer rewritten, GGUF tokenizer keys subset. The input
    model is left untouched; a model trimmed before is trimmed again in its own id space."""
    import torch

    rows = blocks.embedding(loaded.model).weight.shape[0]
    if rows != trim.original_size:
        raise ShrinkError(f"The model's embedding has {rows} rows, not the {trim.original_size} this trim was made for.")
    model = copy.deepcopy(loaded.model)
    config = model.config
    index = torch.tensor(trim.kept, dtype=torch.long)
    new = trim.new_ids()
    embed = blocks.embedding(model)
    tied = loaded.spec.tied_embeddings
    with torch.no_grad():
        embed.weight = torch.nn.Parameter(embed.weight.detach().index_select(0, index).clone())
        embed.num_embeddings = trim.size
        if getattr(embed, "padding_idx", None) is not None:
            embed.padding_idx = new.get(embed.padding_idx)
        head = model.get_output_embeddings()
        if tied:
            head.weight = embed.weight
        else:
            head.weight = torch.nn.Parameter(head.weight.detach().index_select(0, index).clone())
            if getattr(head, "bias", None) is not None:
                head.bias = torch.nn.Parameter(head.bias.detach().index_select(0, index).clone())
        head.out_features = trim.size
    for cfg in {id(c): c for c in (config, config.get_text_config(), getattr(model, "generation_config", None)) if c is not None}.values():
        if hasattr(cfg, "vocab_size"):
            cfg.vocab_size = trim.size
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(cfg, key, None)
            if value is not None:
                setattr(cfg, key, _renumber(value, new, key))
    earlier = trim_of(loaded.model)
    record(model, trim.composed(earlier) if earlier else trim)
    tokenizer = trimmed_tokenizer(loaded.tokenizer, trim) if loaded.tokenizer is not None else None
    sidecar = trimmed_gguf_tokenizer(loaded.gguf_tokenizer, trim) if loaded.gguf_tokenizer is not None else None
    spec = replace(spec_from_model(model), formats=loaded.spec.formats, name=f"{loaded.spec.name}-vocab{trim.size}")
    return replace(loaded, model=model.eval(), spec=spec, tokenizer=tokenizer, gguf_tokenizer=sidecar)


def _renumber(value: Any, new: dict[int, int], key: str) -> Any:
    if isinstance(value, list):
        return [_renumber(v, new, key) for v in value]
    if value not in new:
        raise ShrinkError(f"The model's {key} ({value}) is not among the kept tokens.")
    return new[value]


# ---------------------------------------------------------------------------------------------
# what it costs the text


def coverage(original: Any, trimmed: Any, trim: VocabTrim, texts: list[str]) -> dict[str, float]:
    """How much of `texts` the trimmed tokenizer tokenizes unchanged: the share of the original's tokens
    that it produces too (the same token over the same characters), and the share of documents
    tokenized identically. Both measured."""
    same = total = same_docs = 0
    for text in texts:
        before = original(text, add_special_tokens=False, return_offsets_mapping=True)
        after = trimmed(text, add_special_tokens=False, return_offsets_mapping=True)
        old = set(zip(before.input_ids, map(tuple, before.offset_mapping)))
        new = {(trim.kept[i], tuple(span)) for i, span in zip(after.input_ids, after.offset_mapping)}
        same += len(old & new)
        total += len(old)
        same_docs += [trim.kept[i] for i in after.input_ids] == list(before.input_ids)
    return {"token_coverage": same / max(total, 1), "documents_unchanged": same_docs / max(len(texts), 1),
            "held_out_tokens": total, "held_out_documents": len(texts)}


def calibration_texts(loaded: Any, data: str | None, text_field: str = "text",
                      status: Callable[[str], None] = lambda message: None) -> list[str]:
    """The deployment's text: `data`, or the text the model writes itself (cached)."""
    if data:
        return read_texts(data, text_field)
    status("Reading the text the model writes itself (written and cached on the first run)")
    return teacher_texts(loaded)


def expected_counts(model: Any, tokenizer: Any, texts: list[str], seq_len: int = 256, batch_size: int = 2) -> Any:
    """The model's next-token probabilities summed over every position of `texts` (float64 [vocab]):
    how often it expects each token in such text, the tail the sampled text is too short to show."""
    import torch

    ids = [tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    length = min(seq_len, max(2, sum(len(i) + 1 for i in ids)))
    sequences = pack(ids, length, tokenizer.eos_token_id)
    total = None
    with torch.no_grad():
        for start in range(0, sequences.shape[0], batch_size):
            probs = torch.softmax(model(sequences[start:start + batch_size]).logits.float(), -1)
            part = probs.sum((0, 1), dtype=torch.float64)
            total = part if total is None else total + part
    return total


def trim_vocabulary(loaded: Any, texts: list[str], size: int | None = None, coverage_target: float | None = None,
                    status: Callable[[str], None] = lambda message: None,
                    model_counts: bool = True, expected: Any = None) -> tuple[Any, VocabTrim, dict]:
    """Select on the counted part of `texts` (by count plus, with `model_counts`, the model's expected
    count), slice the model, measure coverage on the held-out part: (the trimmed LoadedModel, the trim
    in `loaded`'s id space, the report)."""
    if loaded.tokenizer is None:
        raise ShrinkError("The model has no tokenizer, so there is no vocabulary to trim by text.")
    counted, held_out = split_texts(texts)
    if model_counts and expected is None:  # `expected`: counts computed before on the same counted texts
        status(f"Reading the model's expected token counts on {len(counted)} documents of calibration text")
        expected = expected_counts(loaded.model, loaded.tokenizer, counted)
    status(f"Ranking the vocabulary by {len(counted)} documents of calibration text")
    selection = select(loaded.tokenizer, counted, size=size, coverage=coverage_target,
                       expected=expected if model_counts else None)
    status(f"Slicing the embedding and output to {selection.trim.size:,} tokens, rewriting the tokenizer")
    trimmed = trim_model(loaded, selection.trim)
    report = {**selection.report, "held_out": coverage(loaded.tokenizer, trimmed.tokenizer, selection.trim, held_out)}
    return trimmed, selection.trim, report

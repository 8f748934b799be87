"""A Hugging Face tokenizer written as a GGUF vocabulary that llama.cpp tokenizes identically.

llama.cpp reimplements a fixed set of tokenizers, so conversion means recognising which one a
tokenizer.json describes, from what its pieces do rather than from its name:
- SentencePiece-style BPE (Gemma, Llama 2, Mistral: `▁` for spaces, byte fallback) becomes
  llama.cpp's "llama" model. That model merges the adjacent pair whose result has the highest score,
  so each piece is scored by the rank of the first Hugging Face merge that produces it: the same
  order in which Hugging Face's BPE applies its merges.
- Byte-level BPE (GPT-2, Llama 3, Qwen2/3) becomes the "gpt2" model with its merges, and
  `tokenizer.ggml.pre` names the llama.cpp pre-tokenizer whose split pattern is the one the
  tokenizer.json uses (compared as text, after llama.cpp's rewriting of case-insensitive groups).
Anything else (Unigram, WordPiece, an unknown split pattern, a normalizer llama.cpp does not apply)
is refused in one sentence that names the part llama.cpp cannot reproduce.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from shrink.errors import ShrinkError
from shrink.tokenizerjson import bpe_tokenizer_json

# gguf.TokenType values (kept here so that describing a vocabulary does not import gguf)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp pre-tokenizer name -> the split pattern Hugging Face tokenizers use for it
# (llama.cpp src/llama-vocab.cpp keeps each as a comment beside its own rewriting).
_CONTRACTIONS_CI = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
PRE_TOKENIZER_PATTERNS = {
    "llama-bpe": _CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": _CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
# what each pre-tokenizer implies in llama.cpp (llama-vocab.cpp): Llama 3's BPE looks a whole word
# up before merging (`ignore_merges`), Qwen2's does not
_IGNORE_MERGES = {"llama-bpe": True, "qwen2": False, "gpt-2": False}
_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class GGUFVocabulary:
    """Everything a GGUF's tokenizer.* keys hold, in llama.cpp's terms."""

    model: str  # "llama" (SentencePiece-style) or "gpt2" (byte-level BPE)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    pre: str | None = None
    add_space_prefix: bool | None = None
    special_ids: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad -> id
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None

    def write(self, writer: Any) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def gguf_vocabulary(tokenizer: Any, rows: int) -> GGUFVocabulary:
    """The vocabulary a GGUF of a model with `rows` embedding rows carries: llama.cpp wants one token
    per row, so rows the tokenizer never produces (Qwen pads its embedding) become unused tokens."""
    vocabulary = vocabulary_from_hf(tokenizer)
    if len(vocabulary.tokens) > rows:
        raise ShrinkError(f"The tokenizer has {len(vocabulary.tokens)} tokens but the model's embedding only "
                          f"{rows} rows; llama.cpp needs one row per token.")
    extra = rows - len(vocabulary.tokens)
    vocabulary.tokens += [f"[PAD{i}]" for i in range(len(vocabulary.tokens), rows)]
    vocabulary.types += [UNUSED] * extra
    if vocabulary.scores is not None:
        vocabulary.scores += [min(vocabulary.scores, default=0.0)] * extra
    return vocabulary


def vocabulary_from_hf(tokenizer: Any) -> GGUFVocabulary:
    """The GGUF vocabulary of a Hugging Face fast tokenizer, or a ShrinkError naming what llama.cpp
    cannot reproduce."""
    spec = bpe_tokenizer_json(tokenizer, "llama.cpp's tokenizers are converted from tokenizer.json only: export it "
                              "as ONNX instead.", "shrink converts BPE tokenizers (SentencePiece-style or byte-level) "
                              "to GGUF only: export it as ONNX instead.")
    model = spec["model"]
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    vocab = _dense_vocabulary(model["vocab"], added, len(tokenizer))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if model.get("byte_fallback"):
        vocabulary = _sentencepiece_style(spec, vocab, merges, added)
    else:
        vocabulary = _byte_level(spec, vocab, merges, added)
    _special_tokens(tokenizer, vocabulary)
    template = getattr(tokenizer, "chat_template", None)
    vocabulary.chat_template = template if isinstance(template, str) else None
    return vocabulary


def _dense_vocabulary(vocab: dict[str, int], added: dict[int, dict], size: int) -> list[str | None]:
    tokens: list[str | None] = [None] * max(size, max(vocab.values(), default=-1) + 1, max(added, default=-1) + 1)
    for text, token_id in vocab.items():
        tokens[token_id] = text
    for token_id, entry in added.items():
        tokens[token_id] = entry["content"]
    return tokens


def _token_types(tokens: list[str | None], added: dict[int, dict], byte_pieces: bool) -> list[int]:
    types = []
    for token_id, text in enumerate(tokens):
        if text is None:
            types.append(UNUSED)
        elif token_id in added:
            types.append(CONTROL if added[token_id].get("special") else USER_DEFINED)
        elif byte_pieces and _BYTE_PIECE.fullmatch(text):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    return types


def _filled(tokens: list[str | None]) -> list[str]:
    return [f"[PAD{i}]" if text is None else text for i, text in enumerate(tokens)]


# ---------------------------------------------------------------------------------------------
# SentencePiece-style BPE -> llama.cpp "llama"


def _sentencepiece_style(spec: dict, tokens: list[str | None], merges: list[str], added: dict[int, dict]) -> GGUFVocabulary:
    add_space_prefix = _metaspace_prefix(spec)
    decoder = json.dumps(spec.get("decoder"))
    if "ByteFallback" not in decoder:
        raise ShrinkError("The tokenizer falls back to bytes when it encodes but its decoder does not turn byte "
                          "pieces back into bytes; llama.cpp's SentencePiece tokenizer assumes it does: export it as ONNX instead.")
    present = set(tokens)
    missing = [i for i in range(256) if f"<0x{i:02X}>" not in present]
    if missing:
        raise ShrinkError(f"The tokenizer falls back to bytes but lacks {len(missing)} of the 256 byte pieces "
                          f"(first <0x{missing[0]:02X}>), which llama.cpp needs: export it as ONNX instead.")
    # llama.cpp merges the pair whose result scores highest; Hugging Face applies the lowest-ranked merge
    # first. A piece no merge makes (a single character, a special token) gets the lowest score.
    rank_of: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        left, _, right = merge.partition(" ")
        rank_of.setdefault(left + right, rank)
    unranked = -float(len(merges) + 1)
    scores = [-float(rank_of[t]) if t in rank_of else unranked for t in (text or "" for text in tokens)]
    return GGUFVocabulary("llama", _filled(tokens), _token_types(tokens, added, byte_pieces=True), scores=scores,
                          add_space_prefix=add_space_prefix)


def _metaspace_prefix(spec: dict) -> bool:
    """Whether the tokenizer prepends `▁` to the text (llama.cpp's add_space_prefix), checked against the
    two ways tokenizer.json spells a SentencePiece normalizer; any other normalizer is refused."""
    normalizer, pre = spec.get("normalizer"), spec.get("pre_tokenizer")
    steps = normalizer.get("normalizers", []) if normalizer and normalizer.get("type") == "Sequence" else [normalizer] if normalizer else []
    kinds = [step.get("type") for step in steps]
    replaces_spaces = any(s.get("type") == "Replace" and s.get("pattern", {}).get("String") == " " and s.get("content") == "▁"
                          for s in steps)
    prepends = any(s.get("type") == "Prepend" and s.get("prepend") == "▁" for s in steps)
    if replaces_spaces and set(kinds) <= {"Replace", "Prepend"}:
        if pre is not None and not _is_space_split(pre):
            raise ShrinkError(f"The tokenizer's pre-tokenizer ({pre.get('type')}) splits text before its SentencePiece "
                              "pieces, which llama.cpp's SentencePiece tokenizer does not do: export it as ONNX instead.")
        return prepends
    if normalizer is None and pre is not None and pre.get("type") == "Metaspace" and pre.get("replacement") == "▁":
        if pre.get("split", True):
            raise ShrinkError("The tokenizer's Metaspace pre-tokenizer splits words apart, which llama.cpp's "
                              "SentencePiece tokenizer does not do: export it as ONNX instead.")
        scheme = pre.get("prepend_scheme", "always")
        if scheme != "never":
            # checked against llama.cpp: it adds ' ' before every text that follows a special token, and
            # even before text that starts with a space; Metaspace does neither
            raise ShrinkError(f"The tokenizer prepends '▁' with Metaspace's '{scheme}' scheme, which llama.cpp does not "
                              "reproduce (it also prepends after special tokens and before a leading space): export it as ONNX instead.")
        return False
    raise ShrinkError(f"The tokenizer's normalizer ({', '.join(filter(None, kinds)) or 'none'}) is not one llama.cpp's "
                      "SentencePiece tokenizer applies (spaces replaced by '▁', optionally one prepended): export it as ONNX instead.")


def _is_space_split(pre: dict) -> bool:
    # Gemma's tokenizer.json splits on ' ' after its normalizer has replaced every ' ': a no-op
    return pre.get("type") == "Split" and pre.get("pattern", {}).get("String") == " "


# ---------------------------------------------------------------------------------------------
# byte-level BPE -> llama.cpp "gpt2"


def _byte_level(spec: dict, tokens: list[str | None], merges: list[str], added: dict[int, dict]) -> GGUFVocabulary:
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise ShrinkError(f"The tokenizer normalizes text with {normalizer.get('type')}, which llama.cpp's BPE "
                          "tokenizers do not apply: export it as ONNX instead.")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if normalizer is not None and pre != "qwen2":
        raise ShrinkError("The tokenizer normalizes text to NFC, which llama.cpp applies only with the Qwen2 "
                          "pre-tokenizer: export it as ONNX instead.")
    ignore_merges = bool(spec["model"].get("ignore_merges", False))
    if ignore_merges != _IGNORE_MERGES[pre]:
        raise ShrinkError(f"The tokenizer {'looks whole words up before merging' if ignore_merges else 'always merges'}, "
                          f"but llama.cpp's '{pre}' pre-tokenizer {'does not' if ignore_merges else 'does'}: export it as ONNX instead.")
    return GGUFVocabulary("gpt2", _filled(tokens), _token_types(tokens, added, byte_pieces=False), merges=merges, pre=pre)


def _pre_tokenizer_name(pre: dict | None) -> str:
    """The llama.cpp pre-tokenizer whose split pattern this byte-level tokenizer uses."""
    if pre is None:
        raise ShrinkError("The byte-level tokenizer has no pre-tokenizer; llama.cpp always splits text first: "
                          "export it as ONNX instead.")
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    splits = [s for s in steps if s.get("type") == "Split"]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if len(byte_level) != 1 or len(steps) != len(splits) + 1 or len(splits) > 1:
        raise ShrinkError(f"The tokenizer's pre-tokenizer ({', '.join(s.get('type', '?') for s in steps)}) is not a "
                          "split pattern followed by byte-level encoding: export it as ONNX instead.")
    if not splits:  # GPT-2: ByteLevel does its own split
        if not byte_level[0].get("use_regex", True):
            raise ShrinkError("The byte-level tokenizer does not split text at all; llama.cpp always does: export it as ONNX instead.")
        return "gpt-2"
    if byte_level[0].get("use_regex", True):
        raise ShrinkError("The tokenizer splits text twice (its own pattern, then GPT-2's); no llama.cpp "
                          "pre-tokenizer does: export it as ONNX instead.")
    split = splits[0]
    pattern = split.get("pattern", {}).get("Regex")
    if split.get("behavior") != "Isolated" or split.get("invert"):
        raise ShrinkError(f"The tokenizer's split keeps matches as '{split.get('behavior')}'; llama.cpp isolates "
                          "them: export it as ONNX instead.")
    for name, known in PRE_TOKENIZER_PATTERNS.items():
        if pattern == known:
            return name
    raise ShrinkError(f"The tokenizer splits text with the pattern {pattern!r}, which matches none of the llama.cpp "
                      f"pre-tokenizers shrink knows ({', '.join(PRE_TOKENIZER_PATTERNS)}): export it as ONNX instead.")


# ---------------------------------------------------------------------------------------------
# special tokens: read from what the tokenizer does, not from its config's flags


def _special_tokens(tokenizer: Any, vocabulary: GGUFVocabulary) -> None:
    for kind, attribute in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unk_token_id"), ("pad", "pad_token_id")):
        token_id = getattr(tokenizer, attribute, None)
        if isinstance(token_id, int):
            vocabulary.special_ids[kind] = token_id
    plain = tokenizer("a", add_special_tokens=False).input_ids
    full = tokenizer("a").input_ids
    start = full.index(plain[0]) if plain and plain[0] in full else 0
    prefix, suffix = full[:start], full[start + len(plain):]
    bos, eos = vocabulary.special_ids.get("bos"), vocabulary.special_ids.get("eos")
    if prefix not in ([], [bos]) or suffix not in ([], [eos]):
        raise ShrinkError(f"The tokenizer wraps text in {prefix} ... {suffix}; llama.cpp can add only its BOS "
                          "before and its EOS after: export it as ONNX instead.")
    vocabulary.add_bos, vocabulary.add_eos = bool(prefix), bool(suffix)

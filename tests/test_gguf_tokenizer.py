"""Hugging Face tokenizers -> GGUF: llama.cpp tokenizes exactly as the Hugging Face tokenizer does, on
the verify prompts and the adversarial set, or the export is refused before anything is written."""

import json
import subprocess
import sys

import pytest

from shrink.errors import ShrinkError
from shrink.export.gguf import export_gguf
from shrink.export.gguf_backend import GGUFBackend
from shrink.export.gguf_tokenizer import vocabulary_from_hf
from shrink.export.prompts import DEFAULT_TEXTS
from shrink.export.tokenizer_parity import parity_check
from shrink.export.workflow import export_artifact
from shrink.families import spec_from_model
from shrink.model import LoadedModel
from tiny_models import byte_level_tokenizer, tiny_corpus

def sentencepiece_tokenizer(prefix: str):
    """A SentencePiece-style BPE (byte fallback, '▁' for spaces) trained here, with '▁' prepended the way
    Llama 2's tokenizer.json does (a Prepend normalizer) or the way newer conversions do (Metaspace)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    if prefix == "prepend":
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokenizer.train_from_iterator(tiny_corpus(), trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def with_tokenizer(tiny_model, family, tokenizer, extra_rows=0):
    loaded = tiny_model(family, vocab_size=len(tokenizer) + extra_rows)
    return LoadedModel(loaded.model, tokenizer, spec_from_model(loaded.model), f"tiny-{family}-tokenized")


@pytest.mark.parametrize("style, family, pre", [("llama3", "llama", "llama-bpe"), ("qwen2", "qwen2", "qwen2")])
def test_byte_level_bpe_exports_with_identical_tokenization(tmp_path, tiny_model, style, family, pre):
    tokenizer = byte_level_tokenizer(style)
    loaded = with_tokenizer(tiny_model, family, tokenizer, extra_rows=5)  # padded rows, as Qwen pads its embedding
    result = export_artifact(loaded, "gguf", tmp_path / "m.gguf", quant="f32")
    checks = {c.name: c for c in result.verdict.checks}
    assert checks["tokenizer parity"].passed, checks["tokenizer parity"].detail
    assert result.verdict.metrics.top1_agreement == 1.0
    from gguf import GGUFReader

    fields = GGUFReader(str(tmp_path / "m.gguf")).fields
    assert bytes(fields["tokenizer.ggml.pre"].parts[-1]).decode() == pre
    assert len(fields["tokenizer.ggml.tokens"].data) == len(tokenizer) + 5
    assert bool(fields["tokenizer.ggml.add_bos_token"].parts[-1][0]) == (style == "llama3")
    if style == "qwen2":
        assert "<|im_start|>" in bytes(fields["tokenizer.chat_template"].parts[-1]).decode()


def test_llama2_style_sentencepiece_exports_with_identical_tokenization(tmp_path, tiny_model):
    loaded = with_tokenizer(tiny_model, "llama", sentencepiece_tokenizer("prepend"))
    result = export_artifact(loaded, "gguf", tmp_path / "m.gguf", quant="f32")
    checks = {c.name: c for c in result.verdict.checks}
    assert checks["tokenizer parity"].passed, checks["tokenizer parity"].detail
    assert vocabulary_from_hf(loaded.tokenizer).add_space_prefix is True


def test_metaspace_prefix_llama_cpp_cannot_reproduce_is_refused(tmp_path, tiny_model):
    loaded = with_tokenizer(tiny_model, "llama", sentencepiece_tokenizer("metaspace"))
    with pytest.raises(ShrinkError, match="Metaspace's 'first' scheme, which llama.cpp does not reproduce"):
        export_gguf(loaded, tmp_path / "m.gguf")


def test_a_tokenizer_difference_fails_verify_naming_the_first_differing_token(tiny_model):
    tokenizer = byte_level_tokenizer("llama3")
    reversed_digits = lambda text: tokenizer(text[::-1] if any(c.isdigit() for c in text) else text).input_ids  # noqa: E731
    check = parity_check(tokenizer, reversed_digits, "llama.cpp")
    assert not check.passed
    assert "differs at token" in check.detail and "the artifact" in check.detail


def test_unknown_split_pattern_is_refused_naming_it(tiny_model):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\w+|\s+|[^\w\s]+"), behavior="isolated"),
                                                       pre_tokenizers.ByteLevel(use_regex=False)])
    tokenizer.train_from_iterator(tiny_corpus(), trainers.BpeTrainer(vocab_size=300, show_progress=False))
    with pytest.raises(ShrinkError, match=r"splits text with the pattern .*matches none of the llama.cpp pre-tokenizers"):
        vocabulary_from_hf(PreTrainedTokenizerFast(tokenizer_object=tokenizer))


def test_unigram_and_wordpiece_are_refused_before_anything_is_written(tmp_path, tiny_model):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    for model, trainer in ((models.Unigram(), trainers.UnigramTrainer(vocab_size=400, show_progress=False)),
                           (models.WordPiece(unk_token="[UNK]"), trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[UNK]"],
                                                                                          show_progress=False))):
        tokenizer = Tokenizer(model)
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer.train_from_iterator(tiny_corpus(), trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
        loaded = with_tokenizer(tiny_model, "llama", fast)
        with pytest.raises(ShrinkError, match="converts BPE tokenizers"):
            export_gguf(loaded, tmp_path / "m.gguf")
        assert not (tmp_path / "m.gguf").exists()


def test_cli_export_refuses_an_unconvertible_tokenizer_with_exit_2(tmp_path, tiny_model):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(tiny_corpus(), trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[UNK]"], show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")
    loaded = with_tokenizer(tiny_model, "llama", fast)
    loaded.model.save_pretrained(tmp_path / "model")
    fast.save_pretrained(tmp_path / "model")
    out = subprocess.run([sys.executable, "-m", "shrink", "export", str(tmp_path / "model"), "-f", "gguf",
                          "-o", str(tmp_path / "m.gguf")], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert "WordPiece" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "m.gguf").exists()


def test_gguf_without_vocabulary_reports_no_tokenizer(tmp_path, tiny_model):
    export_gguf(tiny_model("llama"), tmp_path / "m.gguf", quant="f32")
    with GGUFBackend().tokenizer(tmp_path / "m.gguf") as tokenize:
        assert tokenize is None


@pytest.mark.slow
def test_embedded_model_as_a_hugging_face_directory_exports_with_identical_tokenization(tmp_path):
    """What a user who downloaded google/gemma-3-270m holds: weights and a tokenizer.json, no GGUF."""
    from shrink.export.runtimes import LlamaCppRunner, TorchRunner
    from shrink.export.verify import compare
    from shrink.model import embedded_gguf_path, embedded_model_dir, load

    directory = embedded_model_dir()
    assert not (directory / "tokenizer.gguf").exists()
    loaded = load(str(directory))
    assert loaded.gguf_tokenizer is None
    vocabulary = vocabulary_from_hf(loaded.tokenizer)
    assert vocabulary.model == "llama" and vocabulary.add_bos and vocabulary.add_space_prefix is False
    result = export_artifact(loaded, "gguf", tmp_path / "hf.gguf", quant="f16")
    checks = {c.name: c for c in result.verdict.checks}
    assert checks["tokenizer parity"].passed, checks["tokenizer parity"].detail
    assert result.verdict.metrics.top1_agreement >= 0.99
    # the same ids as the GGUF the model was published as, on every parity text
    with GGUFBackend().tokenizer(tmp_path / "hf.gguf") as ours, GGUFBackend().tokenizer(embedded_gguf_path()) as theirs:
        from shrink.export.tokenizer_parity import parity_texts

        for text in parity_texts(loaded.tokenizer):
            assert ours(text) == theirs(text), text
    born = LlamaCppRunner(tmp_path / "hf.gguf", 160)
    ids = loaded.tokenizer(DEFAULT_TEXTS[0]).input_ids
    metrics = compare(TorchRunner(loaded.model), born, [ids])
    assert metrics.top1_agreement >= 0.99
    json.dumps(result.report)  # the export report stays serialisable

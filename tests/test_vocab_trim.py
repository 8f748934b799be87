"""Vocabulary trimming (compress/vocab.py) on tiny models with tokenizers trained here: the trimmed
tokenizer never produces a removed token and loses no text, tokenizes exactly as the original wherever
the original uses kept tokens only, the sliced model computes the original's logits over the kept ids,
the GGUF export tokenizes as the trimmed Hugging Face tokenizer in llama.cpp, and distillation runs from
the full-vocabulary teacher."""

import json
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from shrink.cli.app import app
from shrink.compress.data import pack, prepare, split
from shrink.compress.vocab import select, split_texts, trim_model, trim_vocabulary
from shrink.errors import ShrinkError
from shrink.export.prompts import DEFAULT_TEXTS
from shrink.export.tokenizer_parity import ADVERSARIAL_TEXTS
from shrink.export.runtimes import TorchRunner
from shrink.export.verify import compare
from shrink.export.workflow import export_artifact
from shrink.families import spec_from_model
from shrink.model import LoadedModel, load
from shrink.vocabmap import kept_view, outside_mass, trim_of
from test_gguf_tokenizer import sentencepiece_tokenizer
from tiny_models import build, byte_level_tokenizer, peaked, perturbed

# the text the vocabulary is ranked by: English prose only, so that the other scripts, digits and emoji of
# the parity set use removed tokens and must fall back
COUNTED = DEFAULT_TEXTS[:5] * 2
POOL = ("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()[]{}<>-_=+*/\\#%&@$"
        "\n\t  éüßçñ øåÆ ΕλληνικάРусский 東京日本語한국어 中文 👍🏽🤖❤️")


def tokenizer_of(style):
    return byte_level_tokenizer("llama3") if style == "byte-level" else sentencepiece_tokenizer("prepend")


def tokenized_model(style):
    """(LoadedModel, family): byte-level BPE on an untied Llama, SentencePiece-style on a tied Gemma 3."""
    tokenizer = tokenizer_of(style)
    family = "llama" if style == "byte-level" else "gemma3"
    model = peaked(build(family, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id))
    return LoadedModel(model, tokenizer, spec_from_model(model), f"tiny-{family}-{style}"), family


def random_texts(count=300, seed=0):
    rng = random.Random(seed)
    corpus = "\n\n".join(DEFAULT_TEXTS + ADVERSARIAL_TEXTS)
    texts = []
    for i in range(count):
        if i % 2:
            start = rng.randrange(len(corpus))
            texts.append(corpus[start:start + rng.randrange(1, 80)])
        else:
            texts.append("".join(rng.choice(POOL) for _ in range(rng.randrange(1, 60))))
    return texts


@pytest.fixture(scope="module", params=["byte-level", "sentencepiece"])
def trimmed_pair(request):
    loaded, family = tokenized_model(request.param)
    trimmed, trim, report = trim_vocabulary(loaded, COUNTED, size=len(loaded.tokenizer) - 200)
    return loaded, trimmed, trim, report


def test_trimmed_tokenizer_never_emits_a_removed_token_and_loses_no_text(trimmed_pair):
    loaded, trimmed, trim, report = trimmed_pair
    original, new = loaded.tokenizer, trimmed.tokenizer
    assert len(new) == trim.size == trimmed.spec.vocab_size == report["kept_vocab"] < len(original)
    # every trimmed id is the kept original token of the same text: nothing else can be produced
    assert new.convert_ids_to_tokens(list(range(trim.size))) == original.convert_ids_to_tokens(list(trim.kept))
    removed = set(range(len(original))) - set(trim.kept)
    assert removed, "the trim removed nothing"
    fell_back = 0
    for text in random_texts():
        ids = new(text).input_ids
        assert all(0 <= i < trim.size for i in ids)
        assert new.unk_token_id not in ids or original.unk_token_id in original(text).input_ids
        # no text lost: the trimmed ids decode to what the original's ids decode to
        assert new.decode(ids) == original.decode(original(text).input_ids), text
        fell_back += any(i in removed for i in original(text).input_ids)
    assert fell_back > 50  # the random text really exercised removed tokens


def test_tokenization_equals_the_original_on_text_that_uses_kept_tokens_only(trimmed_pair):
    loaded, trimmed, trim, _ = trimmed_pair
    kept, compared = set(trim.kept), 0
    for text in random_texts(600, seed=1) + COUNTED:
        before = loaded.tokenizer(text).input_ids
        if set(before) <= kept:
            assert [trim.kept[i] for i in trimmed.tokenizer(text).input_ids] == before, text
            compared += 1
    assert compared >= 100


def test_full_coverage_keeps_every_counted_text_tokenized_as_before():
    loaded, _ = tokenized_model("sentencepiece")
    selection = select(loaded.tokenizer, COUNTED, coverage=1.0)
    assert selection.report["calibration_token_coverage"] == 1.0
    trimmed = trim_model(loaded, selection.trim)
    for text in COUNTED:
        assert [selection.trim.kept[i] for i in trimmed.tokenizer(text).input_ids] == loaded.tokenizer(text).input_ids


def test_sliced_model_computes_the_originals_logits_over_the_kept_ids(trimmed_pair):
    loaded, trimmed, trim, _ = trimmed_pair
    ids = torch.tensor([trimmed.tokenizer(DEFAULT_TEXTS[0]).input_ids[:24]])
    kept = torch.tensor(trim.kept)
    with torch.no_grad():
        full = loaded.model(kept[ids]).logits
        sliced = trimmed.model(ids).logits
        viewed = kept_view(loaded.model, trim)(ids).logits
    torch.testing.assert_close(sliced, full[..., kept], rtol=0, atol=1e-5)
    # the teacher over the trimmed ids: each kept token's probability plus that of the removed tokens
    # whose text starts with it
    probs = torch.softmax(full, -1)
    carried = torch.zeros_like(probs[..., kept]).index_add_(-1, torch.tensor(trim.mapped), probs)
    torch.testing.assert_close(viewed.exp(), carried, rtol=1e-5, atol=1e-7)
    assert bool((viewed.exp() >= probs[..., kept] - 1e-7).all())
    assert trim_of(trimmed.model) == trim
    assert (trimmed.model.get_input_embeddings().weight.data_ptr() == trimmed.model.get_output_embeddings().weight.data_ptr()) \
        == loaded.spec.tied_embeddings


def test_a_removed_token_maps_to_the_first_piece_the_trimmed_tokenizer_spells_it_with():
    loaded, _ = tokenized_model("byte-level")
    trimmed, trim, _ = trim_vocabulary(loaded, COUNTED, size=len(loaded.tokenizer) - 200)
    kept = set(trim.kept)
    removed = [i for i in range(trim.original_size) if i not in kept]
    checked = 0
    for token_id in removed:
        text = loaded.tokenizer.decode([token_id])
        if "\ufffd" in text:  # part of a character's bytes: no text of its own to tokenize
            continue
        assert trim.mapped[token_id] == trimmed.tokenizer(text, add_special_tokens=False).input_ids[0], text
        checked += 1
    assert checked > 0.8 * len(removed)
    assert [trim.mapped[i] for i in trim.kept] == list(range(trim.size))


def test_trimmed_model_saves_and_loads_with_its_tokenizer_and_trim(trimmed_pair, tmp_path):
    from shrink.model import save_loaded

    _, trimmed, trim, _ = trimmed_pair
    save_loaded(trimmed, tmp_path / "m")
    again = load(str(tmp_path / "m"))
    assert again.spec.vocab_size == trim.size and trim_of(again.model) == trim
    assert again.tokenizer(DEFAULT_TEXTS[2]).input_ids == trimmed.tokenizer(DEFAULT_TEXTS[2]).input_ids


def test_gguf_export_of_the_trimmed_model_passes_tokenizer_parity_in_llama_cpp(trimmed_pair, tmp_path):
    _, trimmed, trim, _ = trimmed_pair
    result = export_artifact(trimmed, "gguf", tmp_path / "m.gguf", quant="f32")
    checks = {c.name: c for c in result.verdict.checks}
    assert checks["tokenizer parity"].passed, checks["tokenizer parity"].detail
    assert result.verdict.passed and result.verdict.metrics.mean_kl < 1e-6  # f32: the same model in llama.cpp
    from gguf import GGUFReader

    assert len(GGUFReader(str(tmp_path / "m.gguf")).fields["tokenizer.ggml.tokens"].data) == trim.size


def test_a_gguf_born_models_tokenizer_keys_are_trimmed_too(tmp_path):
    """A model whose GGUF tokenizer keys are copied (the embedded model's path) gets a trimmed copy of
    them: same tokens, scores and types at the new ids, special ids renumbered."""
    from gguf import GGUFReader

    loaded, _ = tokenized_model("sentencepiece")
    export_artifact(loaded, "gguf", tmp_path / "full.gguf", quant="f32", verify=False)
    born = LoadedModel(loaded.model, loaded.tokenizer, loaded.spec, loaded.source, gguf_tokenizer=tmp_path / "full.gguf")
    trimmed, trim, _ = trim_vocabulary(born, COUNTED, size=len(loaded.tokenizer) - 250)
    assert trimmed.gguf_tokenizer is not None and trimmed.gguf_tokenizer != born.gguf_tokenizer
    result = export_artifact(trimmed, "gguf", tmp_path / "trimmed.gguf", quant="f32")
    checks = {c.name: c for c in result.verdict.checks}
    assert checks["tokenizer parity"].passed, checks["tokenizer parity"].detail
    full, small = GGUFReader(str(tmp_path / "full.gguf")).fields, GGUFReader(str(tmp_path / "trimmed.gguf")).fields
    tokens = lambda f: [bytes(f["tokenizer.ggml.tokens"].parts[i]) for i in f["tokenizer.ggml.tokens"].data]  # noqa: E731
    assert tokens(small) == [tokens(full)[i] for i in trim.kept]
    bos = lambda f: int(f["tokenizer.ggml.bos_token_id"].parts[-1][0])  # noqa: E731
    assert trim.kept[bos(small)] == bos(full)


def test_distillation_runs_from_the_full_vocabulary_teacher_and_lowers_kl(tmp_path):
    from shrink.flows.steps import Hooks, distill, distill_config

    teacher, _ = tokenized_model("byte-level")
    trimmed, trim, _ = trim_vocabulary(teacher, COUNTED, size=len(teacher.tokenizer) - 150)
    student = LoadedModel(perturbed(trimmed.model, std=0.05), trimmed.tokenizer, trimmed.spec, "student")
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(DEFAULT_TEXTS * 6))
    data = prepare(teacher, str(text), seq_len=32, tokenizer=trimmed.tokenizer)
    assert int(data.train.max()) < trim.size
    config = distill_config(steps=12, seq_len=32, batch_size=4, lr=3e-3, checkpoint_every=100)
    report = distill(student, teacher, data, config, tmp_path / "ckpt", Hooks())
    assert report.eval_after["kl"] < report.eval_before["kl"]
    mass = outside_mass(teacher.model, trim, data.evaluation)
    assert 0.0 < mass["mean"] < 1.0 and mass["positions"] == data.evaluation.numel()


def test_distilling_across_unrelated_vocabularies_is_refused(tmp_path, tiny_model):
    from shrink.flows.steps import Hooks, distill, distill_config

    teacher, student = tiny_model("llama"), tiny_model("llama", vocab_size=90)
    data = split(pack([list(range(80))] * 4, 16, None))
    with pytest.raises(ShrinkError, match="different vocabularies"):
        distill(student, teacher, data, distill_config(steps=1, seq_len=16), tmp_path / "c", Hooks())


def test_selection_refuses_sizes_it_cannot_keep_and_non_bpe_tokenizers():
    loaded, _ = tokenized_model("byte-level")
    with pytest.raises(ShrinkError, match="must be at least the 258 tokens"):
        select(loaded.tokenizer, COUNTED, size=100)
    with pytest.raises(ShrinkError, match="one of the two"):
        select(loaded.tokenizer, COUNTED, size=300, coverage=0.9)
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    unigram = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.Unigram([("a", -1.0), ("b", -2.0)], 0, False)))
    with pytest.raises(ShrinkError, match="Unigram model"):
        select(unigram, ["ab"], size=2)


def test_split_texts_holds_out_every_fifth_document():
    counted, held = split_texts([str(i) for i in range(10)])
    assert held == ["4", "9"] and len(counted) == 8


runner = CliRunner()


def test_cli_trims_a_saved_model_with_json_and_refuses_bad_sizes_in_one_sentence(tiny_bpe_model_dir, tmp_path):
    directory, text = tiny_bpe_model_dir
    out = tmp_path / "trimmed"
    result = runner.invoke(app, ["trim-vocab", str(directory), "--vocab", "400", "--data", str(text), "--target",
                                 "jetson-orin-nano", "-o", str(out), "--json"])
    fast = runner.invoke(app, ["trim-vocab", str(directory), "--vocab", "400", "--data", str(text), "--no-model-counts",
                               "-o", str(tmp_path / "fast"), "--json"])
    assert fast.exit_code == 0, fast.output
    assert json.loads(fast.stdout)["ranked_by"] == "count, then merge rank"
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["kept_vocab"] == 400 and report["spec"]["vocab_size"] == 400
    assert 0 < report["held_out"]["token_coverage"] <= 1 and 0 <= report["outside_mass_measured"]["mean"] < 1
    estimate = report["decode_estimate"]
    assert estimate["tpot_s_after_estimated"] < estimate["tpot_s_before_estimated"]
    assert load(str(out)).spec.vocab_size == 400 and Path(out, "tokenizer.json").is_file()
    for args, message in ((["--vocab", "10"], "must be at least"), ([], "one of the two"),
                          (["--vocab", "300", "--vocab-coverage", "0.9"], "one of the two"),
                          (["--vocab-coverage", "1.5"], "in (0, 1]")):
        result = runner.invoke(app, ["trim-vocab", str(directory), "--data", str(text), "-o", str(tmp_path / "x"), *args])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output


def test_verify_compares_a_trimmed_artifact_with_the_original_over_the_kept_tokens(tiny_bpe_model_dir, tmp_path):
    """`shrink verify` of a trimmed model's GGUF against the original: the artifact's tokenizer gives the
    ids, the original is read over the kept tokens (so an exact slice agrees with it), and the mass the
    original puts on removed tokens is reported."""
    from shrink.export.workflow import verify_artifact

    directory, text = tiny_bpe_model_dir
    original = load(str(directory))
    trimmed, trim, _ = trim_vocabulary(original, Path(text).read_text().split("\n\n"), size=450)
    export_artifact(trimmed, "gguf", tmp_path / "m.gguf", quant="f32")
    verdict = verify_artifact(tmp_path / "m.gguf", str(directory), min_top1=0.0, max_kl=float("inf"))
    assert verdict.passed, verdict.to_dict()
    sequences = [trimmed.tokenizer(t).input_ids[:128] for t in DEFAULT_TEXTS]
    in_pytorch = compare(TorchRunner(kept_view(original.model, trim)), TorchRunner(trimmed.model), sequences)
    assert verdict.metrics.positions == in_pytorch.positions
    assert abs(verdict.metrics.mean_kl - in_pytorch.mean_kl) < 1e-4 and in_pytorch.mean_kl > 0
    detail = {c.name: c.detail for c in verdict.checks}["trimmed vocabulary"]
    assert "removed tokens" in detail and "(measured)" in detail


def test_a_recipe_trims_distils_exports_and_verifies_against_the_original(tiny_bpe_model_dir, tmp_path):
    """trim-vocab as a recipe step: the later steps tokenize with the trimmed tokenizer and read the
    teacher over the kept tokens; the GGUF verifies against the original model."""
    from shrink.flows.recipe import parse_recipe
    from shrink.flows.run import run_recipe

    directory, text = tiny_bpe_model_dir
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[step]]\nname = "trim-vocab"\nvocab = 420\n\n[[step]]\nname = "distill"\ntokens = 256\n'
                      'batch_size = 4\n\n[[step]]\nname = "export"\nformat = "gguf"\nquant = "f32"\n\n'
                      '[[step]]\nname = "verify"\n')
    report = run_recipe(str(directory), parse_recipe(recipe), tmp_path / "run", data=str(text), seq_len=32)
    steps = {s["name"]: s for s in report["steps"]}
    assert all(s["status"] == "finished" for s in report["steps"])
    assert steps["trim-vocab"]["metrics"]["kept_vocab"] == 420
    distilled = steps["distill"]["metrics"]
    assert 0 < distilled["eval_after"]["kl"] < distilled["eval_before"]["kl"]
    checks = {c["name"] for c in steps["verify"]["metrics"]["checks"]}
    assert "trimmed vocabulary" in checks
    assert load(report["final"]["model"]).spec.vocab_size == 420

"""Calibration data: file sources, packing, deterministic splits, teacher-written corpus cached."""

import json

import pytest
import torch

from shrink.compress.data import GenerationSettings, pack, prepare, read_texts, split, teacher_texts
from shrink.errors import ShrinkError


def test_text_and_jsonl_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first document\nstill first\n\nsecond document\n\n\n")
    assert read_texts(str(tmp_path / "a.txt")) == ["first document\nstill first", "second document"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x y"}) + "\n\n" + json.dumps({"body": "z"}) + "\n")
    assert read_texts(str(tmp_path / "b.jsonl"), text_field="body") == ["x y", "z"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "does not exist"),
        ("bad.jsonl", '{"text": 1}\n', "line 1 has no string field 'text'"),
        ("broken.jsonl", '{"text": "a"}\n{oops\n', "line 2 is not JSON"),
        ("empty.txt", "\n\n", "holds no text"),
    ],
)
def test_bad_data_files(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(ShrinkError, match=message):
        read_texts(str(tmp_path / name))


def test_hub_dataset_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ShrinkError, match="no-such-org/no-such-data"):
        read_texts("no-such-org/no-such-data")


def test_pack_joins_documents_with_the_separator_and_drops_the_tail():
    packed = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=4, separator=0)
    assert packed.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    with pytest.raises(ShrinkError, match="fewer than one sequence"):
        pack([[1, 2]], seq_len=8, separator=None)


def test_split_is_deterministic_disjoint_and_complete():
    sequences = torch.arange(40).view(20, 2)
    a, b = split(sequences, seed=3), split(sequences, seed=3)
    assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("calibration", "train", "evaluation"))
    assert a.sizes() == {"calibration": 5, "train": 10, "evaluation": 5}
    rows = torch.cat([a.calibration, a.train, a.evaluation])[:, 0].tolist()
    assert sorted(rows) == list(range(0, 40, 2))
    assert not torch.equal(split(sequences, seed=4).calibration, a.calibration)


@pytest.mark.slow
def test_teacher_writes_its_own_corpus_once(embedded, tmp_path, monkeypatch):
    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path))
    settings = GenerationSettings(prompts=3, new_tokens=24)
    first = teacher_texts(embedded, settings)
    assert len(first) == 3 and all(len(t) > 20 for t in first)
    cached = list((tmp_path / "data").glob("teacher-*.jsonl"))
    assert len(cached) == 1
    assert teacher_texts(embedded, settings) == first  # read back, not sampled again
    data = prepare(embedded, seq_len=16, settings=settings)
    assert data.source == "teacher-generated" and min(data.sizes().values()) >= 1
    assert data.train.shape[1] == 16


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["alpha beta", None, "gamma"]}), tmp_path / "d.parquet")
    assert read_texts(str(tmp_path / "d.parquet"), text_field="content") == ["alpha beta", "gamma"]
    with pytest.raises(ShrinkError, match="column 'text'"):
        read_texts(str(tmp_path / "d.parquet"))


def test_the_cheap_sampler_keeps_exactly_what_transformers_warpers_keep():
    import torch
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from shrink.compress.data import GenerationSettings, _TopKTopP

    settings = GenerationSettings(temperature=0.7)
    scores = torch.randn(6, 5000, generator=torch.Generator().manual_seed(0)) * 4
    expected = scores.clone()
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(settings.top_k), TopPLogitsWarper(settings.top_p)):
        expected = warper(None, expected)
    got = _TopKTopP(settings)(None, scores.clone())
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    kept = ~torch.isinf(expected)
    assert torch.allclose(got[kept], expected[kept])
    assert 1 < int(kept[0].sum()) < settings.top_k  # top-p cut inside the k: the test can tell them apart


def test_corpus_writing_prints_progress_lines_in_a_ci_log(tiny_model, monkeypatch, caplog):
    """stderr not a terminal: lines with the rate and the time left, at least every LOG_EVERY_S seconds.
    The tokenizer has no padding token, as Llama 3's: the prompts are padded with EOS."""
    import logging
    import os

    from transformers import PreTrainedTokenizerFast

    from shrink import progress
    from shrink.compress import data
    from tiny_models import byte_level_tokenizer

    tokenizer = byte_level_tokenizer("llama3")
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    loaded = tiny_model("llama", vocab_size=len(tokenizer))
    loaded.tokenizer = tokenizer
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)  # every step, so the test need not wait 30 s
    monkeypatch.setattr("sys.stderr", open(os.devnull, "w"))  # a CI log, not a terminal
    with caplog.at_level(logging.INFO, logger="shrink"):
        texts = data._sample(loaded, data.GenerationSettings(prompts=3, new_tokens=4, batch=2))
    assert len(texts) == 3 and tokenizer.pad_token is None  # left as it was
    lines = [r.getMessage() for r in caplog.records if "teacher writing calibration text" in r.getMessage()]
    assert len(lines) == 8  # 2 batches x 4 steps
    assert "step 8/8" in lines[-1] and "tokens/s" in lines[-1] and "left (estimated)" in lines[-1]

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tiny_models, helpers


@pytest.fixture(scope="session")
def tiny_model():
    """A factory of tiny random models: tiny_model("llama", num_hidden_layers=3) -> LoadedModel.

    `name` is a family of tiny_models.tiny_configs() (or a variant such as "nemotron_h-dense"); the
    keyword arguments are set on its config (see tiny_models.build). Each model is built once per
    session; every call returns a private deep copy, so a test may prune, patch or train it freely.
    torch's random state is left as building the model would leave it (seed 0, then the weight
    draws), so whatever a test draws afterwards is the same as if it had built the model itself."""
    import copy

    import torch

    from shrink.families import spec_from_model
    from shrink.model import LoadedModel
    from tiny_models import build

    built = {}

    def make(name: str = "llama", **overrides) -> LoadedModel:
        key = (name, repr(sorted(overrides.items())))
        if key not in built:
            model = build(name, **overrides)
            built[key] = (model, spec_from_model(model), torch.get_rng_state())
        model, spec, rng = built[key]
        torch.set_rng_state(rng)
        return LoadedModel(copy.deepcopy(model), None, spec, f"tiny-{name}")

    return make


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_model):
    """A saved tiny random Llama: a real Hugging Face directory for CLI and loading tests."""
    from shrink.model import save

    return save(tiny_model("llama").model, tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def embedded():
    """The real embedded Gemma 3 270M (converted once into the shrink cache, then ~2 s a load)."""
    from shrink.model import load

    return load("gemma-3-270m")


WORDS = [f"w{i}" for i in range(99)]  # with <unk> and <eos>: the tiny configs' 101-token vocabulary


@pytest.fixture(scope="session")
def tiny_text_model_dir(tmp_path_factory):
    """A tiny random Llama with a word-level tokenizer, and a text file in its words: what the
    commands that read text (prune, distill) need, at test speed."""
    return _text_model(tmp_path_factory, "llama", "tiny-text-llama", num_hidden_layers=4)


@pytest.fixture(scope="session")
def tiny_text_nemotron_dir(tmp_path_factory):
    """The same for a dense hybrid Nemotron-H: SSM, MLP, attention, MLP, SSM blocks."""
    return _text_model(tmp_path_factory, "nemotron_h-dense", "tiny-text-nemotron")


def _text_model(tmp_path_factory, family, name, **overrides):
    import random

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    from shrink.model import save
    from tiny_models import build, peaked

    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")
    model = peaked(build(family, eos_token_id=1, **overrides))
    root = tmp_path_factory.mktemp("text-model")
    directory = save(model, root / name, tokenizer=tokenizer)
    rng = random.Random(0)
    # a little structure (repeated phrases) so that a model can learn something from it
    phrases = [" ".join(rng.choice(WORDS) for _ in range(6)) for _ in range(12)]
    documents = [" ".join(rng.choice(phrases) for _ in range(20)) for _ in range(40)]
    text = root / "corpus.txt"
    text.write_text("\n\n".join(documents))
    return directory, text


@pytest.fixture(scope="session")
def tiny_bpe_model_dir(tmp_path_factory):
    """A tiny Llama with a Llama-3-style byte-level BPE tokenizer trained here (one llama.cpp converts), saved
    as a Hugging Face directory, and text to train on: what runs that end in a GGUF need."""
    from tiny_models import save_tiny_bpe_model

    return save_tiny_bpe_model(tmp_path_factory.mktemp("hf-llama"))

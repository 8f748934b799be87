import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tiny_models, helpers


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A saved tiny random Llama: a real Hugging Face directory for CLI and loading tests."""
    import torch
    from transformers import AutoModelForCausalLM

    from shrink.model import save
    from tiny_models import tiny_configs

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_configs()["llama"]).eval()
    return save(model, tmp_path_factory.mktemp("models") / "tiny-llama")


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
    config = __import__("tiny_models").tiny_configs()["llama"]
    config.num_hidden_layers = 4
    return _text_model(tmp_path_factory, config, "tiny-text-llama")


@pytest.fixture(scope="session")
def tiny_text_nemotron_dir(tmp_path_factory):
    """The same for a dense hybrid Nemotron-H: SSM, MLP, attention, MLP, SSM blocks."""
    config = __import__("tiny_models").tiny_configs()["nemotron_h"]
    config.layers_block_type = ["linear_attention", "mlp", "full_attention", "mlp", "linear_attention"]
    return _text_model(tmp_path_factory, config, "tiny-text-nemotron")


def _text_model(tmp_path_factory, config, name):
    import random

    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from shrink.model import save

    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")
    torch.manual_seed(0)
    config.eos_token_id = 1
    model = __import__("tiny_models").peaked(AutoModelForCausalLM.from_config(config).eval())
    root = tmp_path_factory.mktemp("text-model")
    directory = save(model, root / name, tokenizer=tokenizer)
    rng = random.Random(0)
    # a little structure (repeated phrases) so that a model can learn something from it
    phrases = [" ".join(rng.choice(WORDS) for _ in range(6)) for _ in range(12)]
    documents = [" ".join(rng.choice(phrases) for _ in range(20)) for _ in range(40)]
    text = root / "corpus.txt"
    text.write_text("\n\n".join(documents))
    return directory, text

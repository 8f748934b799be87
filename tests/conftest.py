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

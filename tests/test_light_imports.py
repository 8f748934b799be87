"""Commands that need only a config import neither torch nor transformers (a second or more each).

Each check runs in a fresh interpreter, since this test process has imported both long before.
"""

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers")

# Runs the code given, then prints the heavy modules it left in sys.modules as the last line.
_PROBE = """
import io, json, sys
from contextlib import redirect_stdout
with redirect_stdout(io.StringIO()):
{code}
print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] in {heavy!r})))
"""

# A cached host measurement, so that listing the targets (host among them) has nothing to measure.
_CACHED_HOST = """
import json
from shrink.hardware import host
from shrink.storage import cache_dir
cache_dir("host").joinpath(host.fingerprint() + ".json").write_text(json.dumps({
    "version": host._CACHE_VERSION, "threads": 2, "bandwidth_GBps": 10.0, "capacity_GB": 8.0,
    "peak_tflops": {"fp32": 0.1}, "cpu": "x86_64", "measured_at": "2025-01-01T00:00:00"}))
"""


def _heavy_modules_after(code: str, cache=None) -> list[str]:
    indented = "\n".join("    " + line for line in code.strip().splitlines())
    env = None if cache is None else {**os.environ, "SHRINK_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "-c", _PROBE.format(code=indented, heavy=HEAVY)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _cli(*args: str) -> str:
    return f"""
from shrink.cli.app import app
try:
    app({list(args)!r})
except SystemExit as exit:
    assert not exit.code, exit.code
"""


_ESTIMATE = """
from shrink.hardware.profiles import get_profile
from shrink.hardware.roofline import Workload, estimate
from shrink.model import load_spec
estimate(load_spec({source!r}), get_profile("h100-sxm"), Workload(1, 512, 128))
"""


def test_estimate_path_on_a_bundled_config_imports_neither_torch_nor_transformers():
    assert _heavy_modules_after(_ESTIMATE.format(source="llama-3.1-405b")) == []


def test_estimate_path_on_a_model_directory_imports_neither_torch_nor_transformers(tmp_path):
    config = {"model_type": "qwen3", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 101}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert _heavy_modules_after(_ESTIMATE.format(source=str(tmp_path))) == []


def test_the_cli_entry_point_imports_neither_torch_nor_transformers():
    assert _heavy_modules_after("import shrink.cli.app") == []


@pytest.mark.parametrize("args", [
    ("estimate", "llama-3.1-405b", "-t", "h100-sxm"),
    ("estimate", "llama-3.1-8b", "-t", "all", "--json"),
    ("inspect", "llama-3.1-70b"),
    ("profiles",),
    ("profiles", "show", "h100"),
    ("formats",),
    ("--help",),
], ids=" ".join)
def test_config_only_commands_import_neither_torch_nor_transformers(tmp_path, args):
    assert _heavy_modules_after(_CACHED_HOST + _cli(*args), cache=tmp_path) == []


def test_the_probe_sees_torch_when_a_command_loads_weights(tiny_llama_dir):
    """The check above can fail: a command that instantiates a model is seen importing both."""
    loaded = _heavy_modules_after(_cli("inspect", str(tiny_llama_dir), "--load"))
    assert {name.split(".")[0] for name in loaded} == set(HEAVY)

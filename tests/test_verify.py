"""The CI gate: integrity, quality thresholds, baseline regression, JUnit, corrupted artifacts."""

import json

import pytest
from typer.testing import CliRunner

from shrink.cli.app import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def exported(tiny_llama_dir, tmp_path_factory):
    """tiny Llama exported twice: f32 (the baseline) and q4_0 (deliberately worse)."""
    out = tmp_path_factory.mktemp("artifacts")
    for quant in ("f32", "q4_0"):
        result = run("export", tiny_llama_dir, "-f", "gguf", "--quant", quant, "-o", out / f"{quant}.gguf", "--json")
        assert result.exit_code == 0, result.output
    return out


def test_export_writes_a_manifest_with_hashes_and_metrics(exported, tiny_llama_dir):
    manifest = json.loads((exported / "f32.gguf.manifest.json").read_text())
    assert manifest["source"]["model"] == str(tiny_llama_dir)
    assert len(manifest["source"]["weights_sha256"]) == 64
    assert manifest["files"]["f32.gguf"]["bytes"] == (exported / "f32.gguf").stat().st_size
    assert manifest["verify"]["passed"] and manifest["verify"]["metrics"]["top1_agreement"] == 1.0
    assert {"torch", "transformers", "gguf", "llama_cpp_python"} <= set(manifest["tools"])
    assert manifest["archspec"]["family"] == "llama"


def test_verify_passes_and_writes_junit(exported, tmp_path):
    junit = tmp_path / "verify.xml"
    result = run("verify", exported / "f32.gguf", "--junit", junit, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["passed"] is True
    xml = junit.read_text()
    assert 'failures="0"' in xml and 'name="integrity"' in xml


def test_baseline_catches_a_worse_artifact(exported):
    result = run("verify", exported / "q4_0.gguf", "--baseline", exported / "f32.gguf.manifest.json",
                 "--top1-tolerance", "0.001", "--kl-tolerance", "0.0001", "--json")
    assert result.exit_code == 1, result.output
    checks = {c["name"]: c["passed"] for c in json.loads(result.stdout)["checks"]}
    assert checks["integrity"] and checks["top-1 vs baseline"] is False


def test_same_artifact_passes_its_own_baseline(exported):
    result = run("verify", exported / "f32.gguf", "--baseline", exported / "f32.gguf.manifest.json")
    assert result.exit_code == 0, result.output


def _copy(exported, tmp_path, with_manifest):
    import shutil

    target = tmp_path / "f32.gguf"
    shutil.copy(exported / "f32.gguf", target)
    if with_manifest:
        shutil.copy(exported / "f32.gguf.manifest.json", tmp_path / "f32.gguf.manifest.json")
    return target


def _flip_tensor_bytes(path):
    data = bytearray(path.read_bytes())
    for offset in range(len(data) - 4000, len(data) - 3000):  # inside the last tensors' data
        data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def test_flipped_bytes_fail_the_integrity_check(exported, tmp_path):
    artifact = _copy(exported, tmp_path, with_manifest=True)
    _flip_tensor_bytes(artifact)
    result = run("verify", artifact)
    assert result.exit_code == 1
    assert "does not match its manifest" in result.output and "sha256 differs" in result.output


def test_flipped_bytes_without_manifest_fail_on_quality(exported, tmp_path, tiny_llama_dir):
    artifact = _copy(exported, tmp_path, with_manifest=False)
    _flip_tensor_bytes(artifact)
    result = run("verify", artifact, "--reference", tiny_llama_dir)
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output


def test_truncated_artifact_is_a_clear_load_error(exported, tmp_path, tiny_llama_dir):
    artifact = _copy(exported, tmp_path, with_manifest=False)
    artifact.write_bytes(artifact.read_bytes()[: artifact.stat().st_size // 2])
    result = run("verify", artifact, "--reference", tiny_llama_dir)
    assert result.exit_code == 2
    assert "corrupt" in result.output and "truncated" in result.output and "Traceback" not in result.output


def test_missing_artifact_and_missing_reference(tmp_path, exported):
    assert run("verify", tmp_path / "nope.gguf").exit_code == 2
    artifact = _copy(exported, tmp_path, with_manifest=False)
    result = run("verify", artifact)
    assert result.exit_code == 2 and "--reference" in result.output


def test_bench_measures_gguf_and_onnx_beside_the_estimate(exported, tiny_llama_dir, tmp_path):
    result = run("export", tiny_llama_dir, "-f", "onnx", "-o", tmp_path / "onnx", "--json")
    assert result.exit_code == 0, result.output
    for artifact in (exported / "f32.gguf", tmp_path / "onnx"):
        result = run("bench", artifact, "--prompt-len", "16", "--gen-len", "4", "--repeats", "2", "--json")
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["decode"]["samples"] == 8 and data["prefill"]["samples"] == 2
        assert data["measured"]["decode_s_per_token"] > 0
        assert data["estimate"]["kind"] == "estimate" and data["estimate"]["target"] == "host"
        table = run("bench", artifact, "--prompt-len", "16", "--gen-len", "4", "--repeats", "1")
        assert "measured / estimated" in table.stdout


def test_bench_rejects_nonsense(exported):
    result = run("bench", exported / "f32.gguf", "--prompt-len", "0")
    assert result.exit_code == 2 and "positive whole number" in result.output


def test_generate_refuses_an_artifact_without_a_tokenizer(exported):
    result = run("generate", exported / "f32.gguf")
    assert result.exit_code == 2 and "no tokenizer" in result.output

"""Runtime calibration: profile tables, the roofline with measured kernels, the fit, `shrink profiles calibrate`."""

import json
import tomllib
from dataclasses import replace

import pytest
from typer.testing import CliRunner

import shrink.flows.calibrate as calibrate
from shrink.cli.app import app
from shrink.errors import ShrinkError
from shrink.hardware.calibration import KernelRate, RuntimeCalibration, calibrations_from_tables
from shrink.hardware.profiles import get_profile, profile_from_dict, profile_toml
from shrink.hardware.roofline import Workload, estimate
from shrink.model import load_spec

KERNELS = RuntimeCalibration("llama.cpp", {"q8_0": KernelRate(10.0, 0.2), "q6_k": KernelRate(5.0, 0.1)},
                             decode_token_s=1e-4, decode_layer_s=2e-5, prefill_call_s=1e-3, prefill_layer_s=1e-4,
                             threads=2, source="test figures")


def test_a_format_is_costed_with_its_kernel_and_the_fixed_costs_are_added():
    profile = get_profile("jetson-orin-nano")
    spec = load_spec("gemma-3-270m").with_formats(weights="q8_0", embeddings="q8_0")
    plain = estimate(spec, profile, Workload(1, 64, 8))
    calibrated = estimate(spec, replace(profile, calibrations={"llama.cpp": KERNELS}), Workload(1, 64, 8))
    assert plain.runtime is None and calibrated.runtime == "llama.cpp"
    lm_head = next(op for op in calibrated.decode.ops if op.name == "lm_head")
    # 262,144 x 640 weights at 1.0625 bytes each, streamed at 10 GB/s, beside its activations at the profile's rate
    weights = 262_144 * 640 * 1.0625
    assert lm_head.time_s == pytest.approx(weights / 10e9, rel=0.02)
    assert calibrated.decode.overhead_s == pytest.approx(1e-4 + 18 * 2e-5)
    assert calibrated.prefill.overhead_s == pytest.approx(1e-3 + 18 * 1e-4)
    assert calibrated.tpot_s > plain.tpot_s  # 10 GB/s is slower than the Orin's 68 x 0.7
    # a runtime without measured kernels is costed as before
    onnx = estimate(spec, replace(profile, calibrations={"llama.cpp": KERNELS}), Workload(1, 64, 8), "onnxruntime")
    assert onnx.tpot_s == pytest.approx(plain.tpot_s) and onnx.runtime is None


def test_a_mixture_takes_its_parts_rates_by_share():
    rate = KERNELS.rate("q6_k*0.500000+q8_0*0.500000")
    bits = 0.5 * 6.5625 + 0.5 * 8.5
    seconds_per_byte = (0.5 * 6.5625 / bits) / 5.0 + (0.5 * 8.5 / bits) / 10.0
    assert rate.decode_GBps == pytest.approx(1 / seconds_per_byte)
    assert rate.prefill_TFLOPS == pytest.approx(1 / (0.5 / 0.1 + 0.5 / 0.2))
    assert KERNELS.rate("q4_0") is None and KERNELS.rate("q4_0*0.5+q8_0*0.5") is None


@pytest.mark.parametrize("table, words", [
    ({"llama.cpp": {**KERNELS.to_table(), "decode_layer_s": -1.0}}, "decode_layer_s' must be a number >= 0"),
    ({"llama.cpp": {**KERNELS.to_table(), "formats": {"q9_9": {"decode_GBps": 1.0, "prefill_TFLOPS": 1.0}}}}, "Unknown number format 'q9_9'"),
    ({"llama.cpp": {**KERNELS.to_table(), "formats": {"q8_0": {"decode_GBps": 0, "prefill_TFLOPS": 1.0}}}}, "must be a positive number"),
    ({"llama.cpp": {k: v for k, v in KERNELS.to_table().items() if k != "source"}}, "missing key 'runtime.llama.cpp.source'"),
    ({"llama.cpp": {**KERNELS.to_table(), "speed": 3}}, "unknown key 'runtime.llama.cpp.speed'"),
])
def test_a_bad_runtime_table_is_one_sentence(table, words):
    with pytest.raises(ShrinkError, match=words.replace("(", r"\(").replace(")", r"\)")):
        calibrations_from_tables(table, "p.toml")


def test_a_calibrated_profile_round_trips_through_its_toml():
    profile = replace(get_profile("jetson-orin-nano"), calibrations={"llama.cpp": KERNELS})
    again = profile_from_dict(tomllib.loads(profile_toml(profile, "orin-measured", "Orin, measured")), "again")
    assert again.calibrations == profile.calibrations and again.bandwidth_GBps == profile.bandwidth_GBps
    assert again.name == "orin-measured"


def _fake_timing(monkeypatch):
    """Timings that follow the file's size (a machine streaming 4 GB/s plus fixed costs), so the fit is exact
    arithmetic on real artifacts without timing noise."""
    def timed(path, threads, vocab):
        size = path.stat().st_size
        return calibrate.Timed(decode_s=3e-4 + size / 4e9, prefill_s=2e-3 + size / 1e9, spread=0.01)

    monkeypatch.setattr(calibrate, "time_artifact", timed)
    monkeypatch.setattr(calibrate, "WIDE", {"hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 4,
                                            "num_key_value_heads": 1, "head_dim": 128})
    monkeypatch.setattr(calibrate, "WIDE_DEPTH", 2)
    monkeypatch.setattr(calibrate, "SHORT_ROWS", {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 2,
                                                  "num_key_value_heads": 1, "head_dim": 128})
    monkeypatch.setattr(calibrate, "SHORT_DEPTH", 2)
    monkeypatch.setattr(calibrate, "SHORT_VOCAB", 4096)
    monkeypatch.setattr(calibrate, "others_busy_share", lambda: 0.0)


def test_the_fitted_kernels_reproduce_the_timings_they_came_from(monkeypatch, tmp_path):
    _fake_timing(monkeypatch)
    profile = get_profile("sg2042")
    kernels = calibrate.calibrate_runtime(profile, "llama.cpp", ("q8_0", "q4_0"), threads=2)
    assert set(kernels.formats) == {"q8_0", "q4_0"} and not kernels.busy
    assert kernels.decode_layer_s > 0 and kernels.decode_token_s > 0
    calibrated = replace(profile, calibrations={"llama.cpp": kernels})
    loaded = calibrate.synthetic_model(calibrate.WIDE, calibrate.WIDE_DEPTH)
    for fmt in ("q8_0", "q4_0"):
        path = calibrate.write_gguf(loaded, fmt, tmp_path, calibrate.write_gguf(loaded, "fp16", tmp_path, None))
        expected = calibrate.time_artifact(path, 2, calibrate.VOCAB)
        est = estimate(calibrate.stored_spec(path, loaded.spec), calibrated, Workload(1, calibrate.PROMPT, calibrate.GEN))
        assert est.tpot_s == pytest.approx(expected.decode_s, rel=1e-6)
        assert est.ttft_s == pytest.approx(expected.prefill_s, rel=1e-6)


def test_cli_calibrate_writes_a_profile_that_target_takes_and_caches_host(monkeypatch, tmp_path):
    _fake_timing(monkeypatch)
    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    from shrink.hardware import host

    monkeypatch.setattr(host, "others_busy_share", lambda: 0.0)
    runner = CliRunner()
    out = tmp_path / "here.toml"
    result = runner.invoke(app, ["profiles", "calibrate", "--runtime", "llama.cpp", "--formats", "q8_0", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["cached"] and list(report["runtime"]["llama.cpp"]["formats"]) == ["q8_0"]
    assert report["unstable"] == []  # the fake timings repeat exactly
    assert get_profile("host").calibration("llama.cpp").formats.keys() == {"q8_0"}  # cached for --target host
    result = runner.invoke(app, ["estimate", "gemma-3-270m", "-t", str(out), "--weights", "q8_0", "--embeddings", "q8_0"])
    assert result.exit_code == 0, result.output
    assert "llama.cpp's kernels per format, measured" in result.output

    # once the cache holds every format, a calibration of some formats leaves it whole
    complete = replace(KERNELS, formats={fmt: KERNELS.formats["q8_0"] for fmt in calibrate.LLAMA_CPP_FORMATS})
    assert calibrate.cache_host_kernels({"llama.cpp": complete})
    result = runner.invoke(app, ["profiles", "calibrate", "--runtime", "llama.cpp", "--formats", "q4_0", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["not_cached_because"].startswith("the cache holds every format of llama.cpp")
    assert get_profile("host").calibration("llama.cpp") == complete

    result = runner.invoke(app, ["profiles", "calibrate", "--runtime", "llama.cpp", "--formats", "q3_x"])
    assert result.exit_code != 0 and "Cannot calibrate llama.cpp for 'q3_x'" in result.output
    result = runner.invoke(app, ["profiles", "calibrate", "--formats", "q8_0"])  # two runtimes by default
    assert result.exit_code != 0 and "give one --runtime" in result.output
    result = runner.invoke(app, ["profiles", "calibrate", "--runtime", "tensorrt"])
    assert result.exit_code != 0 and "cannot calibrate 'tensorrt'" in result.output
    result = runner.invoke(app, ["profiles", "calibrate", "-o", str(tmp_path / "x.json")])
    assert result.exit_code != 0 and "must end in .toml" in result.output


def test_a_busy_calibration_is_flagged_and_not_cached(monkeypatch, tmp_path):
    _fake_timing(monkeypatch)
    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path))
    monkeypatch.setattr(calibrate, "others_busy_share", lambda: 0.9)
    kernels = calibrate.calibrate_runtime(get_profile("sg2042"), "llama.cpp", ("q8_0",), threads=2)
    assert kernels.busy and "BUSY" in kernels.source
    assert not calibrate.cache_host_kernels({"llama.cpp": kernels})
    assert not list(tmp_path.glob("host/kernels-*.json"))


def test_two_models_separate_the_cost_per_byte_from_the_cost_per_output():
    a, b = 1 / 10e9, 5e-9  # 10 GB/s, 5 ns per output
    rows = [(w, o, w * a + o * b) for w, o in ((300e6, 40_000), (50e6, 30_000))]
    assert calibrate._two_by_two(rows) == (pytest.approx(a), pytest.approx(b))
    # outputs that would have to cost negative time: the long-row model alone sets the rate
    assert calibrate._two_by_two([(300e6, 40_000, 0.03), (50e6, 30_000, 0.004)]) == (pytest.approx(1e-10), 0.0)


@pytest.mark.parametrize("vocabulary", ["in the format measured", "in q8_0"])
def test_the_fit_recovers_the_kernels_that_made_the_timings(monkeypatch, vocabulary):
    """Timings made by the roofline from known kernels (a cost per row and per output, the short-row model's
    vocabulary streamed in its prefill's last position) are fitted back to those kernels; a vocabulary kept
    in q8_0 is costed with q8_0's kernels, measured first, and q4_0's rows that cost nothing fit as nothing."""
    _fake_timing(monkeypatch)
    profile = get_profile("sg2042")
    q4_0 = KernelRate(7.0, 0.15, 3.0, 1.0) if vocabulary == "in the format measured" else KernelRate(7.0, 0.15, 0.0, 1.0)
    truth = RuntimeCalibration("llama.cpp", {"q8_0": KernelRate(12.0, 0.2, 5.0, 2.0), "q4_0": q4_0},
                               decode_token_s=1e-5, decode_layer_s=2e-5, prefill_call_s=1e-4, prefill_layer_s=3e-4,
                               threads=2, source="truth")
    specs, made, stored_spec = {}, calibrate.synthetic_model, calibrate.stored_spec

    def recording(*args, **kwargs):
        loaded = made(*args, **kwargs)
        specs[loaded.source] = loaded.spec
        return loaded

    def vocabulary_in_q8_0(path, spec):
        return stored_spec(path, spec).with_formats(embeddings="q8_0")

    def timed(path, threads, vocab):
        source = max((s for s in specs if path.name.startswith(s + "-")), key=len)
        stored = calibrate.stored_spec(path, specs[source])
        kernels = truth if stored.formats.weights in truth.formats else replace(truth, formats={})
        est = estimate(stored, replace(profile, calibrations={"llama.cpp": kernels}),
                       Workload(1, calibrate.PROMPT, calibrate.GEN), "llama.cpp")
        return calibrate.Timed(decode_s=est.tpot_s, prefill_s=est.ttft_s, spread=0.0)

    monkeypatch.setattr(calibrate, "synthetic_model", recording)
    monkeypatch.setattr(calibrate, "time_artifact", timed)
    if vocabulary == "in q8_0":
        monkeypatch.setattr(calibrate, "stored_spec", vocabulary_in_q8_0)
    fitted = calibrate.calibrate_runtime(profile, "llama.cpp", ("q4_0", "q8_0"), threads=2)  # measured q8_0 first
    assert fitted.decode_layer_s == pytest.approx(truth.decode_layer_s, rel=1e-3)
    for fmt, rate in truth.formats.items():
        got = fitted.formats[fmt]
        assert (got.decode_GBps, got.prefill_TFLOPS) == (pytest.approx(rate.decode_GBps, rel=1e-3),
                                                         pytest.approx(rate.prefill_TFLOPS, rel=1e-3))
        assert (got.decode_output_ns, got.prefill_output_ns) == (pytest.approx(rate.decode_output_ns, rel=1e-2, abs=1e-3),
                                                                 pytest.approx(rate.prefill_output_ns, rel=1e-2))
    if vocabulary == "in q8_0":  # without q8_0's kernels the q4_0 artifacts cannot be fitted
        with pytest.raises(ShrinkError, match="keep matrices in q8_0, whose kernels are not measured"):
            calibrate.calibrate_runtime(profile, "llama.cpp", ("q4_0",), threads=2)


def test_onnx_runtime_is_calibrated_per_stored_format_too(monkeypatch):
    _fake_timing(monkeypatch)
    def timed(path, threads, vocab):  # an ONNX artifact is a directory
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        return calibrate.Timed(decode_s=3e-4 + size / 4e9, prefill_s=2e-3 + size / 1e9, spread=0.01)

    monkeypatch.setattr(calibrate, "time_artifact", timed)
    monkeypatch.setattr(calibrate, "NARROW_DEPTHS", (1, 3))  # each ONNX export is a trace: keep them few and small
    kernels = calibrate.calibrate_runtime(get_profile("sg2042"), "onnxruntime", ("f32", "int4"), threads=2)
    assert kernels.runtime == "onnxruntime" and set(kernels.formats) == {"fp32", "onnx_int4_g32"}


def test_host_is_calibrated_once_then_read_from_the_cache(monkeypatch, tmp_path):
    from shrink.hardware import host

    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path))
    monkeypatch.setattr(host, "others_busy_share", lambda: 0.0)
    calls = []

    def calibrate_runtimes(profile, runtimes, status=None, **_):
        calls.append(runtimes)
        # what a real calibration returns: a rate for every format the runtime stores
        return {runtime: replace(KERNELS, runtime=runtime, formats={name: KernelRate(10.0, 0.2)
                                                                    for name in calibrate.RUNTIMES[runtime].stored})
                for runtime in runtimes}

    monkeypatch.setattr(calibrate, "calibrate_runtimes", calibrate_runtimes)
    first = calibrate.calibrated_host()
    assert calls == [("llama.cpp", "onnxruntime")] and set(first.calibrations) == {"llama.cpp", "onnxruntime"}
    again = calibrate.calibrated_host()
    assert len(calls) == 1 and again.calibrations == first.calibrations  # read back, not measured again


def test_every_format_the_gguf_search_can_store_is_calibrated():
    # a format without measured kernels is costed at the profile's generic peaks, far too fast
    from shrink.flows.gguf_search import VOCABULARY_TYPES
    from shrink.numformats.filetypes import COMMON, file_type

    searched = {file_type(kind).weights for kind in COMMON} | set(VOCABULARY_TYPES)
    assert searched <= set(calibrate.LLAMA_CPP_FORMATS), searched - set(calibrate.LLAMA_CPP_FORMATS)


def test_a_cached_calibration_missing_a_format_is_measured_again():
    kind = calibrate.RUNTIMES["llama.cpp"]
    rate = KernelRate(10.0, 0.1)
    whole = RuntimeCalibration("llama.cpp", {name: rate for name in kind.stored}, 1e-5, 1e-5, 1e-4, 1e-4, 2, "test")
    assert kind.complete(whole)
    older = replace(whole, formats={name: rate for name in kind.stored if name != "q4_1"})
    assert not kind.complete(older) and not kind.complete(None)


def test_every_calibrated_llama_cpp_format_can_be_written(tmp_path):
    # llama.cpp refuses some types without an importance matrix (IQ3_XXS): calibration passes a flat one
    from gguf import GGMLQuantizationType, GGUFReader

    loaded = calibrate.synthetic_model({"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
                                        "num_key_value_heads": 2}, 1)
    f16 = calibrate.write_gguf(loaded, "fp16", tmp_path, None)
    for fmt in calibrate.LLAMA_CPP_FORMATS:
        path = calibrate.write_gguf(loaded, fmt, tmp_path, f16)
        stored = {t.tensor_type.name for t in GGUFReader(path).tensors if len(t.shape) >= 2}
        ggml = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}.get(fmt, fmt.upper())
        if ggml in GGMLQuantizationType.__members__:  # a llama.cpp type (shrink's own grids are packed their way)
            assert ggml in stored, (fmt, stored)


def test_a_calibration_whose_runs_never_agreed_says_so_where_its_figures_go():
    steady = replace(KERNELS, spread=calibrate.UNSTABLE_SPREAD / 2)
    assert calibrate.flag_unstable(steady) == steady
    flagged = calibrate.flag_unstable(replace(KERNELS, spread=0.43))
    assert "UNSTABLE" in flagged.source and "43%" in flagged.source and flagged.formats == KERNELS.formats


@pytest.mark.parametrize("probe_now, stale", [(19.0, False), (12.0, True)])
def test_cached_kernels_say_when_the_machine_now_runs_at_another_speed(monkeypatch, tmp_path, probe_now, stale):
    from shrink.hardware import host
    from shrink.storage import cache_dir

    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path))
    cache_dir("host").joinpath(host.fingerprint() + ".json").write_text(json.dumps({
        "version": host._CACHE_VERSION, "threads": 2, "bandwidth_GBps": 24.0, "capacity_GB": 8.0,
        "peak_tflops": {"fp32": 0.1}, "cpu": "x86_64", "measured_at": "2026-12-05T05:14:48"}))  # no probe: not judged
    monkeypatch.setattr(host, "_probe_GBps", lambda: 20.0)
    assert calibrate.cache_host_kernels({"llama.cpp": KERNELS})
    monkeypatch.setattr(host, "_probe_GBps", lambda: probe_now)
    monkeypatch.setattr(host, "_warned", set())
    kernels = get_profile("host").calibration("llama.cpp")
    assert kernels.formats == KERNELS.formats  # still used; the source says whether to trust it
    assert ("STALE" in kernels.source) is stale


class _ScriptedRuntime:
    """A runtime whose successive timing runs take the scripted per-token seconds (decode and prefill alike)."""
    def __init__(self, per_run: list[float]):
        self.per_run = iter(per_run)

    def time(self, path, threads, prompt, gen, repeats):
        seconds = next(self.per_run)
        return [seconds] * repeats, [seconds] * repeats


@pytest.mark.parametrize("per_run, expected", [
    ([1.00, 1.04], 1.02),  # two agreeing runs: their middle, not the faster
    ([1.0, 1.5, 1.2, 2.0, 1.3, 1.9], 1.4),  # none agree within 5%: the median of all, not the fastest
])
def test_a_timing_is_the_typical_run_as_bench_reports_it(monkeypatch, tmp_path, per_run, expected):
    from shrink.export import backend as backends

    runtime = _ScriptedRuntime(per_run)
    monkeypatch.setattr(backends, "backend_for", lambda path: runtime)
    timed = calibrate.time_artifact(tmp_path / "any.gguf", 2, calibrate.VOCAB)
    assert timed.decode_s == pytest.approx(expected) and timed.prefill_s == pytest.approx(expected)

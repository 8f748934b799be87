"""Profiles: every shipped target validates and cites its numbers; bad files fail naming the key."""

import json
import os
import time

import pytest

from shrink.errors import ShrinkError
from shrink.hardware.profiles import builtin_names, get_profile, known_targets, load_profile_file, resolve_targets

REQUIRED = {"h100-sxm", "jetson-agx-orin", "jetson-orin-nano", "sg2042", "phone-sd8g3"}

GOOD = """
name = "custom"
title = "A custom board"
kind = "cpu"
runtimes = ["llama.cpp"]
[memory]
bandwidth_GBps = 50.0
capacity_GB = 16
source = "board manual"
[compute]
fp32 = 1.0
int8 = 4.0
source = "vendor sheet"
[efficiency]
bandwidth = 0.7
compute = 0.5
reasoning = "measured once"
"""


def test_required_targets_ship_and_validate():
    assert REQUIRED <= set(builtin_names())
    for name in builtin_names():
        profile = get_profile(name)
        assert profile.name == name
        assert "fp32" in profile.peak_tflops
        assert all(len(text) > 40 for text in profile.sources.values()), name
        assert len(profile.reasoning) > 40


def test_published_figures_agree_with_the_hardware_they_describe():
    """Each peak rebuilt from the part's units and clocks (a second derivation, not the TOML's number)."""
    h100 = get_profile("h100-sxm")
    # 132 SMs x 4 tensor cores x 512 dense bf16 FMA per clock x 2 FLOPs x 1.83 GHz boost; fp8 twice that
    assert h100.peak_tflops["bf16"] == pytest.approx(132 * 4 * 512 * 2 * 1.83e9 / 1e12, rel=0.01)
    assert h100.peak_tflops["fp8"] == pytest.approx(2 * h100.peak_tflops["bf16"], rel=0.01)
    # HBM3: 5 stacks x 1024 bits x 5.23 Gb/s per pin
    assert h100.bandwidth_GBps == pytest.approx(5 * 1024 * 5.23 / 8, rel=0.01)
    # LPDDR5: 256 bits at 6400 MT/s (AGX Orin), 128 bits at 4266 MT/s (Orin Nano)
    assert get_profile("jetson-agx-orin").bandwidth_GBps == pytest.approx(256 / 8 * 6.4, rel=0.01)
    assert get_profile("jetson-orin-nano").bandwidth_GBps == pytest.approx(128 / 8 * 4.266, rel=0.01)
    # Orin Nano fp16 tensor: 8 SMs x 4 tensor cores x 256 FMA per clock x 2 x 625 MHz
    assert get_profile("jetson-orin-nano").peak_tflops["fp16"] == pytest.approx(8 * 4 * 256 * 2 * 0.625e9 / 1e12, rel=0.03)


def test_aliases_and_all():
    assert get_profile("h100").name == "h100-sxm"
    assert [p.name for p in resolve_targets("all")] == known_targets()


def test_custom_profile_file(tmp_path):
    path = tmp_path / "custom.toml"
    path.write_text(GOOD)
    profile = get_profile(str(path))
    assert profile.peak_for("int4") == ("int8", 4.0)
    assert profile.peak_for("bf16") == ("fp32", 1.0)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.replace("bandwidth_GBps", "bandwith_GBps"), "unknown key 'memory.bandwith_GBps'"),
        (lambda t: t.replace('source = "board manual"\n', ""), "missing key 'memory.source'"),
        (lambda t: t.replace("fp32 = 1.0\n", ""), "missing key 'compute.fp32'"),
        (lambda t: t.replace("compute = 0.5", "compute = 1.5"), "efficiency.compute must be in"),
        (lambda t: t.replace("capacity_GB = 16", 'capacity_GB = "lots"'), "'memory.capacity_GB' must be a positive number"),
        (lambda t: t.replace('kind = "cpu"', 'kind = "tpu"'), "kind must be"),
        (lambda t: t + "\nextra = 1\n", "unknown key 'efficiency.extra'"),
        (lambda t: t.replace("[memory]", "[memory"), "not valid TOML"),
    ],
)
def test_malformed_profile_names_the_problem(tmp_path, edit, message):
    path = tmp_path / "bad.toml"
    path.write_text(edit(GOOD))
    with pytest.raises(ShrinkError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_profile_file(path)


def test_unknown_target_lists_known_ones():
    with pytest.raises(ShrinkError) as err:
        get_profile("tpu-v9")
    for name in REQUIRED | {"host"}:
        assert name in str(err.value)


def test_missing_profile_file():
    with pytest.raises(ShrinkError, match="does not exist"):
        get_profile("/no/such/profile.toml")


def test_host_profile_is_measured_and_cached(tmp_path, monkeypatch):
    from shrink.hardware import host

    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path))
    monkeypatch.setattr(host, "others_busy_share", lambda: 0.0)
    monkeypatch.setattr(host, "_probe_GBps", lambda: 10.0)  # a drift between the two calls is another test's
    first = get_profile("host")
    assert first.measured and first.bandwidth_GBps > 1 and first.peak_tflops["fp32"] > 0.001
    assert list((tmp_path / "host").glob("*.json"))
    assert get_profile("host") == first  # second call reads the cache
    data = json.loads(next((tmp_path / "host").glob("*.json")).read_text())
    assert set(data["spreads"]) == {"bandwidth", *data["peak_tflops"]} and all(v >= 0 for v in data["spreads"].values())
    assert "largest spread" in first.sources["memory"] and "largest spread" in first.sources["compute"]


@pytest.mark.parametrize("probe_now, stale", [(19.0, False), (12.0, True), (26.0, True)])
def test_a_cached_host_profile_says_when_the_machine_now_reads_memory_at_another_speed(tmp_path, monkeypatch, caplog,
                                                                                       probe_now, stale):
    from shrink.hardware import host
    from shrink.storage import cache_dir

    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path))
    cache_dir("host").joinpath(host.fingerprint() + ".json").write_text(json.dumps({
        "version": host._CACHE_VERSION, "threads": 2, "bandwidth_GBps": 24.0, "capacity_GB": 8.0, "probe_GBps": 20.0,
        "peak_tflops": {"fp32": 0.1}, "cpu": "x86_64", "measured_at": "2026-12-05T05:14:48"}))
    monkeypatch.setattr(host, "_probe_GBps", lambda: probe_now)
    monkeypatch.setattr(host, "_warned", set())
    with caplog.at_level("WARNING", logger="shrink"):
        profile = get_profile("host")
    assert profile.bandwidth_GBps == 24.0  # the cache is still what estimates use; the user is told to measure again
    assert ("STALE" in profile.sources["memory"]) is stale
    assert any("shrink profiles calibrate" in r.getMessage() for r in caplog.records) is stale


def test_a_host_timing_repeats_until_its_two_fastest_runs_agree(monkeypatch):
    from shrink.hardware import host

    clock = iter([0, 1.0, 0, 2.0, 0, 1.3, 0, 1.2, 0, 1.5, 0, 1.01])  # (start, end) of each run after the warm-up
    monkeypatch.setattr(host.time, "perf_counter", lambda: next(clock))
    rate, spread = host._stable_rate(10.0, lambda: None, repeats=5)
    # the first five runs' two fastest (1.0 and 1.2) are 20% apart; the sixth (1.01) agrees with the first
    assert rate == 10.0 and spread == pytest.approx(0.01)


def test_a_host_measurement_taken_beside_other_work_is_flagged_and_not_cached(tmp_path, monkeypatch):
    from shrink.hardware import host

    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path))
    monkeypatch.setattr(host, "others_busy_share", lambda: 0.9)
    profile = get_profile("host")
    assert "BUSY" in profile.sources["memory"] and not list((tmp_path / "host").glob("*.json"))


def test_others_busy_share_sees_a_spinning_neighbour():
    import multiprocessing

    from shrink.hardware.host import others_busy_share

    spinner = multiprocessing.get_context("spawn").Process(target=_spin, args=(3.0,))
    spinner.start()
    try:
        time.sleep(0.5)  # the child's interpreter starts
        loaded = others_busy_share(0.5)
    finally:
        spinner.join()
    assert loaded >= 0.8 / (os.cpu_count() or 1)  # the spinner alone keeps one CPU of them busy


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass

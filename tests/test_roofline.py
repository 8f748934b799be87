"""Roofline arithmetic: a hand-worked case, bounds, and the KV-cache bug classes (GQA, windows)."""

import tracemalloc

import pytest

from shrink.archspec import ArchSpec, AttentionSpec, FFNSpec, Formats, LayerSpec, SSMSpec
from shrink.errors import ShrinkError
from shrink.hardware.ops import pass_ops, visible_positions
from shrink.hardware.profiles import Profile, get_profile
from shrink.hardware.roofline import Workload, estimate, memory_needed
from shrink.model import load_spec

FP32 = Formats(weights="fp32", embeddings="fp32", activations="fp32", kv_cache="fp32", other="fp32")


def hand_spec(window=None):
    """hidden 8, one layer: 2 query heads, 1 KV head of dim 4, gated FFN 16, vocab 10, untied, all fp32."""
    layer = LayerSpec(mixer=AttentionSpec(num_heads=2, num_kv_heads=1, head_dim=4, sliding_window=window),
                      ffn=FFNSpec(kind="gated", width=16), norms=2)
    return ArchSpec(family="llama", vocab_size=10, hidden_size=8, tied_embeddings=False, layers=(layer,), formats=FP32)


def test_first_decode_step_matches_hand_computation():
    ops = {op.name: op for op in pass_ops(hand_spec(), batch=1, new=1, past=4)}
    # FLOPs, worked by hand for one token after a 4-token prompt:
    # embedding 8 | 2 norms 2*4*8=64 | qkv 2*8*(8+4+4)=256 | sdpa 5 keys*2 heads*(4*4+5)=210
    # o 2*8*8=128 | ffn.up 2*8*32=512 | ffn.down 2*16*8=256 | final norm 32 | lm_head 2*8*10=160
    expected_flops = dict(embedding=8, norm=64, **{"attn.qkv": 256, "attn.sdpa": 210, "attn.o": 128},
                          **{"ffn.up": 512, "ffn.down": 256, "final_norm": 32, "lm_head": 160})
    # Bytes at 4 bytes per element:
    # embedding row read + write 8*4*2=64 | norms 2*(read+write 64 + weight 32)=192
    # qkv weights 8*16*4=512 + act (8+16)*4=96 -> 608 | sdpa: K,V of 5 positions 5*2*4*4=160,
    #   new K,V written 32, q read + out written 2*8*4=64 -> 256 | o 256+64=320
    # ffn.up 8*32*4=1024 + (8+32)*4=160 -> 1184 | ffn.down 512+96=608 | final norm 64+32=96
    # lm_head 8*10*4=320 + (8+10)*4=72 -> 392
    expected_bytes = dict(embedding=64, norm=192, **{"attn.qkv": 608, "attn.sdpa": 256, "attn.o": 320},
                          **{"ffn.up": 1184, "ffn.down": 608, "final_norm": 96, "lm_head": 392})
    assert {k: op.flops for k, op in ops.items()} == expected_flops
    assert {k: op.bytes for k, op in ops.items()} == expected_bytes
    assert sum(expected_flops.values()) == 1626 and sum(expected_bytes.values()) == 3720


def test_visible_positions_causal_and_windowed():
    assert visible_positions(past=0, new=4, window=None) == 1 + 2 + 3 + 4
    assert visible_positions(past=0, new=4, window=2) == 1 + 2 + 2 + 2
    assert visible_positions(past=10, new=1, window=None) == 11
    assert visible_positions(past=10, new=1, window=4) == 4
    assert visible_positions(past=2, new=3, window=4) == 3 + 4 + 4


def test_sliding_window_caps_decode_kv_reads():
    full = {op.name: op for op in pass_ops(hand_spec(), 1, 1, 1000)}["attn.sdpa"]
    windowed = {op.name: op for op in pass_ops(hand_spec(window=64), 1, 1, 1000)}["attn.sdpa"]
    kv_per_position = 2 * 1 * 4 * 4  # K and V, 1 KV head of dim 4, fp32
    assert full.bytes - windowed.bytes == (1001 - 64) * kv_per_position


def test_gqa_kv_cache_uses_kv_heads_not_query_heads():
    # Llama 3.1 8B: 32 layers x 8 KV heads x 128 x (K+V) x 2 bytes = 128 KiB per token, so 1 GiB at 8192.
    spec = load_spec("llama-3.1-8b")
    _, kv, _, _ = memory_needed(spec, Workload(batch=1, prompt_len=8192 - 128, gen_len=128))
    assert kv == 2**30


def test_gemma3_kv_cache_respects_sliding_windows():
    spec = load_spec("gemma-3-270m")
    _, kv, _, _ = memory_needed(spec, Workload(batch=2, prompt_len=4000, gen_len=96))
    # 15 layers keep 512 positions, 3 keep all 4096; 1 KV head x 256 x (K+V) x 2 bytes = 1 KiB a position
    assert kv == 2 * (15 * 512 + 3 * 4096) * 1024


# Published parameter counts and the input table a decode step reads one row of (an untied one; a
# tied table is read whole, as lm_head): Llama 3.1 8B, 8,030,261,248 with an untied 128,256 x 4,096
# table; Gemma 3 270M, 268,098,176 with its 262,144 x 640 table tied.
PUBLISHED = {"llama-3.1-8b": (8_030_261_248, 128_256 * 4_096), "gemma-3-270m": (268_098_176, 0)}


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_memory_bound_decode_is_no_faster_than_reading_the_weights(model):
    spec = load_spec(model)
    params, untied_table = PUBLISHED[model]
    read = 2 * (params - untied_table)  # bf16: every weight once, but one row of an untied input table
    for name in ("h100-sxm", "jetson-orin-nano", "phone-sd8g3", "sg2042"):
        profile = get_profile(name)
        result = estimate(spec, profile, Workload(batch=1, prompt_len=128, gen_len=16))
        assert result.memory.weights_bytes == 2 * params
        assert result.decode.bound == "memory"
        assert result.tpot_s >= read / (profile.bandwidth_GBps * 1e9 * profile.bandwidth_efficiency)


def test_quantized_weights_shrink_memory_and_decode_time():
    spec = load_spec("llama-3.1-8b")
    profile = get_profile("jetson-agx-orin")
    bf16 = estimate(spec, profile)
    int4 = estimate(spec.with_formats(weights="int4_g128"), profile)
    assert int4.memory.weights_bytes < 0.4 * bf16.memory.weights_bytes
    assert int4.tpot_s < 0.5 * bf16.tpot_s


def test_missing_compute_class_is_costed_as_its_upcast():
    # a made-up part with fp16 and int8 units only, then one without the int8 units
    part = dict(name="t", title="t", kind="gpu", runtimes=(), bandwidth_GBps=1.0, capacity_GB=1.0,
                bandwidth_efficiency=1.0, compute_efficiency=1.0)
    profile = Profile(**part, peak_tflops={"fp32": 1.0, "fp16": 8.0, "int8": 16.0})
    assert profile.peak_for("fp16") == ("fp16", 8.0) and profile.peak_for("int8") == ("int8", 16.0)  # native
    assert profile.peak_for("fp8") == profile.peak_for("fp4") == profile.peak_for("bf16") == ("fp16", 8.0)
    assert profile.peak_for("int4") == ("int8", 16.0)
    no_int8 = Profile(**part, peak_tflops={"fp32": 1.0, "fp16": 8.0})
    assert no_int8.peak_for("int4") == no_int8.peak_for("int8") == ("fp16", 8.0)
    # a shipped Ampere profile lists no fp8, fp4 or int4 units, and costs them as fp16 and int8
    nano = get_profile("jetson-orin-nano")
    assert not {"fp8", "fp4", "int4"} & set(nano.peak_tflops)
    assert nano.peak_for("fp8") == nano.peak_for("fp4") == ("fp16", nano.peak_tflops["fp16"])
    assert nano.peak_for("int4") == ("int8", nano.peak_tflops["int8"])


def test_prefill_is_compute_bound_on_a_gpu_and_fit_is_reported():
    result = estimate(load_spec("llama-3.1-70b"), get_profile("jetson-orin-nano"), Workload(1, 2048, 16))
    assert result.prefill.bound == "compute"
    assert not result.memory.fits  # 141 GB of bf16 weights in 8 GB


def test_ssm_and_moe_layers_are_costed():
    ssm = SSMSpec(num_heads=8, head_dim=8, num_groups=2, state_size=16, conv_kernel=4)
    moe = FFNSpec(kind="mlp", width=24, num_experts=8, experts_per_token=2)
    spec = ArchSpec(family="nemotron_h", vocab_size=10, hidden_size=32, tied_embeddings=False, formats=FP32,
                    layers=(LayerSpec(ssm, None, 1), LayerSpec(None, moe, 1)))
    decode = {op.name: op for op in pass_ops(spec, batch=1, new=1, past=100)}
    assert decode["ssm.scan"].bytes >= 2 * 64 * 16 * 4  # fp32 state read and written once
    # one token touches exactly 2 of 8 experts: 2 x (up + down) x 32 x 24 x 4 bytes of weights
    weights = decode["moe.experts_up"].bytes + decode["moe.experts_down"].bytes
    assert weights - (2 * (32 + 24) + 2 * (24 + 32)) * 4 == pytest.approx(2 * 2 * 32 * 24 * 4)
    _, kv, state, _ = memory_needed(spec, Workload(batch=3))
    assert kv == 0 and state == 3 * (64 * 16 * 4 + (64 + 2 * 2 * 16) * 3 * 4)


def test_405b_estimates_from_config_alone_without_allocating_weights():
    spec = load_spec("llama-3.1-405b")
    tracemalloc.start()
    result = estimate(spec, get_profile("h100-sxm"), Workload(batch=1, prompt_len=2048, gen_len=256))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 * 2**20  # the bf16 weights alone would be 811 GB
    assert result.memory.weights_bytes == pytest.approx(405_853_388_800 * 2, rel=1e-9)
    assert not result.memory.fits


@pytest.mark.parametrize("field, value", [("batch", 0), ("prompt_len", -5), ("gen_len", 1.5)])
def test_nonsense_workload_is_refused(field, value):
    with pytest.raises(ShrinkError, match="positive whole number"):
        Workload(**{field: value})


def test_unknown_format_is_refused():
    with pytest.raises(ShrinkError, match="Unknown number format 'int3'"):
        load_spec("llama-3.1-8b").with_formats(weights="int3")


def test_efficiency_scales_time():
    spec = hand_spec()
    base = dict(name="t", title="t", kind="cpu", runtimes=(), bandwidth_GBps=1.0, capacity_GB=1.0,
                peak_tflops={"fp32": 1.0}, compute_efficiency=1.0)
    fast = estimate(spec, Profile(**base, bandwidth_efficiency=1.0), Workload(1, 4, 1))
    slow = estimate(spec, Profile(**base, bandwidth_efficiency=0.5), Workload(1, 4, 1))
    assert slow.tpot_s == pytest.approx(2 * fast.tpot_s)
    assert fast.tpot_s == pytest.approx(3720 / 1e9)  # memory-bound: every op moves bytes at 1 GB/s


def test_a_graph_with_every_prompt_positions_logits_pays_the_vocabulary_projection_per_position():
    from dataclasses import replace as _replace

    spec = load_spec("gemma-3-270m")
    profile = get_profile("jetson-orin-nano")
    last = estimate(spec, profile, Workload(1, 256, 4))
    every = estimate(_replace(spec, prompt_logits="all"), profile, Workload(1, 256, 4))
    head_last, head_every = (next(op for op in e.prefill.ops if op.name == "lm_head") for e in (last, every))
    assert head_every.flops == 256 * head_last.flops
    assert every.ttft_s > last.ttft_s + 0.9 * (head_every.time_s - head_last.time_s) > last.ttft_s
    assert every.tpot_s == pytest.approx(last.tpot_s)  # decode: one position either way

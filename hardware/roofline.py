"""Roofline estimator: operator costs (hardware/ops.py) + a profile -> time, throughput and memory.

Each operator takes max(FLOPs / achievable compute, bytes / achievable bandwidth), where the
achievable figures are the profile's peaks times its efficiency factors and the compute peak is
the one for the operator's compute class (or its upcast when the hardware lacks it). Every figure
this module returns is an estimate; nothing here runs the model.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

from shrink.archspec import ArchSpec, AttentionSpec, FFNSpec, SSMSpec
from shrink.errors import ShrinkError
from shrink.hardware.calibration import RuntimeCalibration
from shrink.hardware.ops import Op, pass_ops, prefill_ops, weight_bytes
from shrink.hardware.profiles import Profile
from shrink.numformats import get_format


@dataclass(frozen=True)
class Workload:
    batch: int = 1
    prompt_len: int = 512
    gen_len: int = 128

    def __post_init__(self) -> None:
        for name in ("batch", "prompt_len", "gen_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ShrinkError(f"Workload {name.replace('_', '-')} must be a positive whole number, got {value!r}.")


@dataclass
class OpCost:
    name: str
    kind: str
    count: int  # instances summed (one per layer that has it)
    flops: float
    bytes: float
    compute_class: str  # the class whose peak was used (after upcasting)
    time_s: float
    bound: str  # "compute" or "memory": which limit sets most of this operator's time

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else float("inf")


@dataclass
class PhaseEstimate:
    name: str
    time_s: float
    flops: float
    bytes: float
    bound: str
    ops: list[OpCost]
    overhead_s: float = 0.0  # the runtime's fixed costs per call and per layer (measured), inside time_s


@dataclass
class MemoryEstimate:
    weights_bytes: float
    kv_cache_bytes: float
    ssm_state_bytes: float
    activation_bytes: float  # prefill peak, a rough upper figure
    total_bytes: float
    capacity_bytes: float
    fits: bool


@dataclass
class Estimate:
    model: str
    target: str
    target_title: str
    workload: Workload
    formats: dict[str, str]
    runtime: str | None  # whose measured kernels costed it (None: the profile's peaks alone)
    prefill: PhaseEstimate
    decode: PhaseEstimate  # one decode step, averaged over the generated tokens
    memory: MemoryEstimate
    ttft_s: float = field(init=False)
    tpot_s: float = field(init=False)
    prefill_tokens_per_s: float = field(init=False)
    decode_tokens_per_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.ttft_s = self.prefill.time_s
        self.tpot_s = self.decode.time_s
        self.prefill_tokens_per_s = self.workload.batch * self.workload.prompt_len / self.prefill.time_s
        self.decode_tokens_per_s = self.workload.batch / self.decode.time_s

    def to_dict(self) -> dict:
        data = asdict(self)
        data["kind"] = "estimate"  # every figure here is a roofline estimate, none is measured
        return data


def _cost(op: Op, profile: Profile, kernels: RuntimeCalibration | None) -> tuple[str, float, float]:
    """(class, compute time, memory time) of one operator. A matmul whose weight format the runtime's
    kernels were measured for computes at their prefill rate plus their cost per output element, and
    streams its weights at their decode rate plus their cost per weight row (a decode step's output
    element; activations at the profile's bandwidth); everything else at the profile's achievable peaks."""
    cls, tflops = profile.peak_for(op.compute)
    bandwidth = profile.bandwidth_GBps * 1e9 * profile.bandwidth_efficiency
    rate = kernels.rate(op.weight_format) if kernels is not None and op.kind == "matmul" else None
    if rate is not None:
        return (cls, op.flops / (rate.prefill_TFLOPS * 1e12) + op.outputs * rate.prefill_output_ns * 1e-9,
                op.weights / (rate.decode_GBps * 1e9) + op.rows * rate.decode_output_ns * 1e-9
                + (op.bytes - op.weights) / bandwidth)
    t_compute = op.flops / (tflops * 1e12 * profile.compute_efficiency)
    t_memory = op.bytes / bandwidth
    return cls, t_compute, t_memory


def _phase(name: str, steps: list[list[Op]], profile: Profile, kernels: RuntimeCalibration | None = None,
           overhead_s: float = 0.0) -> PhaseEstimate:
    """Cost every op of every step; report per-op figures averaged over the steps, plus the runtime's
    fixed costs (`overhead_s`, measured; 0 without a calibration)."""
    cache: dict[Op, tuple[str, float, float]] = {}
    grouped: dict[str, dict] = defaultdict(lambda: {"count": 0, "flops": 0.0, "bytes": 0.0, "tc": 0.0, "tm": 0.0, "t": 0.0})
    for ops in steps:
        # identical layers share their Op objects (ops.layer_ops is cached): cost each once, times its count
        unique = {id(op): op for op in ops}
        for key, k in Counter(map(id, ops)).items():
            op = unique[key]
            if op not in cache:
                cache[op] = _cost(op, profile, kernels)
            cls, tc, tm = cache[op]
            g = grouped[op.name]
            g.update(kind=op.kind, cls=cls)
            g["count"] += k
            g["flops"] += k * op.flops
            g["bytes"] += k * op.bytes
            g["tc"] += k * tc if tc >= tm else 0.0
            g["tm"] += k * tm if tm > tc else 0.0
            g["t"] += k * max(tc, tm)
    n = len(steps)
    costs = [
        OpCost(
            name=op_name,
            kind=g["kind"],
            count=g["count"] // n,
            flops=g["flops"] / n,
            bytes=g["bytes"] / n,
            compute_class=g["cls"],
            time_s=g["t"] / n,
            bound="compute" if g["tc"] >= g["tm"] else "memory",
        )
        for op_name, g in grouped.items()
    ]
    compute_time = sum(g["tc"] for g in grouped.values())
    memory_time = sum(g["tm"] for g in grouped.values())
    return PhaseEstimate(
        name=name,
        time_s=sum(c.time_s for c in costs) + overhead_s,
        flops=sum(c.flops for c in costs),
        bytes=sum(c.bytes for c in costs),
        bound="compute" if compute_time >= memory_time else "memory",
        ops=costs,
        overhead_s=overhead_s,
    )


def memory_needed(spec: ArchSpec, workload: Workload) -> tuple[float, float, float, float]:
    """(weights, KV cache, SSM state, activations) in bytes."""
    f = spec.formats
    kv, act, state = (get_format(x).bytes_per_element for x in (f.kv_cache, f.activations, f.ssm_state))
    weights = weight_bytes(spec)
    batch, context = workload.batch, workload.prompt_len + workload.gen_len
    kv_cache = ssm_state = 0.0
    widest = 2 * spec.hidden_size
    for layer in spec.layers:
        m = layer.mixer
        if isinstance(m, AttentionSpec):
            if m.owns_kv:
                kv_cache += batch * min(context, m.sliding_window or context) * 2 * m.num_kv_heads * m.head_dim * kv
            widest = max(widest, (m.num_heads + 2 * m.num_kv_heads) * m.head_dim)
        elif isinstance(m, SSMSpec):
            ssm_state += batch * (m.inner * m.state_size * state + m.conv_dim * (m.conv_kernel - 1) * act)
            widest = max(widest, m.in_proj_out)
        if isinstance(layer.ffn, FFNSpec):
            widest = max(widest, (layer.ffn.matrices - 1) * max(layer.ffn.width, layer.ffn.shared_width))
    activations = batch * workload.prompt_len * (spec.hidden_size + widest) * act + batch * spec.vocab_size * 4
    return weights, kv_cache, ssm_state, activations


def estimate(spec: ArchSpec, profile: Profile, workload: Workload | None = None, runtime: str | None = None) -> Estimate:
    """The roofline of `spec` on `profile`, with the measured kernels of `runtime` (default: the target's
    first runtime) where the profile has them."""
    workload = workload or Workload()
    batch, prompt = workload.batch, workload.prompt_len
    kernels = profile.calibration(runtime)
    layers = len(spec.layers)
    prefill_fixed = kernels.prefill_call_s + layers * kernels.prefill_layer_s if kernels else 0.0
    decode_fixed = kernels.decode_token_s + layers * kernels.decode_layer_s if kernels else 0.0
    prefill = _phase("prefill", [prefill_ops(spec, batch, prompt)], profile, kernels, prefill_fixed)
    decode_steps = [pass_ops(spec, batch, 1, prompt + i) for i in range(workload.gen_len)]
    decode = _phase("decode", decode_steps, profile, kernels, decode_fixed)
    weights, kv_cache, ssm_state, activations = memory_needed(spec, workload)
    total = weights + kv_cache + ssm_state + activations
    capacity = profile.capacity_GB * 1e9
    return Estimate(
        model=spec.name or spec.family,
        target=profile.name,
        target_title=profile.title,
        workload=workload,
        formats=asdict(spec.formats),
        runtime=kernels.runtime if kernels else None,
        prefill=prefill,
        decode=decode,
        memory=MemoryEstimate(weights, kv_cache, ssm_state, activations, total, capacity, total <= capacity),
    )

"""A runtime's own kernels on one machine, as measured by `shrink profiles calibrate`: per stored format,
the rate its matrix-vector products stream weights at (decode) and the rate its matrix products compute
at (prefill), and the fixed costs per token and per layer that no byte or FLOP count explains.

The roofline assumes every runtime reaches the machine's bandwidth; llama.cpp's quantized CPU kernels are
limited by dequantization instead, each format by its own amount. A profile carries these figures in a
`[runtime."NAME"]` table; `roofline.estimate` uses them for the runtime that will run the artifact and
falls back to the profile's bandwidth and compute for a format or runtime without them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from shrink.errors import ShrinkError
from shrink.numformats.registry import get_format, mixture_parts


@dataclass(frozen=True)
class KernelRate:
    decode_GBps: float  # weight bytes per second of the runtime's matrix-vector product, 1e9 bytes/s
    prefill_TFLOPS: float  # FLOPs per second of its matrix product over a prompt, 1e12/s
    # the cost of each output element beyond its share of bytes or FLOPs (a dot product's setup and final
    # sum): what makes short rows (a 640-wide model's) slower per byte than long ones. In a decode step
    # an output is a weight row streamed; a prefill's matrix product pays it per token and row.
    decode_output_ns: float = 0.0
    prefill_output_ns: float = 0.0


@dataclass(frozen=True)
class RuntimeCalibration:
    runtime: str
    formats: dict[str, KernelRate]  # registry format name -> measured rates
    decode_token_s: float  # per decode step, whatever the model (the runtime's call, sampling-free)
    decode_layer_s: float  # per layer per decode step (operator launches, threads meeting)
    prefill_call_s: float  # per prefill
    prefill_layer_s: float  # per layer per prefill
    threads: int
    source: str  # how and when the figures were taken
    spread: float = 0.0  # largest relative spread of the repeated measurements behind them
    busy: bool = False  # measured while other work was running: not to be trusted or cached

    def rate(self, fmt: str | None) -> KernelRate | None:
        """The rates of a stored format; a mixture's are its parts' combined by element share (time adds:
        bytes over rate, FLOPs over rate); None when any part was not measured."""
        if fmt is None:
            return None
        parts = mixture_parts(fmt)
        if any(part.name not in self.formats for part, _ in parts):
            return None
        if len(parts) == 1:
            return self.formats[parts[0][0].name]
        bits = sum(part.bits_per_element * share for part, share in parts)
        rates = [(self.formats[part.name], share) for part, share in parts]
        seconds_per_byte = sum(part.bits_per_element * share / bits / rate.decode_GBps
                               for (part, share), (rate, _) in zip(parts, rates))
        seconds_per_flop = sum(share / rate.prefill_TFLOPS for rate, share in rates)
        return KernelRate(1 / seconds_per_byte, 1 / seconds_per_flop,
                          sum(share * rate.decode_output_ns for rate, share in rates),
                          sum(share * rate.prefill_output_ns for rate, share in rates))

    def to_table(self) -> dict[str, Any]:
        """The `[runtime."NAME"]` table of a profile TOML."""
        table = {k: v for k, v in asdict(self).items() if k not in ("runtime", "formats")}
        table["formats"] = {name: asdict(rate) for name, rate in sorted(self.formats.items())}
        return table


_NUMBERS = ("decode_token_s", "decode_layer_s", "prefill_call_s", "prefill_layer_s")


def calibrations_from_tables(tables: Any, where: str) -> dict[str, RuntimeCalibration]:
    """Validate a profile's `runtime` section: one table per runtime, every number non-negative, every
    format a known one with positive rates; a mistake is one sentence naming the key."""
    if not isinstance(tables, dict):
        raise ShrinkError(f"Profile '{where}': 'runtime' must be a table of runtimes.")
    found = {}
    for runtime, table in tables.items():
        prefix = f"runtime.{runtime}"
        if not isinstance(table, dict):
            raise ShrinkError(f"Profile '{where}': '{prefix}' must be a table.")
        known = {*_NUMBERS, "threads", "source", "spread", "busy", "formats"}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ShrinkError(f"Profile '{where}': unknown key '{prefix}.{unknown[0]}' (known: {', '.join(sorted(known))}).")
        for key in (*_NUMBERS, "threads", "source", "formats"):
            if key not in table:
                raise ShrinkError(f"Profile '{where}': missing key '{prefix}.{key}'.")
        for key in (*_NUMBERS, "spread"):
            value = table.get(key, 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ShrinkError(f"Profile '{where}': '{prefix}.{key}' must be a number >= 0, got {value!r}.")
        if not isinstance(table["threads"], int) or table["threads"] < 1:
            raise ShrinkError(f"Profile '{where}': '{prefix}.threads' must be a positive whole number.")
        if not isinstance(table["source"], str) or not table["source"].strip():
            raise ShrinkError(f"Profile '{where}': '{prefix}.source' must say how the figures were measured.")
        found[runtime] = RuntimeCalibration(
            runtime=runtime, formats=_rates(table["formats"], where, prefix + ".formats"),
            **{key: float(table[key]) for key in _NUMBERS}, threads=table["threads"], source=table["source"],
            spread=float(table.get("spread", 0.0)), busy=bool(table.get("busy", False)))
    return found


_RATE_KEYS = ("decode_GBps", "prefill_TFLOPS", "decode_output_ns", "prefill_output_ns")


def _rates(formats: Any, where: str, prefix: str) -> dict[str, KernelRate]:
    if not isinstance(formats, dict) or not formats:
        raise ShrinkError(f"Profile '{where}': '{prefix}' must be a table of formats with their rates.")
    rates = {}
    for name, rate in formats.items():
        fmt = get_format(name)  # an unknown format is the registry's own sentence
        if not isinstance(rate, dict) or not {"decode_GBps", "prefill_TFLOPS"} <= set(rate) <= set(_RATE_KEYS):
            raise ShrinkError(f"Profile '{where}': '{prefix}.{name}' must hold decode_GBps and prefill_TFLOPS "
                              "(and optionally decode_output_ns, prefill_output_ns).")
        for key, value in rate.items():
            least = 0 if key.endswith("_ns") else None  # a rate must be positive, a per-element cost may be 0
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (least is None and value == 0):
                raise ShrinkError(f"Profile '{where}': '{prefix}.{name}.{key}' must be a positive number, got {value!r}.")
        rates[fmt.name] = KernelRate(**{key: float(value) for key, value in rate.items()})
    return rates


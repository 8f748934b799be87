"""Roofline chart: the target's achievable ceilings with the model's operators placed on them."""

from __future__ import annotations

from pathlib import Path

from shrink.errors import ShrinkError
from shrink.hardware.profiles import Profile
from shrink.hardware.roofline import Estimate, OpCost
from shrink.storage import atomic_write_bytes


def roofline_chart(estimate: Estimate, profile: Profile, path: str | Path) -> Path:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise ShrinkError(f"--plot needs a .png, .svg or .pdf file name, not '{path.name}'.")
    bandwidth = profile.bandwidth_GBps * 1e9 * profile.bandwidth_efficiency
    ops = [op for op in estimate.prefill.ops + estimate.decode.ops if op.flops > 0 and op.bytes > 0]
    lo = min(min(op.intensity for op in ops) / 3, 0.1)
    hi = max(max(op.intensity for op in ops) * 3, 1e4)

    fig, ax = plt.subplots(figsize=(10, 6.5), dpi=120)
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    for cls, tflops in sorted(profile.peak_tflops.items(), key=lambda kv: kv[1]):
        peak = tflops * 1e12 * profile.compute_efficiency
        ax.plot(xs, [min(bandwidth * x, peak) for x in xs], lw=1.2, label=f"{cls} ceiling ({tflops * profile.compute_efficiency:g} T/s achievable)")
    for phase, marker, items in (("prefill", "o", estimate.prefill.ops), ("decode", "^", estimate.decode.ops)):
        shown = [op for op in items if op.flops > 0 and op.bytes > 0]
        ax.scatter([op.intensity for op in shown], [_achieved(op) for op in shown], marker=marker, s=46,
                   edgecolors="black", linewidths=0.5, zorder=3, label=f"{phase} operators")
        for op in _largest(shown):
            ax.annotate(f"{op.name} ({phase})", (op.intensity, _achieved(op)), textcoords="offset points",
                        xytext=(5, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP per byte moved)")
    ax.set_ylabel("attainable FLOP/s (estimated)")
    w = estimate.workload
    ax.set_title(
        f"Roofline (estimated): {estimate.model} on {profile.name}\n"
        f"batch {w.batch}, prompt {w.prompt_len}, generate {w.gen_len}; weights {estimate.formats['weights']}; "
        f"TTFT {estimate.ttft_s * 1e3:.2f} ms, {estimate.tpot_s * 1e3:.2f} ms/token",
        fontsize=10,
    )
    ax.axvline(profile.peak_for("bf16")[1] * 1e12 * profile.compute_efficiency / bandwidth, color="grey", ls=":", lw=0.8)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lstrip(".").lower())
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _achieved(op: OpCost) -> float:
    return op.flops / op.time_s if op.time_s else 0.0


def _largest(ops: list[OpCost], n: int = 5) -> list[OpCost]:
    """Label only the operators that take most of the time, so the chart stays readable."""
    return sorted(ops, key=lambda op: op.time_s, reverse=True)[:n]

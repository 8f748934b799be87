"""Roofline chart: the target's achievable ceilings with the model's operators placed on them.

matplotlib (a second or more to import here) is imported only when a chart is drawn.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from shrink.errors import ShrinkError
from shrink.hardware.profiles import Profile
from shrink.hardware.roofline import Estimate, OpCost
from shrink.storage import atomic_write_bytes


def roofline_chart(estimate: Estimate, profile: Profile, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = _chart_path(path)
    bandwidth = profile.bandwidth_GBps * 1e9 * profile.bandwidth_efficiency
    ops = [op for op in estimate.prefill.ops + estimate.decode.ops if op.flops > 0 and op.bytes > 0]
    lo = min(min(op.intensity for op in ops) / 3, 0.1)
    hi = max(max(op.intensity for op in ops) * 3, 1e4)

    fig, ax = plt.subplots(figsize=(10, 6.5), dpi=120)
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    for tflops, classes in _ceilings(profile):
        peak = tflops * 1e12 * profile.compute_efficiency
        ax.plot(xs, [min(bandwidth * x, peak) for x in xs], lw=1.2,
                label=f"{'/'.join(classes)} ceiling: {tflops * profile.compute_efficiency:.3g} TFLOP/s achievable")
    for phase, marker, items in (("prefill", "o", estimate.prefill.ops), ("decode", "^", estimate.decode.ops)):
        shown = [op for op in items if op.flops > 0 and op.bytes > 0]
        ax.scatter([op.intensity for op in shown], [_achieved(op) for op in shown], marker=marker, s=46,
                   edgecolors="black", linewidths=0.5, zorder=3, label=f"{phase} operators")
        offset = (6, 6) if phase == "prefill" else (6, -12)
        for (x, y), names in _clusters(shown).items():
            ax.annotate(f"{', '.join(names)} ({phase})", (x, y), textcoords="offset points", xytext=offset, fontsize=7)
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
    ridge = profile.peak_for("bf16")[1] * 1e12 * profile.compute_efficiency / bandwidth
    ax.axvline(ridge, color="grey", ls=":", lw=0.8)
    ax.annotate(f"bf16 ridge: {ridge:.0f} FLOP/byte", (ridge, ax.get_ylim()[0]), textcoords="offset points",
                xytext=(4, 8), fontsize=7, color="grey")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def _chart_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise ShrinkError(f"--plot needs a .png, .svg or .pdf file name, not '{path.name}'.")
    return path


def _save(fig, path: Path) -> Path:
    """Render in memory, then write atomically (no half-written chart on a failure)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lstrip(".").lower())
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _achieved(op: OpCost) -> float:
    return op.flops / op.time_s if op.time_s else 0.0


def _ceilings(profile: Profile) -> list[tuple[float, list[str]]]:
    """Compute ceilings, merging classes with the same peak (fp16 and bf16 usually) into one line."""
    merged: dict[float, list[str]] = {}
    for cls, tflops in profile.peak_tflops.items():
        merged.setdefault(tflops, []).append(cls)
    return sorted(merged.items())


def _clusters(ops: list[OpCost]) -> dict[tuple[float, float], list[str]]:
    """Operators that land on nearly the same point share one label, so labels do not overprint."""
    groups: dict[tuple[int, int], list[OpCost]] = {}
    for op in ops:
        key = (round(math.log10(op.intensity) * 5), round(math.log10(max(_achieved(op), 1.0)) * 5))
        groups.setdefault(key, []).append(op)
    return {(group[0].intensity, _achieved(group[0])): [op.name for op in group] for group in groups.values()}


def pareto_chart(points: list[dict], budget_s: float | None, title: str, path: str | Path) -> Path:
    """Predicted quality (KL, lower is better) against estimated time per token for every candidate;
    `points` hold label, tpot_s, kl, fits and chosen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = _chart_path(path)
    shown = [p for p in points if p["kl"] is not None]
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    for fits, colour, name in ((True, "tab:green", "within budget"), (False, "tab:grey", "misses the budget")):
        group = [p for p in shown if p["fits"] == fits and not p["chosen"]]
        ax.scatter([p["tpot_s"] * 1e3 for p in group], [p["kl"] for p in group], c=colour, s=36, label=name,
                   edgecolors="black", linewidths=0.4, zorder=3)
    front = [p for p in shown if not any(q["tpot_s"] <= p["tpot_s"] and q["kl"] <= p["kl"] and q is not p
                                          and (q["tpot_s"], q["kl"]) != (p["tpot_s"], p["kl"]) for q in shown)]
    for p in front:  # only the Pareto front is labelled: the rest would overprint
        ax.annotate(p["label"], (p["tpot_s"] * 1e3, p["kl"]), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.plot(*zip(*sorted((p["tpot_s"] * 1e3, p["kl"]) for p in front)), color="tab:green", lw=0.8, alpha=0.6,
            label="Pareto front")
    chosen = [p for p in shown if p["chosen"]]
    if chosen:
        ax.scatter([chosen[0]["tpot_s"] * 1e3], [chosen[0]["kl"]], marker="*", s=260, c="tab:red",
                   edgecolors="black", zorder=4, label=f"chosen: {chosen[0]['label']}")
    if budget_s is not None:
        ax.axvline(budget_s * 1e3, color="tab:red", ls="--", lw=1, label=f"budget {budget_s * 1e3:.3g} ms/token")
    ax.set_yscale("symlog", linthresh=0.01)
    ax.set_ylim(bottom=0, top=max([p["kl"] for p in shown] + [0.01]) * 2)
    ax.set_xlabel("time per output token, ms (estimated, roofline)")
    ax.set_ylabel("predicted KL to the original (proxy, measured parts; lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.25)
    ax.legend(fontsize=8)
    return _save(fig, path)

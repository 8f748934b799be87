"""Hardware profiles: load and validate the TOML files that describe a deployment target.

A profile is a handful of numbers, each with its source: dense peak compute per compute class the
hardware executes natively, memory bandwidth and capacity, and the achievable fraction of each.
A compute class the hardware lacks is costed as its upcast (numformats.UPCAST), so a profile lists
only what the silicon really does.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field, replace
from importlib.resources import files
from pathlib import Path
from typing import Any

from shrink.errors import ShrinkError
from shrink.hardware.calibration import RuntimeCalibration, calibrations_from_tables
from shrink.hardware.host import host_profile_data
from shrink.numformats import COMPUTE_CLASSES, UPCAST

# Short names people type, mapped to the profile they mean.
ALIASES = {
    "h100": "h100-sxm",
    "jetson-orin": "jetson-agx-orin",
    "orin-nano": "jetson-orin-nano",
    "riscv": "sg2042",
    "phone": "phone-sd8g3",
}


@dataclass(frozen=True)
class Profile:
    name: str
    title: str
    kind: str  # "gpu" or "cpu"
    runtimes: tuple[str, ...]  # runtimes that execute shrink's artifacts on this target
    bandwidth_GBps: float  # peak memory bandwidth, 1e9 bytes/s
    capacity_GB: float  # memory available to the model, 1e9 bytes
    peak_tflops: dict[str, float]  # dense peak per compute class, 1e12 ops/s
    bandwidth_efficiency: float  # achievable fraction of peak bandwidth
    compute_efficiency: float  # achievable fraction of peak compute
    sources: dict[str, str] = field(default_factory=dict)  # section -> where its numbers come from
    reasoning: str = ""  # why the efficiency factors have their values
    measured: bool = False  # True for `host`: numbers measured on this machine
    path: str | None = None
    calibrations: dict[str, RuntimeCalibration] = field(default_factory=dict)  # runtime -> its kernels measured

    def calibration(self, runtime: str | None) -> RuntimeCalibration | None:
        """The measured kernels of `runtime` (None: the target's first runtime) on this target, if any."""
        return self.calibrations.get(runtime or (self.runtimes[0] if self.runtimes else ""))

    def peak_for(self, compute_class: str) -> tuple[str, float]:
        """(class actually used, TFLOPS): the class itself if native, else its nearest upcast."""
        current = compute_class
        while current not in self.peak_tflops:
            if current not in UPCAST:
                raise ShrinkError(f"Profile '{self.name}' has no peak for {compute_class} nor any upcast of it.")
            current = UPCAST[current]
        return current, self.peak_tflops[current]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "kind": self.kind,
            "runtimes": list(self.runtimes),
            "memory": {"bandwidth_GBps": self.bandwidth_GBps, "capacity_GB": self.capacity_GB},
            "compute_tflops": dict(self.peak_tflops),
            "efficiency": {"bandwidth": self.bandwidth_efficiency, "compute": self.compute_efficiency},
            "sources": dict(self.sources),
            "reasoning": self.reasoning,
            "measured": self.measured,
            "path": self.path,
            "runtime": {name: c.to_table() for name, c in self.calibrations.items()},
        }


_SCHEMA: dict[str, Any] = {
    "name": str,
    "title": str,
    "kind": str,
    "runtimes": list,
    "memory": {"bandwidth_GBps": float, "capacity_GB": float, "source": str},
    "compute": {**{c: float for c in COMPUTE_CLASSES}, "source": str},
    "efficiency": {"bandwidth": float, "compute": float, "reasoning": str},
}
_OPTIONAL = {"compute." + c for c in COMPUTE_CLASSES if c != "fp32"}


def builtin_dir() -> Path:
    return Path(str(files("shrink") / "profiles"))


def builtin_names() -> list[str]:
    return sorted(p.stem for p in builtin_dir().glob("*.toml"))


def known_targets() -> list[str]:
    return [*builtin_names(), "host"]


def load_profile_file(path: str | Path) -> Profile:
    path = Path(path)
    if not path.is_file():
        raise ShrinkError(f"Profile file '{path}' does not exist.")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ShrinkError(f"Profile '{path}' is not valid TOML: {err}.") from None
    return profile_from_dict(data, where=str(path))


def profile_from_dict(data: dict[str, Any], where: str) -> Profile:
    data = dict(data)
    calibrations = calibrations_from_tables(data.pop("runtime", {}), where)
    _check(data, _SCHEMA, where, prefix="")
    memory, compute, eff = data["memory"], data["compute"], data["efficiency"]
    if data["kind"] not in ("gpu", "cpu"):
        raise ShrinkError(f"Profile '{where}': kind must be 'gpu' or 'cpu', not '{data['kind']}'.")
    for key in ("bandwidth", "compute"):
        if not 0 < eff[key] <= 1:
            raise ShrinkError(f"Profile '{where}': efficiency.{key} must be in (0, 1], got {eff[key]}.")
    peaks = {c: float(compute[c]) for c in COMPUTE_CLASSES if c in compute}
    return Profile(
        name=data["name"],
        title=data["title"],
        kind=data["kind"],
        runtimes=tuple(data["runtimes"]),
        bandwidth_GBps=float(memory["bandwidth_GBps"]),
        capacity_GB=float(memory["capacity_GB"]),
        peak_tflops=peaks,
        bandwidth_efficiency=float(eff["bandwidth"]),
        compute_efficiency=float(eff["compute"]),
        sources={"memory": memory["source"], "compute": compute["source"]},
        reasoning=eff["reasoning"],
        path=where,
        calibrations=calibrations,
    )


def _check(data: Any, schema: dict[str, Any], where: str, prefix: str) -> None:
    if not isinstance(data, dict):
        raise ShrinkError(f"Profile '{where}': '{prefix.rstrip('.')}' must be a table.")
    unknown = sorted(set(data) - set(schema))
    if unknown:
        raise ShrinkError(
            f"Profile '{where}': unknown key '{prefix}{unknown[0]}' (known: {', '.join(schema)}"
            + (", runtime)." if not prefix else ").")
        )
    for key, kind in schema.items():
        dotted = prefix + key
        if key not in data:
            if dotted in _OPTIONAL:
                continue
            raise ShrinkError(f"Profile '{where}': missing key '{dotted}'.")
        value = data[key]
        if isinstance(kind, dict):
            _check(value, kind, where, prefix=dotted + ".")
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ShrinkError(f"Profile '{where}': '{dotted}' must be a positive number, got {value!r}.")
        elif not isinstance(value, kind) or (kind is str and not value.strip()):
            raise ShrinkError(f"Profile '{where}': '{dotted}' must be a non-empty {kind.__name__}.")


def get_profile(target: str, *, refresh_host: bool = False) -> Profile:
    """A built-in profile by name or alias, `host` (measured here, cached), or a path to a TOML file."""
    if target == "host":
        host = profile_from_dict(host_profile_data(refresh=refresh_host), where="host (measured on this machine)")
        return replace(host, measured=True, path=None)
    name = ALIASES.get(target, target)
    builtin = builtin_dir() / f"{name}.toml"
    if builtin.is_file():
        return load_profile_file(builtin)
    if target.endswith(".toml") or Path(target).is_file():
        return load_profile_file(target)
    raise ShrinkError(f"Unknown target '{target}'; known targets: {', '.join(known_targets())}, or a path to a .toml profile.")


def resolve_targets(target: str) -> list[Profile]:
    """`all` expands to every built-in profile plus `host`."""
    if target == "all":
        return [get_profile(name) for name in known_targets()]
    return [get_profile(target)]


def profile_toml(profile: Profile, name: str, title: str) -> str:
    """`profile` as a profile file (the schema above) named `name`: what `shrink profiles calibrate`
    writes and `--target FILE.toml` reads back."""
    lines = [f"name = {_toml(name)}", f"title = {_toml(title)}", f"kind = {_toml(profile.kind)}",
             f"runtimes = [{', '.join(_toml(r) for r in profile.runtimes)}]", "", "[memory]",
             f"bandwidth_GBps = {profile.bandwidth_GBps!r}", f"capacity_GB = {profile.capacity_GB!r}",
             f"source = {_toml(profile.sources['memory'])}", "", "[compute]"]
    lines += [f"{cls} = {value!r}" for cls, value in profile.peak_tflops.items()]
    lines += [f"source = {_toml(profile.sources['compute'])}", "", "[efficiency]",
              f"bandwidth = {profile.bandwidth_efficiency!r}", f"compute = {profile.compute_efficiency!r}",
              f"reasoning = {_toml(profile.reasoning)}"]
    for runtime, calibration in profile.calibrations.items():
        table = calibration.to_table()
        formats = table.pop("formats")
        lines += ["", f"[runtime.{_toml(runtime)}]"] + [f"{key} = {_toml(value)}" for key, value in table.items()]
        lines += ["", f"[runtime.{_toml(runtime)}.formats]"]
        lines += [f"{fmt} = {{ " + ", ".join(f"{k} = {v!r}" for k, v in rate.items()) + " }" for fmt, rate in formats.items()]
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    return repr(value)

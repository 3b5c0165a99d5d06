"""Pre-flight: is this rig fit to bench this bundle, before any suite runs?

The probe reports what the rig is (`hil.probe preflight`: architecture, kernel, OS, CPU,
memory, Python, ONNX Runtime and its providers, TensorRT, the Tidegate version, readable
thermal zones, and the SKUs a rig file declares it stands for); `checks` judges that against
the bundle's SKU as the catalogue describes it and against what the plan needs. Pure: facts
in, checks out. A failed pre-flight means the run never starts (exit 2), never a failed suite.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from builder.catalogue import Sku

# platform.machine() spellings → the catalogue's architecture names (Docker/OCI's).
ARCHITECTURES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+", maxsplit=1)[0].split(".")[:2])


def checks(
    facts: dict[str, Any] | None,
    *,
    probe_error: str | None,
    sku_name: str,
    sku: Sku | None,
    plan: Sequence[str],
    options: dict[str, Any],
    bench_version: str,
) -> list[Check]:
    out: list[Check] = []
    if facts is None:
        return [Check("probe", False, f"the rig cannot run the probe: {probe_error or 'no answer'}")]
    out.append(Check("probe", True, f"python {facts.get('python')} runs hil.probe"))
    theirs = str(facts.get("tidegate", "?"))
    same = _major_minor(theirs) == _major_minor(bench_version)
    out.append(
        Check(
            "version",
            same,
            f"Tidegate {theirs} on the rig, {bench_version} on the bench host"
            + ("" if same else ": install the same major.minor on the rig"),
        )
    )
    if sku is None:
        out.append(
            Check("sku", False, f"SKU {sku_name!r} is not in the catalogue: nothing to check the rig against")
        )
    else:
        machine = str(facts.get("machine", "?"))
        arch = ARCHITECTURES.get(machine, machine)
        out.append(
            Check(
                "architecture",
                arch == sku.architecture,
                f"the rig is {machine} ({arch}); SKU {sku_name} is {sku.architecture}",
            )
        )
        declared = facts.get("rig_skus")
        if declared:
            out.append(
                Check(
                    "rig",
                    sku_name in declared,
                    f"the rig ({facts.get('rig_name') or 'unnamed'}) stands for {', '.join(declared)}",
                )
            )
        memory = _effective_memory_mb(facts)
        if memory is not None:
            limited = facts.get("memory_limit_mb") is not None and memory == facts["memory_limit_mb"]
            where = f"a limit of {memory:g} MB on its cgroup" if limited else f"{memory:g} MB"
            cpu = facts.get("cpu_limit")
            fits = memory >= sku.memory_ceiling_mb
            out.append(
                Check(
                    "memory",
                    fits,
                    f"the rig has {where}{f' and a quota of {cpu:g} CPUs' if cpu else ''}; SKU {sku_name}'s "
                    f"memory ceiling is {sku.memory_ceiling_mb:g} MB"
                    + ("" if fits else ": a model within its ceiling could be killed here"),
                )
            )
        if sku.runtime == "onnxruntime":
            have = facts.get("onnxruntime_providers") or []
            missing = [p for p in sku.execution_providers if p not in have]
            ort = facts.get("onnxruntime")
            detail = f"onnxruntime {ort or 'missing'} with {', '.join(have) or 'no providers'}"
            if missing:
                detail += f"; SKU wants {', '.join(missing)}"
            out.append(Check("runtime", ort is not None and not missing, detail))
        else:
            trt = facts.get("tensorrt")
            out.append(Check("runtime", trt is not None, f"tensorrt {trt or 'missing'} (SKU {sku.runtime})"))
    if "thermal" in plan:
        root = (options.get("thermal") or {}).get("thermal_root")
        zones = facts.get("thermal_zones") or []
        if root:
            out.append(
                Check(
                    "thermal",
                    bool(zones),
                    f"{len(zones)} readable zone(s) under {root}"
                    + (f": {', '.join(zones)}" if zones else ""),
                )
            )
        else:
            out.append(Check("thermal", True, "simulated zone (no --thermal-root): declared simulated"))
    if "install" in plan:
        repo, anchor = options.get("repo"), options.get("trusted_root")
        if not repo:
            out.append(Check("install", False, "the install suite needs --repo (the update repository)"))
        elif "://" in str(repo) and not anchor:
            out.append(
                Check("install", False, f"--repo {repo} is a URL: give --trusted-root (a path on the rig)")
            )
        else:
            out.append(Check("install", True, f"repository {repo}"))
    return out


def _effective_memory_mb(facts: dict[str, Any]) -> float | None:
    """What a model can have: the machine's memory, or its cgroup's limit if lower (a
    container rig standing for a smaller SoC)."""
    known = [float(v) for v in (facts.get("memory_mb"), facts.get("memory_limit_mb")) if v is not None]
    return min(known) if known else None


def verdict(found: Sequence[Check]) -> dict[str, Any]:
    return {
        "verdict": "passed" if all(c.passed for c in found) else "failed",
        "checks": [c.as_dict() for c in found],
    }

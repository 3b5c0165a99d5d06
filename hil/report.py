"""A bench report in three forms, all in one directory: `report.json` (every figure and
verdict), `junit.xml` (one test case per suite, for CI systems) and `report.html` (one
self-contained page: verdicts, a latency histogram and the thermal trace as inline SVG)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hil.runner import Report
from shared.benchreport import sign
from shared.errors import TidegateError
from shared.fsutil import atomic_write_bytes

JSON_NAME, JUNIT_NAME, HTML_NAME = "report.json", "junit.xml", "report.html"


NOT_STARTED = "not-started"  # where a run that never started writes, beside an earlier report


def write_all(report: Report, out: Path, key: Ed25519PrivateKey | None = None) -> list[Path]:
    """The three files in `out`, `report.json` signed with the bench key when one is given.
    A run that did not start never replaces an earlier report: it goes to `out/not-started/`."""
    if not report.started and (out / JSON_NAME).exists():
        out = out / NOT_STARTED
    out.mkdir(parents=True, exist_ok=True)
    data = report.to_json()
    if key is not None:
        data = sign(data, key)
    atomic_write_bytes(out / JSON_NAME, (json.dumps(data, indent=2) + "\n").encode())
    atomic_write_bytes(out / JUNIT_NAME, junit(report))
    atomic_write_bytes(out / HTML_NAME, page(report).encode())
    return [out / JSON_NAME, out / JUNIT_NAME, out / HTML_NAME]


def junit(report: Report) -> bytes:
    failures = sum(r.status == "failed" for r in report.results)
    errors = sum(r.status == "error" for r in report.results) + (0 if report.complete else 1)
    suite = ET.Element(
        "testsuite",
        name=f"tidegate-hil.{report.bundle['name']}-{report.bundle['version']}.{report.sku}",
        tests=str(len(report.results) + (0 if report.complete else 1)),
        failures=str(failures),
        errors=str(errors),
        skipped=str(sum(r.status in ("skipped", "not_run") for r in report.results)),
        time=f"{sum(r.duration_s for r in report.results):.3f}",
        timestamp=report.started_at,
        hostname=report.target,
    )
    for r in report.results:
        case = ET.SubElement(
            suite, "testcase", classname="tidegate.hil", name=r.name, time=f"{r.duration_s:.3f}"
        )
        if r.status in ("failed", "error", "skipped", "not_run"):
            tag = {"failed": "failure", "error": "error", "skipped": "skipped", "not_run": "skipped"}[
                r.status
            ]
            ET.SubElement(case, tag, message=r.reason).text = r.reason
        else:
            ET.SubElement(case, "system-out").text = r.reason
    if not report.complete:
        case = ET.SubElement(suite, "testcase", classname="tidegate.hil", name="run", time="0")
        ET.SubElement(case, "error", message="incomplete").text = report.incomplete_reason or "incomplete"
    return bytes(ET.tostring(suite, encoding="utf-8", xml_declaration=True))


# ---- the HTML page -------------------------------------------------------------------------------

W, H, PAD = 640, 220, 40


def _histogram(values: list[float], budget: float) -> str:
    """The latencies' distribution on their own scale (p0.1-p99.9, so one outlier does not
    squash the rest into a bar), with the p95 budget marked where it falls, or as an arrow
    when it lies far beyond the measurements."""
    ordered = sorted(values)
    lo = ordered[int(0.005 * (len(ordered) - 1))]
    top_v = ordered[int(0.99 * (len(ordered) - 1))]
    hi = max(top_v, lo + 1e-6)
    beyond = sum(v > hi for v in values)
    if budget <= hi * 1.5:  # the budget is on the plot's scale: include it
        hi = max(hi, budget)
    bins = 30
    width = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int((v - lo) / width)))] += 1  # beyond hi: the last bar
    top = max(counts) or 1
    bw = (W - 2 * PAD) / bins
    bars = "".join(
        f'<rect x="{PAD + i * bw:.1f}" y="{H - PAD - c / top * (H - 2 * PAD):.1f}" width="{bw - 1:.1f}" '
        f'height="{c / top * (H - 2 * PAD):.1f}" fill="#4a7bd0"><title>{lo + i * width:.3f}–'
        f"{lo + (i + 1) * width:.3f} ms: {c}</title></rect>"
        for i, c in enumerate(counts)
    )
    label = f"p95 budget {budget:g} ms"
    if budget <= hi:
        bx = PAD + (budget - lo) / (hi - lo or 1) * (W - 2 * PAD)
        anchor = "end" if bx > W / 2 else "start"  # the label stays inside the plot, whole
        tx = bx - 4 if anchor == "end" else bx + 4
        mark = (
            f'<line x1="{bx:.1f}" y1="{PAD / 2}" x2="{bx:.1f}" y2="{H - PAD}" stroke="#c0392b" '
            f'stroke-dasharray="4"/><text x="{tx:.1f}" y="{PAD / 2 + 10}" font-size="11" fill="#c0392b" '
            f'text-anchor="{anchor}">{label}</text>'
        )
    else:
        mark = (
            f'<text x="{W - PAD}" y="{PAD / 2 + 10}" font-size="11" fill="#c0392b" text-anchor="end">'
            f"{label} → (off this scale: {budget / hi:.0f}× the slowest run shown)</text>"
        )
    if beyond:
        mark += (
            f'<text x="{W - PAD}" y="{PAD / 2 + 24}" font-size="11" text-anchor="end">'
            f"{beyond} slower run(s) up to {ordered[-1]:.3f} ms counted in the last bar</text>"
        )
    return (
        f'<svg class="plot" id="latency-histogram" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
        f'xmlns="http://www.w3.org/2000/svg">{bars}{mark}'
        f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="#333"/>'
        f'<text x="{PAD}" y="{H - PAD + 16}" font-size="11">{lo:.3f} ms</text>'
        f'<text x="{W - PAD}" y="{H - PAD + 16}" font-size="11" text-anchor="end">{hi:.3f} ms</text></svg>'
    )


def _trace(points: list[dict[str, Any]], thresholds: list[float]) -> str:
    temps = [p["temp_c"] for p in points if p["temp_c"] is not None]
    if not temps:
        return "<p>No temperature was readable during the soak.</p>"
    t_max = max(p["t_s"] for p in points) or 1.0
    lo, hi = min(*temps, *thresholds) - 5, max(*temps, *thresholds) + 5

    def xy(t: float, c: float) -> str:
        return f"{PAD + t / t_max * (W - 2 * PAD):.1f},{H - PAD - (c - lo) / (hi - lo) * (H - 2 * PAD):.1f}"

    line = " ".join(xy(p["t_s"], p["temp_c"]) for p in points if p["temp_c"] is not None)
    levels = "".join(
        f'<rect x="{PAD + p["t_s"] / t_max * (W - 2 * PAD):.1f}" y="{H - PAD + 4}" width="3" height="8" '
        f'fill="{["#2ecc71", "#f1c40f", "#e67e22", "#c0392b", "#8e44ad"][min(p["level"], 4)]}"/>'
        for p in points
    )
    marks = "".join(
        f'<line x1="{PAD}" y1="{xy(0, c).split(",")[1]}" x2="{W - PAD}" y2="{xy(0, c).split(",")[1]}" '
        f'stroke="#999" stroke-dasharray="3"/><text x="{W - PAD + 2}" y="{xy(0, c).split(",")[1]}" '
        f'font-size="10">{c:g} °C</text>'
        for c in thresholds
    )
    return (
        f'<svg class="plot" id="thermal-trace" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
        f'xmlns="http://www.w3.org/2000/svg">{marks}<polyline fill="none" stroke="#c0392b" stroke-width="2" '
        f'points="{line}"/>{levels}<text x="{PAD}" y="{H - 6}" font-size="11">0 s</text>'
        f'<text x="{W - PAD}" y="{H - 6}" font-size="11" text-anchor="end">'
        f"{t_max:.0f} s · bar: throttle level</text></svg>"
    )


def page(report: Report) -> str:
    e = html.escape
    verdict = "PASSED" if report.passed else ("INCOMPLETE" if not report.complete else "FAILED")
    rows = "".join(
        f'<tr class="{r.status}"><td>{e(r.name)}</td><td>{e(r.status)}</td><td>{r.duration_s:.1f} s</td>'
        f"<td>{e(r.reason)}</td></tr>"
        for r in report.results
    )
    plots = []
    by_name = {r.name: r for r in report.results}
    if (lat := by_name.get("latency")) and lat.figures.get("latencies_ms"):
        budget = float(report.budgets.get("latency_p95_ms") or lat.figures["p95_ms"])
        plots.append(
            f"<h2>Latency ({lat.figures['runs']} runs)</h2>{_histogram(lat.figures['latencies_ms'], budget)}"
        )
    if (th := by_name.get("thermal")) and th.figures.get("trace"):
        plots.append(
            f"<h2>Thermal soak ({th.figures['soak_s']:g} s"
            f"{', simulated zone' if th.figures['simulated'] else ''})</h2>"
            f"{_trace(th.figures['trace'], th.figures['thresholds_c'])}"
        )
    incomplete = (
        f'<p class="incomplete">Incomplete: {e(report.incomplete_reason or "")}</p>'
        if not report.complete
        else ""
    )
    checks = "".join(
        f'<tr class="{"passed" if c["passed"] else "failed"}"><td>{e(c["name"])}</td>'
        f"<td>{'passed' if c['passed'] else 'FAILED'}</td><td>{e(c['detail'])}</td></tr>"
        for c in report.preflight.get("checks", [])
    )
    facts = report.rig
    thermal_source = facts.get("thermal_source", "-")
    rig_rows = (
        "".join(
            f"<tr><td>{e(k)}</td><td>{e(str(facts.get(k, '-')))}</td></tr>"
            for k in (
                "machine",
                "kernel",
                "os",
                "cpu_model",
                "cpus",
                "memory_mb",
                "python",
                "onnxruntime",
                "tidegate",
            )
        )
        + f"<tr><td>thermal source</td><td>{e(str(thermal_source))}</td></tr>"
    )
    b = report.bundle
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>HIL report: {e(b["name"])} {e(b["version"])} on {e(report.sku)}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; }}
tr.passed td:nth-child(2) {{ color: #1e8449; }}
tr.failed td:nth-child(2), tr.error td:nth-child(2) {{ color: #c0392b; }}
.verdict {{ font-size: 1.4em; font-weight: bold; }} .incomplete {{ color: #c0392b; }}
</style></head><body>
<h1>HIL report: {e(b["name"])} {e(b["version"])}</h1>
<p class="verdict" id="verdict">{verdict}</p>{incomplete}
<p>SKU {e(report.sku)} · target {e(report.target)} · suite {e(report.suite)}
 · started {e(report.started_at)}</p>
<p>bundle sha256 {e(str(b.get("sha256", "-")))} · thermal source: {e(str(thermal_source))}</p>
<h2>Pre-flight: {e(str(report.preflight.get("verdict")))}</h2>
<table id="preflight"><tr><th>check</th><th>result</th><th>detail</th></tr>{checks}</table>
<h2>Suites</h2>
<table id="results"><tr><th>suite</th><th>result</th><th>time</th><th>why</th></tr>{rows}</table>
<h2>The rig</h2>
<table id="rig">{rig_rows}</table>
{"".join(plots)}
</body></html>
"""


class UploadError(TidegateError):
    """The fleet server could not take the report (no such release, refused, unreachable)."""

    exit_code = 2


def attach(http: httpx.Client, data: dict[str, Any]) -> dict[str, Any]:
    """POST a complete, signed report (`report.json`'s content) as its release's bench report
    for its SKU, over an authenticated client on the fleet server, which re-judges it (409
    with every reason it cannot gate a campaign); returns the created report."""
    name, version = data["bundle"]["name"], data["bundle"]["version"]
    try:
        r = http.get("/api/v1/releases", params={"name": name})
        if r.status_code >= 400:
            raise UploadError(f"listing releases: HTTP {r.status_code}: {r.text[:200]}")
        release = next((x for x in r.json() if x["version"] == version), None)
        if release is None:
            raise UploadError(f"the fleet server has no release {name} {version}; publish it first")
        r = http.post(
            f"/api/v1/releases/{release['id']}/bench-reports",
            json={"report": data},
        )
    except httpx.HTTPError as exc:
        raise UploadError(f"fleet server: {type(exc).__name__}: {exc}") from exc
    if r.status_code == 409:
        detail = r.json().get("detail") or {}
        reasons = detail.get("reasons") if isinstance(detail, dict) else None
        raise UploadError(
            "the fleet server refused the report: " + ("; ".join(reasons) if reasons else r.text[:300])
        )
    if r.status_code >= 400:
        raise UploadError(f"the fleet server refused the report: HTTP {r.status_code}: {r.text[:200]}")
    return dict(r.json())

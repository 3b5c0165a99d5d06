"""A drift report as `drift.json` (every figure) and `drift.html` (one self-contained page:
the verdict, a table per slice, PSI per feature and the reliability diagram as inline SVG)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from shared.drift.job import DriftReport, SliceDrift
from shared.fsutil import atomic_write_bytes

W, H, PAD = 640, 240, 40


def write_report(report: DriftReport, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "drift.json", (json.dumps(report.to_json(), indent=2) + "\n").encode())
    atomic_write_bytes(out / "drift.html", page(report).encode())
    return [out / "drift.json", out / "drift.html"]


def _psi_bars(s: SliceDrift, threshold: float) -> str:
    top = max([f.psi for f in s.features] + [threshold * 1.5])
    bw = (W - 2 * PAD) / max(len(s.features), 1)
    span = H - 2 * PAD
    bars = "".join(
        f'<rect x="{PAD + i * bw:.1f}" y="{H - PAD - f.psi / top * span:.1f}" width="{bw * 0.8:.1f}" '
        f'height="{f.psi / top * span:.1f}" fill="{"#c0392b" if f.drifted else "#4a7bd0"}">'
        f"<title>{html.escape(f.feature)}: PSI {f.psi:.4f}</title></rect>"
        for i, f in enumerate(s.features)
    )
    ty = H - PAD - threshold / top * (H - 2 * PAD)
    return (
        f'<svg id="psi" viewBox="0 0 {W} {H}" width="{W}" height="{H}" xmlns="http://www.w3.org/2000/svg">'
        f'{bars}<line x1="{PAD}" y1="{ty:.1f}" x2="{W - PAD}" y2="{ty:.1f}" stroke="#c0392b" '
        f'stroke-dasharray="4"/><text x="{W - PAD}" y="{ty - 4:.1f}" font-size="11" text-anchor="end">'
        f"PSI threshold {threshold:g}</text></svg>"
    )


def _reliability(bins: list[dict[str, Any]]) -> str:
    side = H - 2 * PAD

    def x(v: float) -> float:
        return PAD + v * side

    def y(v: float) -> float:
        return H - PAD - v * side

    bars = "".join(
        f'<rect x="{x(b["lower"]):.1f}" y="{y(b["accuracy"]):.1f}" width="{side / len(bins) - 1:.1f}" '
        f'height="{b["accuracy"] * side:.1f}" fill="#4a7bd0"><title>confidence {b["confidence"]:.3f}, '
        f"accuracy {b['accuracy']:.3f}, n {b['count']}</title></rect>"
        for b in bins
        if b["count"]
    )
    return (
        f'<svg id="reliability" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
        f'xmlns="http://www.w3.org/2000/svg">{bars}<line x1="{x(0)}" y1="{y(0)}" x2="{x(1)}" y2="{y(1)}" '
        f'stroke="#999" stroke-dasharray="3"/>'
        f'<text x="{x(1) + 4}" y="{y(0)}" font-size="11">confidence</text>'
        f'<text x="{x(0)}" y="{y(1) - 6}" font-size="11">accuracy</text></svg>'
    )


def _table(s: SliceDrift) -> str:
    e = html.escape
    if not s.tested:
        return f"<h3>{e(s.slice)}</h3><p>{s.reference_rows} / {s.current_rows} rows: too few to test.</p>"
    rows = "".join(
        f'<tr class="{"drift" if f.drifted else "ok"}"><td>{e(f.feature)}</td>'
        f"<td>{f.kind}</td><td>{f.test}</td>"
        f"<td>{f.statistic:.4f}</td><td>{f.p_value:.3g}</td><td>{f.psi:.4f}</td>"
        f"<td>{'drift' if f.drifted else 'ok'}</td></tr>"
        for f in s.features
    )
    return (
        f"<h3>{e(s.slice)} ({s.reference_rows} reference / {s.current_rows} current rows)</h3>"
        "<table><tr><th>feature</th><th>kind</th><th>test</th><th>statistic</th><th>p</th><th>PSI</th>"
        f"<th></th></tr>{rows}</table>"
    )


def page(report: DriftReport) -> str:
    e = html.escape
    cfg = report.config
    verdict = "DRIFT" if report.alarm else "NO DRIFT"
    reasons = "".join(f"<li>{e(r)}</li>" for r in report.reasons)
    parts = [_psi_bars(report.overall, cfg["psi_threshold"]), _table(report.overall)]
    parts += [_table(s) for s in report.slices]
    if report.concept:
        c = report.concept
        parts.append(
            f"<h2>Concept drift</h2><p>error rate {c['reference_error_rate']:.4f} → "
            f"{c['current_error_rate']:.4f} "
            f"(p {c['p_value']:.3g}){' — drift' if c['drifted'] else ''}</p>"
        )
    if report.calibration:
        svg = _reliability(report.calibration["bins"])
        parts.append(f"<h2>Calibration</h2><p>ECE {report.calibration['ece']:.4f}</p>{svg}")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Drift report</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 3px 8px; }}
tr.drift td {{ color: #c0392b; }}
</style></head><body>
<h1>Drift report</h1>
<p id="verdict"><b>{verdict}</b> · {report.reference_rows} reference rows,
{report.current_rows} current rows ·
alpha {cfg["alpha"]:g} for the whole job ({report.tests} tests at {report.per_test_alpha:.2g} each) ·
PSI threshold {cfg["psi_threshold"]:g}</p>
<ul>{reasons}</ul>
{"".join(parts)}
</body></html>
"""

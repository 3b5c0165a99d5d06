"""`tidegate drift run`: compare current data with a reference, write the report, exit 1 on
drift (so a scheduled job or a CI step can act on the exit status)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Data drift, concept drift and calibration reports.", no_args_is_help=True)


@app.command("run")
def run_command(
    reference: Annotated[Path, typer.Option(help="Reference table (.csv with a header row, or .npz).")],
    current: Annotated[Path, typer.Option(help="Current table, same columns.")],
    out: Annotated[Path, typer.Option(help="Directory for drift.json and drift.html.")] = Path(
        "drift-report"
    ),
    alpha: Annotated[
        float, typer.Option(help="False-alarm rate of the whole job.", min=1e-9, max=0.5)
    ] = 0.01,
    psi_threshold: Annotated[float, typer.Option(help="PSI at or above this is drift.", min=0)] = 0.2,
    bins: Annotated[int, typer.Option(help="PSI and calibration bins.", min=2, max=100)] = 10,
    categorical: Annotated[list[str] | None, typer.Option(help="Columns to treat as categories.")] = None,
    slice_by: Annotated[str | None, typer.Option(help="Compare each value of this column too.")] = None,
    label: Annotated[str | None, typer.Option(help="True label column (concept drift).")] = None,
    prediction: Annotated[str | None, typer.Option(help="Predicted label column.")] = None,
    confidence: Annotated[str | None, typer.Option(help="Predicted confidence column (calibration).")] = None,
) -> None:
    """Exit 0: no drift; 1: drift (reasons printed); 2: the data could not be compared."""
    from shared.drift.job import DriftConfig, run_drift
    from shared.drift.report import write_report
    from shared.drift.tables import load_table

    config = DriftConfig(
        alpha=alpha,
        psi_threshold=psi_threshold,
        bins=bins,
        categorical=tuple(categorical or ()),
        slice_by=slice_by,
        label=label,
        prediction=prediction,
        confidence=confidence,
    )
    report = run_drift(load_table(reference), load_table(current), config)
    paths = write_report(report, out)
    for reason in report.reasons:
        typer.echo(f"  drift: {reason}")
    if report.calibration:
        typer.echo(f"  calibration: ECE {report.calibration['ece']:.4f}")
    typer.echo(
        f"{'DRIFT' if report.alarm else 'no drift'}: {len(report.overall.features)} features, "
        f"{len(report.slices)} slices, {report.tests} tests; reports in {', '.join(map(str, paths))}"
    )
    if report.alarm:
        raise typer.Exit(1)

"""`tidegate build`: the release engineer's command (see `builder.build`).

Exit codes: 0 every SKU built (and published, with --repo); 2 bad input, nothing built;
3 some SKUs refused (the others built; nothing published unless --allow-partial-publish).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from builder.catalogue import DEFAULT_CATALOGUE
from builder.errors import BuildError

if TYPE_CHECKING:  # the pipeline (ONNX, ONNX Runtime, CycloneDX) loads only when a build runs
    from builder.build import BuildRequest, BuildResult

PARTIAL_EXIT = 3
DEFAULT_CACHE = Path.home() / ".cache" / "tidegate" / "tensorrt"


def _params(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BuildError(f"{path}: unreadable inference parameters ({exc})") from exc
    if not isinstance(raw, dict) or set(raw) - {"preprocessing", "postprocessing", "thresholds"}:
        raise BuildError(f"{path}: an object with preprocessing, postprocessing and thresholds only")
    return raw


def build_command(
    model: Annotated[Path, typer.Argument(help="The trained fp32 ONNX model.")],
    name: Annotated[str, typer.Option(help="Model name (the bundle and registry name).")],
    version: Annotated[str, typer.Option(help="Semantic version, above the last one published.")],
    sku: Annotated[list[str], typer.Option("--sku", help="A SKU from the catalogue; repeat for more.")],
    out: Annotated[Path, typer.Option(help="Output directory (new or empty).")],
    calibration: Annotated[
        Path | None, typer.Option(help="Calibration/validation inputs (.npz named like the model's inputs).")
    ] = None,
    repo: Annotated[
        Path | None, typer.Option(help="Publish the bundles into this update repository.")
    ] = None,
    catalogue: Annotated[Path, typer.Option(help="SKU catalogue (TOML).")] = DEFAULT_CATALOGUE,
    dataset_sha256: Annotated[str | None, typer.Option(help="Lineage: training dataset digest.")] = None,
    training_run: Annotated[str | None, typer.Option(help="Lineage: training run id.")] = None,
    inference_params: Annotated[
        Path | None,
        typer.Option(help="JSON: preprocessing, postprocessing, thresholds for inference_config."),
    ] = None,
    scores_output: Annotated[
        str | None, typer.Option(help="Output holding class scores (top-1 agreement); default the first.")
    ] = None,
    artifact_uri_base: Annotated[
        str, typer.Option(help="Where artifacts will be hosted (Greengrass recipe, update manifest).")
    ] = "s3://tidegate-artifacts",
    repository_url: Annotated[
        str, typer.Option(help="The update repository devices verify against (Greengrass recipe).")
    ] = "https://updates.example.com/repo",
    cache_dir: Annotated[Path, typer.Option(help="TensorRT timing caches, one per SKU.")] = DEFAULT_CACHE,
    allow_partial_publish: Annotated[
        bool, typer.Option(help="With --repo, publish the SKUs that built even if others were refused.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a machine-readable summary only.")] = False,
) -> None:
    """Build one verified, signed bundle per SKU from a trained ONNX model: engines or optimised /
    quantised models, golden self-test data, inference_config.json, Triton config, SBOM,
    provenance, an OCI archive, a Greengrass recipe and a device update manifest."""
    from builder.build import BuildRequest, build
    from builder.catalogue import load_catalogue

    lineage = {k: v for k, v in (("dataset_sha256", dataset_sha256), ("training_run", training_run)) if v}
    request = BuildRequest(
        model=model,
        name=name,
        version=version,
        skus=list(sku),
        out=out,
        calibration=calibration,
        repo=repo,
        lineage=lineage,
        inference_params=_params(inference_params),
        scores_output=scores_output,
        artifact_uri_base=artifact_uri_base,
        repository_url=repository_url,
        cache_dir=cache_dir,
        allow_partial_publish=allow_partial_publish,
    )
    cat = load_catalogue(catalogue)
    if as_json:
        result = build(request, cat)
        typer.echo(json.dumps(result.as_dict(), indent=2))
    else:
        result = _with_progress(request, cat)
    if not result.complete:
        raise typer.Exit(PARTIAL_EXIT)


def _with_progress(request: BuildRequest, cat: Any) -> BuildResult:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from builder.build import build

    console = Console(highlight=False, width=120)
    with console.status("checking the model and inputs") as status:

        def progress(sku: str, step: str) -> None:
            if step.startswith(("built", "refused", "published", "nothing")):
                style = "green" if step.startswith(("built", "published")) else "yellow"
                console.print(f"[{style}]{escape(sku)}[/]: {escape(step)}")
            else:
                status.update(escape(f"{sku}: {step}"))

        result = build(request, cat, progress=progress)
    table = Table("SKU", "status", "bundle KiB", "max |Δ| vs fp32", "top-1 agreement", "seconds")
    for r in result.skus:
        a = r.agreement or {}
        table.add_row(
            r.sku,
            r.status,
            f"{(r.bundle_size or 0) / 1024:,.0f}" if r.bundle_size else "",
            f"{a['max_abs_error']:.3g}" if a else "",
            f"{a['top1_agreement']:.3f}" if a.get("top1_agreement") is not None else "",
            f"{r.build_s:.1f}",
        )
    console.print(table)
    console.print(f"summary: {request.out / 'build.json'}")
    return result


def sample_model_command(
    path: Annotated[Path, typer.Argument(help="Where to write the ONNX model.")] = Path("model.onnx"),
) -> None:
    """Write a small trained-looking ONNX classifier ([N, 16] -> [N, 4] softmax) to try
    `tidegate build` with, before there is a model of your own."""
    from builder.errors import OutputDirError
    from builder.samples import make_classifier

    if path.exists():
        raise OutputDirError(f"{path} exists; choose another path")
    make_classifier(path)
    typer.echo(f"wrote {path}; try:")
    typer.echo(f"  tidegate build {path} --name classifier --version 1.0.0 --sku edge-cpu-x86 --out out")

"""`tidegate bundle`: pack a payload directory into a bundle, and inspect/verify one."""

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from shared.bundle.manifest import Runtime
from shared.bundle.pack import pack_directory
from shared.bundle.reader import verify_bundle

app = typer.Typer(
    help="Bundles: pack a payload directory, inspect and verify a bundle file.", no_args_is_help=True
)


@app.command()
def pack(
    directory: Annotated[Path, typer.Argument(help="Payload directory (model, config, self-test data).")],
    name: Annotated[str, typer.Option(help="Bundle name, e.g. 'detector'.")],
    version: Annotated[str, typer.Option(help="Semantic version.")],
    sku: Annotated[list[str], typer.Option(help="Hardware SKU (repeatable).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle file to write.")],
    runtime: Annotated[Runtime, typer.Option(help="Runtime kind.")] = Runtime.ONNXRUNTIME,
    entry: Annotated[str, typer.Option(help="Entry model path in the payload.")] = "model.onnx",
    inference_config: Annotated[str, typer.Option(help="Path of inference_config.json.")] = (
        "inference_config.json"
    ),
    selftest_inputs: Annotated[str, typer.Option(help="Golden inputs (.npz).")] = "selftest/inputs.npz",
    selftest_outputs: Annotated[str, typer.Option(help="Golden outputs (.npz).")] = "selftest/outputs.npz",
    latency_budget_ms: Annotated[float, typer.Option(help="p95 latency budget.")] = 50.0,
    memory_ceiling_mb: Annotated[float, typer.Option(help="Peak memory ceiling.")] = 512.0,
    atol: Annotated[float, typer.Option(help="Absolute tolerance of the self-test.")] = 1e-4,
    rtol: Annotated[float, typer.Option(help="Relative tolerance of the self-test.")] = 1e-3,
    min_agent_version: Annotated[str, typer.Option(help="Oldest agent that may install it.")] = "0.1.0",
    zstd: Annotated[bool, typer.Option(help="Compress with zstd.")] = False,
) -> None:
    """Pack DIRECTORY into one verified bundle file."""
    manifest = pack_directory(
        directory,
        out,
        compression="zstd" if zstd else "none",
        name=name,
        version=version,
        skus=sku,
        runtime=runtime.value,
        entry_model=entry,
        inference_config=inference_config,
        selftest_inputs=selftest_inputs,
        selftest_outputs=selftest_outputs,
        latency_budget_ms=latency_budget_ms,
        memory_ceiling_mb=memory_ceiling_mb,
        atol=atol,
        rtol=rtol,
        min_agent_version=min_agent_version,
        created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    typer.echo(
        f"packed {manifest.name} {manifest.version} ({len(manifest.files)} files, "
        f"{manifest.total_size} bytes) -> {out}"
    )


@app.command()
def inspect(
    bundle: Annotated[Path, typer.Argument(help="Bundle file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print bundle.json as JSON.")] = False,
) -> None:
    """Verify every member of BUNDLE against its bundle.json and print what it holds."""
    manifest = verify_bundle(bundle)
    if as_json:
        typer.echo(json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True))
        return
    typer.echo(f"{manifest.name} {manifest.version} [{manifest.runtime}] for {', '.join(manifest.skus)}")
    for f in manifest.files:
        typer.echo(f"  {f.sha256[:12]}  {f.size:>12}  {f.path}")
    typer.echo("verified: every member matches bundle.json")

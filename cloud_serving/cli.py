"""`tidegate serve`: run the inference gateway from `serving.toml`; `tidegate serve key`
makes an API key and the hash line to put in the file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="The cloud inference gateway (shadow, canary, blue/green, fallback).")


@app.callback(invoke_without_command=True)
def serve(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option(help="The serving configuration (TOML).")] = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8800,
) -> None:
    """Serve every model in CONFIG until interrupted: POST /v1/models/{model}/infer, the
    release API under /v1/admin/, /metrics and /healthz."""
    if ctx.invoked_subcommand is not None:
        return
    if config is None:
        raise typer.BadParameter("--config is required", param_hint="--config")
    import uvicorn

    from cloud_serving.app import create_app
    from cloud_serving.config import load_config
    from cloud_serving.gateway import Gateway
    from shared.logs import configure_logging

    gateway = Gateway(load_config(config))
    configure_logging(redactor=gateway.redactor)
    if gateway.replicas is not None:  # a store out of reach is one line and exit 2, not a traceback
        gateway.replicas.check()
    if (t := gateway.config.gateway.tracing) is not None:
        try:
            from cloud_serving.tracing import setup_tracing
        except ImportError as exc:
            raise typer.BadParameter(
                "[gateway.tracing] needs the OpenTelemetry SDK: pip install 'tidegate[otel]'"
            ) from exc
        setup_tracing(
            endpoint=t.otlp_endpoint,
            sample_rate=t.sample_rate,
            slow_ms=t.slow_ms,
            service_name=t.service_name,
        )
    typer.echo(f"gateway: http://{host}:{port}  models: {', '.join(sorted(gateway.config.models))}")
    uvicorn.run(create_app(gateway), host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)


@app.command("shadow-worker")
def shadow_worker(
    host: Annotated[str, typer.Option(help="Address to bind (the gateways must reach it).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8900,
) -> None:
    """Run shadows for gateways whose serving.toml names this worker ([gateway] shadow_worker =
    "host:port"): each shadow's candidate runs here, on this machine's CPU, not the gateway's.
    The key both sides share comes from $TIDEGATE_SHADOW_AUTHKEY."""
    from cloud_serving.shadow_worker import authkey, serve
    from shared.logs import configure_logging

    key = authkey()
    configure_logging()
    typer.echo(f"shadow worker: {host}:{port}")
    serve(host, port, key)


@app.command()
def key() -> None:
    """Print a new API key (give it to the caller) and its SHA-256 (put it in serving.toml)."""
    from cloud_serving.app import keygen

    secret, digest = keygen()
    typer.echo(f"key:    {secret}")
    typer.echo(f'sha256: "{digest}"   # api_keys_sha256 or admin_keys_sha256')

"""`tidegate repo`: create, publish into, re-sign, rotate, serve and verify an update repository."""

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from shared.bundle import verify_bundle
from shared.errors import TidegateError
from shared.trust.client import TrustClient
from shared.trust.http import RepoHTTPServer
from shared.trust.repository import ROLES, UpdateRepository

app = typer.Typer(
    help="The update repository (TUF): init, add, refresh, rotate, list, serve, verify.", no_args_is_help=True
)

RepoDir = Annotated[Path, typer.Argument(help="Repository directory.")]


def _parse_expiry(values: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in values:
        role, sep, days = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[role] = float(days)
        except ValueError:
            raise TidegateError(f"--expiry {item!r}: expected ROLE=DAYS, e.g. timestamp=1") from None
    return out


@app.command()
def init(
    directory: RepoDir,
    root_keys: Annotated[int, typer.Option(min=1, help="How many root keys to generate.")] = 1,
    root_threshold: Annotated[int, typer.Option(min=1, help="Root signatures required.")] = 1,
    expiry: Annotated[list[str], typer.Option(help="Expiry per role as ROLE=DAYS (repeatable).")] = [],  # noqa: B006
) -> None:
    """Create keys (under DIR/keys, mode 0600) and version-1 metadata for root, targets,
    snapshot and timestamp. Ship DIR/metadata/1.root.json to devices as their trusted root."""
    repo = UpdateRepository.init(
        directory, root_keys=root_keys, root_threshold=root_threshold, expiry_days=_parse_expiry(expiry)
    )
    typer.echo(f"initialised update repository in {repo.dir}")
    typer.echo(f"  trusted root for devices: {repo.metadata_dir / '1.root.json'}")
    typer.echo(f"  root keys: {root_keys}, threshold {root_threshold}; keys in {repo.keys_dir} (keep secret)")


@app.command()
def add(
    directory: RepoDir,
    bundle: Annotated[Path, typer.Argument(help="Bundle file to publish.")],
    path: Annotated[str | None, typer.Option(help="Target path (default NAME/VERSION/SKUS.bundle).")] = None,
    allow_rollback: Annotated[
        bool,
        typer.Option(
            help="Publish a version below the newest one for its name and SKU, marked as an allowed "
            "downgrade target (refused otherwise)."
        ),
    ] = False,
) -> None:
    """Verify BUNDLE completely, then publish it as a signed target."""
    repo = UpdateRepository(directory)
    published = repo.add_bundle(bundle, target_path=path, allow_rollback=allow_rollback)
    info = published.custom
    typer.echo(
        f"published {published.path} ({info['name']} {info['version']} for {', '.join(info['skus'])}; "
        f"{published.length} bytes, sha256 {published.sha256[:16]}…)"
    )


@app.command()
def refresh(directory: RepoDir) -> None:
    """Re-sign snapshot and timestamp with fresh expiry (run at least daily)."""
    snap, ts = UpdateRepository(directory).refresh()
    typer.echo(f"re-signed snapshot v{snap} and timestamp v{ts}")


@app.command()
def rotate(
    directory: RepoDir,
    role: Annotated[str, typer.Option(help=f"Role whose keys to replace: {', '.join(ROLES)}.")],
) -> None:
    """Replace a role's keys; old clients still update through the root chain."""
    repo = UpdateRepository(directory)
    new = repo.rotate(role)
    typer.echo(
        f"rotated {role}: new key(s) {', '.join(k[:16] + '…' for k in new)}; "
        f"root is now v{repo.root().version}"
    )


@app.command("list")
def list_targets(
    directory: RepoDir, as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False
) -> None:
    """List published targets."""
    targets = UpdateRepository(directory).published()
    if as_json:
        typer.echo(json.dumps([t.__dict__ for t in targets], indent=2))
        return
    for t in targets:
        typer.echo(f"{t.path}\t{t.length}\t{t.sha256[:16]}…")


@app.command()
def serve(
    directory: RepoDir,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind (0 picks a free one).")] = 8080,
) -> None:
    """Serve DIR/metadata and DIR/targets over HTTP (with Range), never DIR/keys."""
    UpdateRepository(directory)  # refuse to serve something that is not a repository
    server = RepoHTTPServer(directory, host, port)
    typer.echo(f"serving {directory} at {server.url} (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


@app.command()
def verify(
    repository: Annotated[str, typer.Option("--repo", help="Repository URL or directory.")],
    trusted_root: Annotated[Path, typer.Option(help="The root.json this client trusts.")],
    target: Annotated[str | None, typer.Option(help="Target path to fetch and verify.")] = None,
    out: Annotated[Path | None, typer.Option(help="Where to write the verified target.")] = None,
    cache: Annotated[Path, typer.Option(help="Client metadata cache directory.")] = Path(
        ".tidegate-trust-cache"
    ),
) -> None:
    """Refresh metadata from the repository as a device would; with --target also fetch it,
    check its length and hash, and check the bundle inside it."""
    try:
        root = trusted_root.read_bytes()
    except OSError as exc:
        raise TidegateError(f"{trusted_root}: cannot read trusted root ({exc.strerror})") from None
    client = TrustClient(repository=repository, trusted_root=root, cache_dir=cache)
    client.refresh()
    targets = client.targets()
    typer.echo(f"metadata verified at {datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ}: {len(targets)} target(s)")
    if target is None:
        for t in targets:
            typer.echo(f"  {t.path}")
        return
    info = client.get_target(target)
    dest = out or Path(Path(target).name)
    client.download(info, dest)
    manifest = verify_bundle(dest)
    typer.echo(f"target {info.path}: {info.length} bytes, sha256 ok -> {dest}")
    typer.echo(f"bundle {manifest.name} {manifest.version} ({', '.join(manifest.skus)}): every file verified")

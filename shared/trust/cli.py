"""`tidegate repo`: create, publish into, re-sign, rotate, serve and verify an update repository."""

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from securesystemslib.signer import CryptoSigner

from shared.bundle import verify_bundle
from shared.errors import TidegateError
from shared.fsutil import atomic_write_bytes
from shared.trust.client import TrustClient
from shared.trust.http import RepoHTTPServer
from shared.trust.keys import Keyring, public_key_from_pem, write_public_key
from shared.trust.repository import ROLES, Pending, UpdateRepository, sign_envelope

app = typer.Typer(
    help="The update repository (TUF): init, add, delegate, rotate, offline signing, serve, verify.",
    no_args_is_help=True,
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
        except ValueError as exc:
            raise TidegateError(f"--expiry {item!r}: expected ROLE=DAYS, e.g. timestamp=1") from exc
    return out


OfflineKeys = Annotated[
    Path | None,
    typer.Option(
        "--offline-keys",
        help="Directory of offline keys (ROLE/KEYID.pem, as `init` wrote it), mounted for this command.",
    ),
]
OfflineKeyUris = Annotated[
    list[str],
    typer.Option("--offline-key", help="Signer URI of an offline key (hsm:…, file2:…); repeatable."),
]


def _open(
    directory: Path, offline_keys: Path | None = None, offline_uris: list[str] | None = None
) -> UpdateRepository:
    ring = Keyring.from_dir(offline_keys).merged(Keyring.from_uris(offline_uris or []))
    return UpdateRepository(directory, offline=ring)


def _parse_keys(values: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in values:
        role, sep, uri = item.partition("=")
        if not sep or not uri:
            raise TidegateError(f"--key {item!r}: expected ROLE=URI, e.g. release=hsm:2?label=tidegate")
        out.setdefault(role, []).append(uri)
    return out


def _report(waiting: list[Pending]) -> None:
    for p in waiting:
        typer.echo(f"staged: {p.describe()}")


@app.command()
def init(
    directory: RepoDir,
    offline_keys: Annotated[
        Path,
        typer.Option(
            "--offline-keys",
            help="Where to write the root and targets keys: outside DIR, and off this machine afterwards.",
        ),
    ],
    root_keys: Annotated[int, typer.Option(min=1, help="How many root keys to generate.")] = 1,
    root_threshold: Annotated[int, typer.Option(min=1, help="Root signatures required.")] = 1,
    expiry: Annotated[list[str], typer.Option(help="Expiry per role as ROLE=DAYS (repeatable).")] = [],  # noqa: B006
    key: Annotated[
        list[str], typer.Option("--key", help="Use an existing key for a role, ROLE=URI (repeatable).")
    ] = [],  # noqa: B006
) -> None:
    """Create keys and version-1 metadata: root and targets offline (in --offline-keys), snapshot,
    timestamp and the delegated role `release` (every NAME/VERSION/SKUS.bundle path) online in
    DIR/keys. Ship DIR/metadata/1.root.json to devices as their trusted root."""
    repo = UpdateRepository.init(
        directory,
        offline_dir=offline_keys,
        root_keys=root_keys,
        root_threshold=root_threshold,
        expiry_days=_parse_expiry(expiry),
        key_uris=_parse_keys(key),
    )
    typer.echo(f"initialised update repository in {repo.dir}")
    typer.echo(f"  trusted root for devices: {repo.metadata_dir / '1.root.json'}")
    typer.echo(f"  root keys: {root_keys}, threshold {root_threshold}")
    typer.echo(f"  offline keys (root, targets): {offline_keys} -- move them off this machine")
    typer.echo(f"  online keys (snapshot, timestamp, release): {repo.keys_dir}")


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
    """Verify BUNDLE completely, then sign it into the delegated role that covers its path
    (staged when that role needs a signature whose key is not here)."""
    repo = UpdateRepository(directory)
    published = repo.add_bundle(bundle, target_path=path, allow_rollback=allow_rollback)
    info = published.custom
    verb = "staged" if published.pending else "published"
    typer.echo(
        f"{verb} {published.path} in role {published.role} ({info['name']} {info['version']} for "
        f"{', '.join(info['skus'])}; {published.length} bytes, sha256 {published.sha256[:16]}…)"
    )
    _report(list(published.pending))


@app.command()
def refresh(directory: RepoDir) -> None:
    """Re-sign snapshot and timestamp with fresh expiry (the fleet server does this on its own
    schedule; run it from cron where no server holds the repository)."""
    snap, ts = UpdateRepository(directory).refresh()
    typer.echo(f"re-signed snapshot v{snap} and timestamp v{ts}")


@app.command()
def rotate(
    directory: RepoDir,
    role: Annotated[
        str, typer.Option(help=f"Role whose keys to replace: {', '.join(ROLES)} or a delegated role.")
    ],
    offline_keys: OfflineKeys = None,
    offline_key: OfflineKeyUris = [],  # noqa: B006
    key: Annotated[
        str | None, typer.Option("--key", help="Signer URI of the new key (default: a new file key).")
    ] = None,
) -> None:
    """Replace a role's keys; old clients still update through the root chain. Top-level roles
    need the offline root keys; a delegated role needs the offline targets key (or is staged)
    and leaves root alone."""
    repo = _open(directory, offline_keys, offline_key)
    new = repo.rotate(role, key_uri=key)
    typer.echo(
        f"rotated {role}: new key(s) {', '.join(k[:16] + '…' for k in new)}; root is v{repo.root().version}"
    )
    _report(repo.staged())


@app.command()
def delegate(
    directory: RepoDir,
    name: Annotated[str, typer.Argument(help="Delegated role name, e.g. a model or team.")],
    paths: Annotated[list[str], typer.Option("--paths", help="Target path pattern, e.g. 'classifier/*/*'.")],
    threshold: Annotated[int, typer.Option(min=1, help="Signatures required.")] = 1,
    new_key: Annotated[int, typer.Option(help="How many new online keys to generate in DIR/keys.")] = 0,
    key: Annotated[list[str], typer.Option("--key", help="Signer URI of an online key (repeatable).")] = [],  # noqa: B006
    public_key: Annotated[
        list[Path], typer.Option(help="PEM public key held elsewhere, e.g. an approver's (repeatable).")
    ] = [],  # noqa: B006
    offline_keys: OfflineKeys = None,
    offline_key: OfflineKeyUris = [],  # noqa: B006
) -> None:
    """Delegate target paths to an online role (signed by the offline targets key: given here,
    or staged for `repo export` / `repo sign` / `repo import`)."""
    repo = _open(directory, offline_keys, offline_key)
    pubs = [public_key_from_pem(p) for p in public_key]
    waiting = repo.delegate(
        name, paths, threshold=threshold, new_keys=new_key, key_uris=key, public_keys=pubs
    )
    typer.echo(
        f"delegated {' '.join(paths)} to {name} ({threshold} of {new_key + len(key) + len(pubs)} key(s))"
    )
    _report(waiting)


@app.command()
def delegations(directory: RepoDir) -> None:
    """The published delegations: role, path patterns, threshold."""
    for d in UpdateRepository(directory).delegations():
        typer.echo(f"{d.name}\t{' '.join(d.paths or [])}\t{d.threshold} of {len(d.keyids)}")


@app.command()
def staged(directory: RepoDir) -> None:
    """Changes waiting for signatures, and whose."""
    waiting = UpdateRepository(directory).staged()
    if not waiting:
        typer.echo("nothing staged")
    _report(waiting)


@app.command("export")
def export_staged(
    directory: RepoDir,
    role: Annotated[str, typer.Argument(help="Staged role to export.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="File to write.")],
) -> None:
    """Write a staged role's metadata for signing on the machine that holds the key."""
    atomic_write_bytes(out, UpdateRepository(directory).export(role))
    typer.echo(f"exported staged {role} to {out}; sign it with `tidegate repo sign {out} --key URI`")


@app.command()
def sign(
    file: Annotated[Path, typer.Argument(help="A file `repo export` wrote.")],
    key: Annotated[str, typer.Option("--key", help="Signer URI, e.g. file2:/media/offline/targets/ID.pem.")],
) -> None:
    """Add a signature to an exported file (no repository needed: run it where the key is)."""
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise TidegateError(f"{file}: cannot read ({exc.strerror})") from exc
    signed, summary = sign_envelope(data, key)
    atomic_write_bytes(file, signed)
    typer.echo(f"signed {summary}")


@app.command("import")
def import_signed(
    directory: RepoDir, file: Annotated[Path, typer.Argument(help="A signed file from `repo sign`.")]
) -> None:
    """Add the file's signatures to what is staged; publish whatever is now fully signed."""
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise TidegateError(f"{file}: cannot read ({exc.strerror})") from exc
    repo = UpdateRepository(directory)
    waiting = repo.import_signatures(data)
    done = ", ".join(repo.last_published)
    typer.echo(f"imported; published {done}" if done else "imported; nothing is fully signed yet")
    _report(waiting)


@app.command()
def discard(directory: RepoDir, role: Annotated[str, typer.Argument(help="Staged role to drop.")]) -> None:
    """Drop a staged change (its target files stay; nothing published refers to them)."""
    UpdateRepository(directory).discard(role)
    typer.echo(f"discarded staged {role}")


@app.command()
def keygen(
    out: Annotated[Path, typer.Argument(help="Private key file to write (0600); the .pub beside it.")],
) -> None:
    """A new ed25519 key for an approver or an offline role: give the .pub to `repo delegate
    --public-key`, keep the private file where it is."""
    if out.exists():
        raise TidegateError(f"{out}: exists; refusing to overwrite a key")
    signer = CryptoSigner.generate_ed25519()
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, signer.private_bytes, mode=0o600)
    write_public_key(signer, out.with_suffix(".pub"))
    typer.echo(f"key {signer.public_key.keyid[:16]}…: private {out}, public {out.with_suffix('.pub')}")
    typer.echo(f"  signer URI: file2:{out.resolve()}")


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
        raise TidegateError(f"{trusted_root}: cannot read trusted root ({exc.strerror})") from exc
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

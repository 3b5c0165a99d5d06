"""Private keys named by signer URI, as securesystemslib names them.

A key is wherever its URI says: ``file2:/abs/path.pem`` (an unencrypted PKCS#8 PEM file, the
default), ``hsm:2?label=tidegate`` (a PKCS#11 token: a YubiKey, an HSM, SoftHSM2; the
library from ``PYKCS11LIB``, the PIN from ``TIDEGATE_SIGNER_PIN``), or a cloud KMS
(``awskms:…``, ``gcpkms:…``, ``azurekms:…``; their client libraries and credentials are the
operator's). The repository never needs to know which: it asks for a `Signer` by URI and
public key, and a key that cannot be reached is one `SignerError` naming the URI.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from urllib import parse

from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key
from securesystemslib.signer import CryptoSigner, Key, Signer, SSlibKey

from shared.fsutil import atomic_write_bytes, fsync_dir
from shared.trust.errors import RepositoryConfigError

PIN_ENV = "TIDEGATE_SIGNER_PIN"
FILE_SCHEME = "file2"


class SignerError(RepositoryConfigError):
    """A signer URI does not resolve to a usable private key."""


def file_uri(path: Path) -> str:
    return f"{FILE_SCHEME}:{path.resolve()}"


def _pin(_what: str) -> str:
    pin = os.environ.get(PIN_ENV)
    if pin is None:
        raise SignerError(f"the token asks for a PIN: set {PIN_ENV}")
    return pin


def generate_file_key(directory: Path) -> tuple[str, CryptoSigner]:
    """A fresh ed25519 key written as ``DIR/<keyid>.pem`` (0600, in a 0700 directory)."""
    signer = CryptoSigner.generate_ed25519()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"{signer.public_key.keyid}.pem"
    atomic_write_bytes(path, signer.private_bytes, mode=0o600)
    fsync_dir(directory.parent)
    return file_uri(path), signer


def write_public_key(signer: CryptoSigner, path: Path) -> None:
    """The public half of `signer` as PEM, for `repo delegate --public-key` on another machine."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    crypto = load_pem_private_key(signer.private_bytes, None).public_key()
    atomic_write_bytes(path, crypto.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))


def public_key_from_pem(path: Path) -> SSlibKey:
    try:
        return SSlibKey.from_crypto(load_pem_public_key(path.read_bytes()))
    except OSError as exc:
        raise SignerError(f"{path}: cannot read public key ({exc.strerror})") from exc
    except (ValueError, TypeError) as exc:
        raise SignerError(f"{path}: not a PEM public key ({exc})") from exc


def public_key_for_uri(uri: str) -> Key:
    """The public key of the private key `uri` names (read from the file or the token)."""
    scheme = parse.urlparse(uri).scheme
    if scheme == FILE_SCHEME:
        path = Path(parse.urlparse(uri).path)
        try:
            private = load_pem_private_key(path.read_bytes(), None)
        except OSError as exc:
            raise SignerError(f"signer {uri}: cannot read {path} ({exc.strerror})") from exc
        except (ValueError, TypeError) as exc:
            raise SignerError(f"signer {uri}: not an unencrypted PEM private key ({exc})") from exc
        return SSlibKey.from_crypto(private.public_key())
    if scheme == "hsm":
        from securesystemslib.signer import HSMSigner

        parsed = parse.urlparse(uri)
        keyid = int(parsed.path) if parsed.path else HSMSigner.SCHEME_KEYID
        label = dict(parse.parse_qsl(parsed.query)).get("label")
        try:
            _, key = HSMSigner.import_(keyid, label, _pin)
        except Exception as exc:  # python-pkcs11 and securesystemslib raise several types
            raise SignerError(f"signer {uri}: {_describe(exc)}") from exc
        return key
    if scheme in ("awskms", "gcpkms", "azurekms"):
        raise SignerError(
            f"signer {uri}: import cloud KMS keys with securesystemslib's {scheme} signer's import_() "
            "and pass the public key with --public-key"
        )
    raise SignerError(f"signer {uri!r}: unknown scheme (file2:, hsm:, awskms:, gcpkms:, azurekms:)")


def load_signer(uri: str, public_key: Key) -> Signer:
    """A signer for `uri`, checked against `public_key` where the scheme allows."""
    try:
        if parse.urlparse(uri).scheme == FILE_SCHEME:
            path = Path(parse.urlparse(uri).path)
            private = load_pem_private_key(path.read_bytes(), None)
            if (
                not isinstance(public_key, SSlibKey)
                or SSlibKey.from_crypto(private.public_key()).keyval != public_key.keyval
            ):
                raise SignerError(f"signer {uri}: the key in {path} is not key {public_key.keyid[:16]}…")
            return CryptoSigner(private, public_key)
        return Signer.from_priv_key_uri(uri, public_key, _pin)
    except SignerError:
        raise
    except FileNotFoundError as exc:
        raise SignerError(f"signer {uri}: no such key file") from exc
    except OSError as exc:
        raise SignerError(f"signer {uri}: cannot read ({exc.strerror})") from exc
    except Exception as exc:  # securesystemslib, cryptography and the token libraries raise several types
        raise SignerError(f"signer {uri}: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if "PYKCS11LIB" in text:
        return "set PYKCS11LIB to the PKCS#11 library (SoftHSM2: /usr/lib/softhsm/libsofthsm2.so)"
    return text


class Keyring:
    """Private keys at hand for one command: key id → signer URI.

    The repository's own (online) keys come from repo.json; offline keys come from a
    directory the operator mounts for the command (``--offline-keys``) or URIs they name.
    """

    def __init__(self, uris: dict[str, str] | None = None) -> None:
        self.uris: dict[str, str] = dict(uris or {})

    @classmethod
    def from_dir(cls, directory: Path | None) -> Keyring:
        """Every ``ROLE/<keyid>.pem`` under `directory` (the layout `repo init` writes)."""
        ring = cls()
        if directory is None:
            return ring
        if not directory.is_dir():
            raise SignerError(f"{directory}: no such key directory")
        for pem in sorted(directory.glob("*/*.pem")):
            ring.uris[pem.stem] = file_uri(pem)
        return ring

    @classmethod
    def from_uris(cls, uris: Iterable[str]) -> Keyring:
        ring = cls()
        for uri in uris:
            ring.uris[public_key_for_uri(uri).keyid] = uri
        return ring

    def merged(self, other: Keyring) -> Keyring:
        return Keyring({**self.uris, **other.uris})

    def signer(self, key: Key) -> Signer | None:
        uri = self.uris.get(key.keyid)
        return None if uri is None else load_signer(uri, key)

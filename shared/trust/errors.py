"""Named trust failures, mapped from python-tuf's at the boundary.

Two roots, as in python-tuf: `TrustError` when the repository's metadata or
a target fails verification (an attack or a broken repository), and
`FetchError` when bytes could not be fetched (a network problem that a retry
may fix).
"""

from shared.errors import TidegateError


class TrustError(TidegateError):
    """Update trust failed: nothing fetched in this call may be used."""


class RepositoryConfigError(TrustError):
    """The local repository directory is incomplete (no keys, no config, no metadata)."""


class SignatureError(TrustError):
    """Metadata is not signed by a threshold of trusted keys (unknown key, or too few)."""


class RollbackAttackError(TrustError):
    """Metadata version went backwards or stayed equal where it must grow."""


class ExpiredMetadataError(TrustError):
    """Metadata has expired: the repository may be frozen by an attacker, or not refreshed."""


class HashMismatchError(TrustError):
    """A target or metadata file's bytes differ from what signed metadata says."""


class TooLargeError(TrustError):
    """More bytes arrived than the signed or configured length allows (endless data)."""


class TargetNotFoundError(TrustError):
    """No target of that name is in the signed targets metadata."""


class FetchError(TrustError):
    """Bytes could not be fetched (connection, timeout, HTTP status)."""

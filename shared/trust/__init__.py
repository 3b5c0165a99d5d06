"""Update trust: a TUF repository on disk (`UpdateRepository`) and the client
helper that verifies and fetches from it (`TrustClient`), built on python-tuf.
"""

from shared.trust.client import TargetInfo, TrustClient, TrustLimits
from shared.trust.errors import (
    ExpiredMetadataError,
    FetchError,
    HashMismatchError,
    RepositoryConfigError,
    RollbackAttackError,
    SignatureError,
    TargetNotFoundError,
    TooLargeError,
    TrustError,
)
from shared.trust.fetcher import TidegateFetcher, Timeouts, source_to_url
from shared.trust.repository import PublishedTarget, RepoConfig, UpdateRepository, default_target_path

__all__ = [
    "ExpiredMetadataError",
    "FetchError",
    "HashMismatchError",
    "PublishedTarget",
    "RepoConfig",
    "RepositoryConfigError",
    "RollbackAttackError",
    "SignatureError",
    "TargetInfo",
    "TargetNotFoundError",
    "TidegateFetcher",
    "Timeouts",
    "TooLargeError",
    "TrustClient",
    "TrustError",
    "TrustLimits",
    "UpdateRepository",
    "default_target_path",
    "source_to_url",
]

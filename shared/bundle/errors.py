"""Every reason a bundle can be refused, each a named exception.

Messages name the member and the reason, because the person reading them is
a bench engineer holding a bundle that will not install.
"""

from shared.errors import TidegateError


class BundleError(TidegateError):
    """A bundle was refused."""


class ManifestError(BundleError):
    """``bundle.json`` is missing, not JSON, or fails its schema."""


class ManifestNotFirstError(ManifestError):
    """``bundle.json`` must be the first member so the rest can be checked while streaming."""


class UnsafePathError(BundleError):
    """A member name is absolute, contains ``..``, or is otherwise not a plain relative path."""


class LinkMemberError(BundleError):
    """A symbolic or hard link: links could point outside the slot."""


class SpecialFileError(BundleError):
    """A device file, FIFO or other non-regular member."""


class DuplicateMemberError(BundleError):
    """The same name appears twice; the second copy could shadow a verified first."""


class UnlistedMemberError(BundleError):
    """A member that ``bundle.json`` does not list."""


class MemberSizeError(BundleError):
    """A member is larger (or smaller) than ``bundle.json`` declares."""


class TotalSizeError(BundleError):
    """The bundle's payload exceeds the configured cap."""


class DigestMismatchError(BundleError):
    """A member's SHA-256 differs from the one ``bundle.json`` declares."""


class MissingMemberError(BundleError):
    """A file listed in ``bundle.json`` is not in the archive."""


class CompressionError(BundleError):
    """The archive is not a readable tar/zstd stream, or decompression exceeded its bounds."""

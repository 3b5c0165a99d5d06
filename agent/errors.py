"""Named agent errors. Refusals leave the active slot exactly as it was."""

from shared.errors import TidegateError


class AgentError(TidegateError):
    """An agent operation failed."""


class NotProvisionedError(AgentError):
    """The device root has not been provisioned (`tidegate agent provision`)."""


class BusyError(AgentError):
    """Another agent process holds the device lock."""


class CorruptStateError(AgentError):
    """The state file cannot be read; the agent will not guess."""


class IllegalTransitionError(AgentError):
    """A state change the install state machine does not allow."""


class InstallInProgressError(AgentError):
    """An earlier install was interrupted; run recover first."""


class InstallRefusedError(AgentError):
    """The update was refused before anything on the device changed."""


class SkuMismatchError(InstallRefusedError):
    """The bundle is not built for this device's SKU."""


class AgentTooOldError(InstallRefusedError):
    """The bundle needs a newer agent."""


class DowngradeError(InstallRefusedError):
    """The bundle is older than the installed one and not signed as an allowed rollback."""


class NotEnoughDiskError(InstallRefusedError):
    """Free space is below what writing the slot needs plus the configured reserve."""


class NothingToRollBackToError(AgentError):
    """There is no other committed slot to go back to."""


class KnownBadBundleError(AgentError):
    """This exact bundle already failed its trial here; it is not tried again."""


class PreconditionsUnmetError(AgentError):
    """Device-side preconditions stopped the install before the flip; it is retried later."""

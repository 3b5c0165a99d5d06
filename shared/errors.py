"""The root of every exception Tidegate raises on purpose.

The CLI prints the message of a `TidegateError` as one line and exits
non-zero; anything else is a bug and gets a traceback.
"""


class TidegateError(Exception):
    """Base class of every deliberate, user-facing Tidegate error."""

    exit_code: int = 1
    #: What an HTTP API answers this error with. A deliberate error is about the caller's input
    #: unless the package's own root says otherwise (the gateway's errors, the fleet server's).
    http_status: int = 422

"""User-facing errors.

Everything a user can cause (bad path, corrupt file, bad SQL, locked store) raises a
`CkptscopeError` subclass whose message is one line saying what is wrong and what to do.
The CLI prints exactly that line and exits non-zero; anything else is a bug and keeps its
traceback.
"""


class CkptscopeError(Exception):
    """A problem with the user's input or environment, reported as one line."""


class SourceError(CkptscopeError):
    """The checkpoint source is missing, empty, corrupt or inconsistent."""


class StoreError(CkptscopeError):
    """The store cannot be opened, is locked, or a query is invalid or not allowed."""


class MissingRevision(SourceError):
    """A published step that has no weights (or vanished): recorded as missing, not fatal."""

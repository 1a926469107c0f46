"""The project's one exception type for problems a user can cause and fix.

Lives in checks/ (the bottom layer) so that pure checks, the shell and the
renderers can all raise it; the CLI prints its message and exits 2.
"""


class AuditError(Exception):
    """A bad input: the message names the file (or setting) and what to do about it."""

"""Pure judges: evidence in, findings out. No disk access, no model execution."""

from checks.errors import AuditError

__all__ = ["AuditError"]

"""Every error lakegate raises on purpose, in one tree.

    LakegateError
    ├── ClientError            what the caller did wrong; the message goes to the agent as is
    │   ├── PolicyDenied       the policy set does not allow this principal to do this
    │   ├── NotFound           no such dataset, column, metric or tool (or not visible to the caller)
    │   ├── InvalidArgument    an argument is malformed or out of range
    │   │   └── InvalidQuery   SQL that is not one read-only query lakegate can resolve
    │   ├── LimitExceeded      a row, byte, time or memory budget was exceeded
    │   │   └── QuotaExceeded  the caller's quota (calls per minute, concurrent calls, daily budget) is used up
    │   └── Cancelled          the client cancelled the call (only ever in the audit record)
    └── ServerError            lakegate's own failure; the agent sees a short generic message
        ├── BackendError       a storage engine (pyiceberg, DuckDB, Lance) failed
        ├── AuditWriteError    the audit record could not be written (the call fails closed)
        ├── PolicyUnavailable  the policy store cannot be confirmed current (fails closed; retry)
        ├── ConfigurationError settings or definition files are invalid
        └── GovernanceViolation the engine read something the gate did not hand it (fails closed)

Client errors carry a `hint`: what the agent can do instead. Server errors keep their details
for the log only.
"""

from __future__ import annotations

__all__ = [
    "AuditWriteError",
    "BackendError",
    "Cancelled",
    "ClientError",
    "ConfigurationError",
    "GovernanceViolation",
    "InvalidArgument",
    "InvalidQuery",
    "LakegateError",
    "LimitExceeded",
    "NotFound",
    "PolicyDenied",
    "PolicyUnavailable",
    "QuotaExceeded",
    "ServerError",
    "SourceUnavailable",
]


class LakegateError(Exception):
    """Root of every error lakegate raises on purpose."""

    #: The outcome class written to the audit record ("denied", "not_found", ...).
    outcome = "error"


class ClientError(LakegateError):
    """The caller did something wrong; the message is safe and useful to show them."""

    outcome = "client_error"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} {self.hint}" if self.hint else self.message


class PolicyDenied(ClientError):
    """The policy set does not allow the principal this action on this resource."""

    outcome = "denied"

    def __init__(self, message: str, *, hint: str | None = None, rule: list[str] | None = None) -> None:
        super().__init__(message, hint=hint)
        self.rule = rule or []


class NotFound(ClientError):
    outcome = "not_found"


class InvalidArgument(ClientError):
    outcome = "invalid"


class InvalidQuery(InvalidArgument):
    """The SQL is not something lakegate runs: not parseable, not read-only, or not resolvable."""


class LimitExceeded(ClientError):
    outcome = "limit_exceeded"


class QuotaExceeded(LimitExceeded):
    """The caller has used up one of its quotas (policies/quotas.py): the call was not run.

    `limit` names the quota ("calls_per_minute.query", "concurrent_calls", "daily_scan_bytes",
    "daily_rows"), `used` and `allowed` are in its unit, and `retry_after_s` says when it frees up.
    """

    outcome = "limited"

    def __init__(
        self, message: str, *, hint: str | None, limit: str, used: int, allowed: int, retry_after_s: int
    ) -> None:
        super().__init__(message, hint=hint)
        self.limit = limit
        self.used = used
        self.allowed = allowed
        self.retry_after_s = retry_after_s


class Cancelled(ClientError):
    """The client cancelled the call before it finished."""

    outcome = "cancelled"

    def __init__(self) -> None:
        super().__init__("The client cancelled the call.")


class ServerError(LakegateError):
    """lakegate itself failed; details go to the log, not to the agent."""

    outcome = "server_error"
    public_message = "lakegate could not complete this call because of an internal error."


class BackendError(ServerError):
    outcome = "backend_error"


class SourceUnavailable(BackendError):
    """A table of an attached catalog (catalog/attached_catalogs.py) or an attached dataset of
    documents (catalog/attached_documents.py) cannot be read: the catalog or the files cannot be
    reached, or do not hold what the settings say. The agent is told which table and that the server's
    settings are at fault (never a path, a location or a credential); the details go to the log."""

    outcome = "source_unavailable"

    def __init__(self, detail: str, *, table: str, catalog: str | None = None) -> None:
        super().__init__(detail)
        if catalog is None:  # an attached dataset of documents (catalog/attached_documents.py)
            what = "its files cannot be reached or read as configured"
            check = f'[documents."{table}"] in lakegate.toml: uri, columns, storage_options and their credentials'
        else:
            what = f"the catalog {catalog} or the table's files cannot be reached"
            check = (
                f"the settings of catalog {catalog} ([catalogs.{catalog}] in lakegate.toml: uri, warehouse, "
                "the s3.* properties and their credentials)"
            )
        self.public_message = (
            f"lakegate could not read {table}: {what} right now. This is not your request's fault: retry later, "
            f"or ask the platform team to check {check}."
        )


class AuditWriteError(ServerError):
    outcome = "audit_error"
    public_message = "lakegate could not write the audit record for this call, so it returned no data."


class PolicyUnavailable(ServerError):
    """The policy store could not be confirmed current (production profile): nothing is answered
    until it can, and the caller is told to retry, not that it was denied something."""

    outcome = "policy_unavailable"
    public_message = (
        "lakegate could not confirm that its policy is current, so it answered nothing (it fails closed). "
        "Retry in a few seconds."
    )


class ConfigurationError(ServerError):
    outcome = "configuration_error"


class GovernanceViolation(ServerError):
    """The query engine's account of what it read disagrees with what the gate handed it.

    Only a bug can cause this (the SQL guard and the engine read a query differently): the call
    returns no data, and the audit record says `policy_error`.
    """

    outcome = "policy_error"
    public_message = "lakegate stopped this call because the query engine did not read what the policy allowed."

"""The audit record as one frozen, typed model: what every reader of the log parses a line into.

Records are built in one place, `lakegate.server.audit.record_builders` (one function per kind: a
tool call, a listing, a request refused before the gate), and written by the log as the canonical
JSON of `AuditRecord.model_dump`, to which the log adds ``seq``, ``time``, ``prev_hash`` and
``hash``. The hash covers that JSON, so the dump keeps the keys exactly as lakegate has always
written them: every field is written, null or not, except the ones a record only sometimes holds
(``details``, ``count``, and the log's fields before it adds them), which are left out when None.

Reading (`read_audit_records`, `audit_record`) is strict about types and lenient about additions:

- a field every version of the gate has written is required, and a value must have its type as
  written (no coercion: ``"5"`` is not a row count, ``true`` is not a number);
- unknown fields are kept (``extra="allow"``): a later version's, or the production mirror's
  ``replica`` and ``global_seq``, ride along in ``model_extra``, survive a dump, and land in the
  export's ``extra`` column.

A line that is JSON but not a record is an `AuditFormatError` naming its file and line, as a line
that is not JSON is. Verification does not go through the model: the chain covers whatever a line
holds, so `lakegate.server.audit.verify` hashes the line as read, and an unknown field can never
fail it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_serializer,
)

from lakegate.server.audit.files import log_files
from lakegate.server.audit.records import AuditFormatError, read_records

__all__ = [
    "LISTING_METHODS",
    "AuditClient",
    "AuditRecord",
    "AuditResource",
    "Decision",
    "audit_record",
    "read_audit_records",
]

#: What the policy decided for a call: everything allowed, allowed in part (masked, hidden or
#: filtered data), or refused.
Decision = Literal["allow", "partial", "deny"]
#: The MCP listings that leave an audit record (lakegate serves no prompts, so no prompts/list).
LISTING_METHODS = ("tools/list", "resources/list", "resources/templates/list")
#: Fields a record holds only sometimes: left out of the written JSON when None.
_LEFT_OUT_WHEN_NONE = ("details", "count", "seq", "time", "prev_hash", "hash")
#: Validation problems spelled out when a line is not a record; the rest are counted.
_SHOWN_PROBLEMS = 3

_Count = Annotated[StrictInt, Field(ge=1)]
_Amount = Annotated[StrictInt, Field(ge=0)]


class AuditClient(BaseModel):
    """The MCP client that sent the request, as it named itself (nothing for a refused request)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    name: StrictStr | None
    version: StrictStr | None


class AuditResource(BaseModel):
    """One thing a call touched and what the policy let it do with it.

    ``type`` is tool, dataset, column, metric, document, policy, ...; ``access`` read, masked,
    hidden, filtered, denied, metadata, write, ...; ``version`` the snapshot or version read or
    written, when there is one.
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    type: StrictStr
    name: StrictStr
    access: StrictStr
    version: StrictInt | None


class AuditRecord(BaseModel):
    """One audit record: a tool call, a listing (`is_listing`), or a request refused before the gate
    (no ``tool``, decision ``deny``), which may stand for several requests (``count``).

    ``seq``, ``time``, ``prev_hash`` and ``hash`` are the log's: None in a record not written yet.
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    request_id: StrictStr
    session_id: StrictStr | None
    principal: StrictStr
    roles: tuple[StrictStr, ...]
    authenticated_by: StrictStr | None
    transport: StrictStr
    client: AuditClient
    #: The tool called (cut to the gate's limit), the listing's MCP method, or None for a refusal.
    tool: StrictStr | None
    #: As logged: sensitive values redacted or keyed hashes (`lakegate.server.audit.redaction`).
    arguments: dict[str, Any]
    decision: Decision
    #: The policy rules that decided, each as its policy.csv fields (subject, object, action, effect).
    rules: tuple[tuple[StrictStr, ...], ...]
    policy_version: StrictStr
    resources: tuple[AuditResource, ...]
    #: Rows returned (a listing: items listed); 0 for a call that failed.
    rows: _Amount
    #: Size of the result sent (its JSON); 0 for a call that failed.
    bytes: _Amount
    duration_ms: StrictInt | StrictFloat
    #: "ok", or the error's outcome class ("denied", "not_found", "unauthenticated", ...).
    outcome: StrictStr
    #: The message the client was given, or None.
    error: StrictStr | None
    #: What the tool or the transport added (rewritten SQL, snapshots read, the refused request, ...).
    details: dict[str, Any] | None = None
    #: The requests a grouped refusal record stands for (`lakegate.server.audit.refusals.RefusalLog`).
    count: _Count | None = None
    seq: Annotated[StrictInt, Field(ge=1)] | None = None
    time: StrictStr | None = None
    prev_hash: StrictStr | None = None
    hash: StrictStr | None = None

    @model_serializer(mode="wrap")
    def _as_written(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        dumped: dict[str, Any] = handler(self)
        for name in _LEFT_OUT_WHEN_NONE:
            if dumped.get(name, ...) is None:
                del dumped[name]
        # Lists, as JSON reads them back: a dump equals its line parsed (tuples keep the model frozen).
        for name in ("roles", "resources"):
            if name in dumped:
                dumped[name] = list(dumped[name])
        if "rules" in dumped:
            dumped["rules"] = [list(rule) for rule in dumped["rules"]]
        return dumped

    @property
    def is_listing(self) -> bool:
        """Whether this is a listing's record: `tool` is the method and `details.listing` names it too
        (an agent can call a tool named "tools/list", but cannot set `details`)."""
        return self.tool in LISTING_METHODS and self.details is not None and self.details.get("listing") == self.tool

    @property
    def is_denial(self) -> bool:
        """A call or request the policy (or the transport's checks) refused."""
        return self.decision == "deny" or self.outcome == "denied"

    @property
    def is_error(self) -> bool:
        """A call that failed for any reason other than a denial."""
        return self.outcome != "ok" and not self.is_denial

    @property
    def requests(self) -> int:
        """How many requests the record stands for: a grouped refusal's ``count``, else one."""
        return self.count if self.count is not None else 1

    @property
    def written_at(self) -> datetime | None:
        """``time`` as an aware datetime (UTC when it names no zone); None when absent or unreadable."""
        if self.time is None:
            return None
        try:
            value = datetime.fromisoformat(self.time)
        except ValueError:
            return None
        return value if value.tzinfo else value.replace(tzinfo=UTC)


def audit_record(value: Mapping[str, Any], *, line: int | None = None, file: str | None = None) -> AuditRecord:
    """One record as read from the log (a JSON object) parsed into the model.

    Raises:
        AuditFormatError: it is not an audit record (a field missing, or a value of the wrong type);
            ``line`` and ``file`` say where it was.
    """
    try:
        return AuditRecord.model_validate(value)
    except ValidationError as exc:
        raise AuditFormatError(line, _problems(exc), file=file) from exc


def read_audit_records(path: Path) -> Iterator[AuditRecord]:
    """Every record of the log headed by ``path`` (its rotated files first), as models, in chain order.

    Like `lakegate.server.audit.files.read_all_records`, a file rotated away or pruned while this
    reads is skipped; for a checked, complete view run `verify` first.

    Raises:
        FileNotFoundError: the log's directory does not exist (a missing log: no records).
        OSError: a file cannot be read.
        AuditFormatError: a line is not JSON, or not an audit record (``.file`` and ``.line`` say which).
    """
    for file in log_files(path):
        try:
            for number, value in enumerate(read_records(file), start=1):
                yield audit_record(value, line=number, file=file.name)
        except FileNotFoundError:
            continue
        except AuditFormatError as exc:
            if exc.file is not None:
                raise
            raise AuditFormatError(exc.line, exc.reason, file=file.name) from exc


def _problems(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    shown = [
        f"{'.'.join(str(part) for part in error['loc']) or 'record'}: {error['msg']}"
        for error in errors[:_SHOWN_PROBLEMS]
    ]
    more = len(errors) - _SHOWN_PROBLEMS
    return "not an audit record (" + "; ".join(shown) + (f"; and {more} more" if more > 0 else "") + ")"

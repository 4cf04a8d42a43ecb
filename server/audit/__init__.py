"""The audit trail: the hash-chained log, its files, checkpoints and verification, the PostgreSQL
chain, export, review and report, and the records of calls, listings and refused requests.

What the rest of the server uses of it; review, report, export and the PostgreSQL chain are
imported from their modules by the commands that need them.
"""

from lakegate.server.audit.log import AuditLog, VerifyReport, read_records, verify
from lakegate.server.audit.record_model import AuditRecord, audit_record, read_audit_records

__all__ = ["AuditLog", "AuditRecord", "VerifyReport", "audit_record", "read_audit_records", "read_records", "verify"]

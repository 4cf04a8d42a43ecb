"""The audit trail: the hash-chained log, its files, checkpoints and verification, the PostgreSQL
chain, export, review and report, and the records of calls and refused requests."""

"""The gate and the call scope: principal -> Casbin decision -> run -> audit record -> result.

What the rest of the server uses of it; the modules beside hold the details (governed SQL in
governed_query, role grants from tokens in role_grants).
"""

from lakegate.server.gate.gate import Gate, GateOutcome, to_call_result
from lakegate.server.gate.identity import CallOrigin, Principal, stdio_principal
from lakegate.server.gate.scope import CallScope, ProgressFn

__all__ = [
    "CallOrigin",
    "CallScope",
    "Gate",
    "GateOutcome",
    "Principal",
    "ProgressFn",
    "stdio_principal",
    "to_call_result",
]

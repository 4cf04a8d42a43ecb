"""Bearer tokens for the HTTP transport.

lakegate is an OAuth 2.1 resource server: it verifies the JWT access tokens an authorization
server issued (signature, `exp`/`nbf`/`iat` with a small leeway, `iss`, and `aud`, which must name
this resource's URL) and never passes a client's token on to anything else. Keys come from a local
JWKS file (RS256, ES256) or, for development, a shared secret (HS256). A refused request gets
HTTP 401 with a `WWW-Authenticate: Bearer` challenge that points at the protected resource
metadata (RFC 9728), and leaves an audit record without the token (through `RefusalLog`, which
counts a flood of refusals into one record per client and window).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import structlog
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from starlette.authentication import AuthCredentials
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from lakegate.errors import ClientError, ConfigurationError
from lakegate.server.audit.record_builders import refused_request_record
from lakegate.server.audit.record_model import AuditRecord
from lakegate.server.audit.redaction import loggable
from lakegate.server.audit.refusals import RefusalLog
from lakegate.server.gate.identity import ANONYMOUS, ROLE_PREFIX
from lakegate.server.settings import Settings

__all__ = [
    "TOKEN_SCOPE_KEY",
    "BearerGuard",
    "InvalidToken",
    "JwtVerifier",
    "VerifiedToken",
    "challenge",
    "client_address",
    "http_refusal_record",
    "mint_token",
    "resource_url",
    "resource_metadata_url",
    "refusal_record",
]

log = structlog.get_logger(__name__)

#: Where the guard leaves the verified token in the ASGI scope, for the MCP handlers.
TOKEN_SCOPE_KEY = "lakegate.token"
METADATA_PATH = "/.well-known/oauth-protected-resource"
MCP_PATH = "/mcp"
MIN_SECRET_BYTES = 32
ASYMMETRIC_ALGORITHMS = ("RS256", "ES256")
MAX_SUBJECT = 200
#: How much of a header an audit record keeps (Host, Origin and User-Agent are the client's to fill).
MAX_LOGGED_HEADER = 200


class InvalidToken(ClientError):
    """A bearer token that lakegate does not accept; `reason` is a short code for metrics."""

    outcome = "unauthenticated"

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message, hint="Get a new access token from the authorization server.")
        self.reason = reason


@dataclass(frozen=True)
class VerifiedToken:
    """What lakegate keeps of a token it verified: never the token itself."""

    subject: str
    issuer: str
    client_id: str
    claimed_roles: tuple[str, ...]
    scopes: tuple[str, ...]
    expires_at: int
    token_id: str | None
    algorithm: str


def public_base_url(settings: Settings) -> str:
    """Where clients reach the server: `http.public_url`, else http://<host>:<port>."""
    if settings.http.public_url:
        return settings.http.public_url.rstrip("/")
    host = settings.http.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal
    return f"http://{host}:{settings.http.port}"


def resource_url(settings: Settings) -> str:
    """The protected resource's URL (the MCP endpoint), which tokens must name as audience."""
    return public_base_url(settings) + MCP_PATH


def resource_metadata_url(settings: Settings) -> str:
    """The RFC 9728 metadata URL of the resource: the well-known path with the resource's path after it."""
    return public_base_url(settings) + METADATA_PATH + MCP_PATH


def _quoted(text: str) -> str:
    # An auth-param value is a quoted-string: no quotes, backslashes or line breaks inside.
    return "".join(ch for ch in text if ch not in '"\\\r\n')


def challenge(settings: Settings, error: InvalidToken | None) -> str:
    """The `WWW-Authenticate` value of a 401: no error code when the request carried no token
    (RFC 6750 section 3.1), `invalid_token` with a description otherwise."""
    parts = [f'resource_metadata="{resource_metadata_url(settings)}"']
    if settings.auth.scopes:
        parts.append(f'scope="{_quoted(" ".join(settings.auth.scopes))}"')
    if error is not None:
        parts += ['error="invalid_token"', f'error_description="{_quoted(error.message)}"']
    return "Bearer " + ", ".join(parts)


def bearer_token(headers: Headers) -> str | None:
    """The token of an `Authorization: Bearer` header, or None when there is none."""
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """A claim by name, or by a dotted path into nested objects (`realm_access.roles`)."""
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _strings(value: Any) -> tuple[str, ...]:
    """A claim that lists names: a JSON list of strings, or one space- or comma-separated string."""
    if isinstance(value, str):
        return tuple(part for part in value.replace(",", " ").split() if part)
    if isinstance(value, list):
        return tuple(item for item in value if isinstance(item, str) and item)
    return ()


class _KeySet:
    """The JWKS file's signing keys, re-read when the file changes (key rotation)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[float, int] | None = None
        self._keys: list[jwt.PyJWK] = []
        self._load()

    def _load(self) -> None:
        try:
            stat = self.path.stat()
            data = json.loads(self.path.read_text())
            keys = jwt.PyJWKSet.from_dict(data).keys
        except (OSError, ValueError, jwt.PyJWTError) as exc:
            raise ConfigurationError(f"cannot read the JWKS file {self.path}: {exc}") from exc
        self._keys = [
            key for key in keys if key.algorithm_name in ASYMMETRIC_ALGORITHMS and key.public_key_use in (None, "sig")
        ]
        self._stamp = (stat.st_mtime, stat.st_size)
        if not self._keys:
            raise ConfigurationError(f"the JWKS file {self.path} holds no RS256 or ES256 signing key")

    def current(self) -> list[jwt.PyJWK]:
        with self._lock:
            try:
                stat = self.path.stat()
                changed = (stat.st_mtime, stat.st_size) != self._stamp
            except OSError:
                changed = True
            if changed:
                try:
                    self._load()
                except ConfigurationError:
                    # Fail closed: a key set that cannot be read verifies nothing until it is fixed.
                    log.error("auth.jwks_unreadable", path=str(self.path))
                    self._keys, self._stamp = [], None
            return list(self._keys)


class JwtVerifier:
    """Verifies bearer JWTs against the configured keys, issuer and audience.

    Raises:
        ConfigurationError: (on construction) no key is configured, the shared secret is shorter
            than 32 bytes, or the JWKS file cannot be read or holds no signing key.
    """

    def __init__(self, settings: Settings) -> None:
        auth = settings.auth
        self.issuer = auth.issuer
        self.audience = auth.audience or resource_url(settings)
        self.leeway = auth.leeway_s
        self.roles_claim = auth.roles_claim
        self._secret = _secret_bytes(settings)
        jwks = auth.jwks_file
        if jwks is not None and not jwks.is_absolute():
            jwks = settings.project / jwks
        self._keys = _KeySet(jwks) if jwks is not None else None
        if self._secret is None and self._keys is None:
            raise ConfigurationError(
                "serve --http needs keys to check bearer tokens: set LAKEGATE_AUTH__JWKS_FILE (the identity "
                "provider's public keys) or, for development, LAKEGATE_AUTH__SHARED_SECRET"
            )

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The signature algorithms accepted with the configured keys."""
        return (("HS256",) if self._secret else ()) + (ASYMMETRIC_ALGORITHMS if self._keys else ())

    def verify(self, token: str) -> VerifiedToken:
        """Check a bearer token and return who it names.

        Raises:
            InvalidToken: the token is malformed, signed with an algorithm or key lakegate does not
                accept, badly signed, expired, not yet valid, for another audience or issuer, or
                lacks a usable subject. The message says which, without the token's content.
        """
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise InvalidToken("The bearer token is not a well-formed JWT.", "malformed") from exc
        algorithm = header.get("alg")
        key = self._key_for(algorithm, header.get("kid"))
        assert isinstance(algorithm, str)  # _key_for accepts only named algorithms
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise InvalidToken("The token has expired.", "expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise InvalidToken("The token is not valid yet (nbf or iat is in the future).", "not_yet_valid") from exc
        except jwt.InvalidAudienceError as exc:
            raise InvalidToken(
                f"The token was not issued for this resource (aud must be {self.audience}).", "audience"
            ) from exc
        except jwt.InvalidIssuerError as exc:
            raise InvalidToken("The token's issuer is not trusted here.", "issuer") from exc
        except jwt.InvalidSignatureError as exc:
            raise InvalidToken("The token's signature does not verify.", "signature") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidToken(f"The token lacks the {exc.claim} claim.", "claims") from exc
        except jwt.DecodeError as exc:
            raise InvalidToken("The bearer token is not a well-formed JWT.", "malformed") from exc
        except jwt.PyJWTError as exc:
            raise InvalidToken("The token is invalid.", "invalid") from exc
        return self._verified(claims, algorithm)

    def _key_for(self, algorithm: Any, kid: Any) -> Any:
        if algorithm == "HS256" and self._secret is not None:
            return self._secret
        if algorithm in ASYMMETRIC_ALGORITHMS and self._keys is not None:
            keys = [key for key in self._keys.current() if key.algorithm_name == algorithm]
            if isinstance(kid, str):
                keys = [key for key in keys if key.key_id == kid]
            if len(keys) == 1:
                return keys[0].key
            if keys:
                raise InvalidToken("The token must name its signing key (kid).", "unknown_key")
            raise InvalidToken("The token's signing key is not in this server's key set.", "unknown_key")
        accepted = ", ".join(self.algorithms)
        raise InvalidToken(f"The token's signature algorithm is not accepted here (accepted: {accepted}).", "algorithm")

    def _verified(self, claims: Mapping[str, Any], algorithm: str) -> VerifiedToken:
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject.strip() or len(subject) > MAX_SUBJECT:
            raise InvalidToken("The token's sub claim is not a usable name.", "claims")
        if subject.startswith(ROLE_PREFIX) or subject == ANONYMOUS or not subject.isprintable():
            # A subject named like a role would be decided as that role by Casbin.
            raise InvalidToken("The token's sub claim names a role or a reserved principal.", "claims")
        scopes = _strings(claims.get("scope")) or _strings(claims.get("scp"))
        client = claims.get("client_id") or claims.get("azp") or subject
        jti = claims.get("jti")
        return VerifiedToken(
            subject=subject,
            issuer=str(claims["iss"]),
            client_id=str(client),
            claimed_roles=_strings(claim_at(claims, self.roles_claim)),
            scopes=scopes,
            expires_at=int(claims["exp"]),
            token_id=jti if isinstance(jti, str) else None,
            algorithm=algorithm,
        )


def _secret_bytes(settings: Settings) -> bytes | None:
    secret = settings.auth.shared_secret
    if secret is None:
        return None
    value = secret.get_secret_value().encode()
    if len(value) < MIN_SECRET_BYTES:
        raise ConfigurationError(
            f"LAKEGATE_AUTH__SHARED_SECRET must be at least {MIN_SECRET_BYTES} bytes "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return value


def mint_token(settings: Settings, subject: str, roles: tuple[str, ...], ttl_s: int) -> str:
    """An HS256 token for development, signed with the shared secret, as `serve --http` accepts it.

    Raises:
        ConfigurationError: no shared secret is configured, or it is too short.
    """
    secret = _secret_bytes(settings)
    if secret is None:
        raise ConfigurationError("lakegate token needs LAKEGATE_AUTH__SHARED_SECRET (development only)")
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": settings.auth.issuer,
        "aud": settings.auth.audience or resource_url(settings),
        "sub": subject,
        "iat": now,
        "nbf": now,
        "exp": now + ttl_s,
        "jti": uuid.uuid4().hex,
    }
    # The roles go where the verifier reads them, nested objects included.
    *parents, leaf = settings.auth.roles_claim.split(".")
    target = claims
    for part in parents:
        target = target.setdefault(part, {})
    target[leaf] = list(roles)
    return jwt.encode(claims, secret, algorithm="HS256")


class BearerGuard:
    """ASGI middleware in front of the MCP endpoint: no valid token, no MCP.

    A verified request carries the SDK's `AuthenticatedUser` in `scope["user"]` (so the session
    manager binds each session to the identity that opened it) and the `VerifiedToken` under
    `TOKEN_SCOPE_KEY`. A refused one gets a 401 challenge and an audit record (`RefusalLog`).
    """

    def __init__(
        self,
        app: ASGIApp,
        settings: Settings,
        verifier: JwtVerifier,
        refusals: RefusalLog,
        policy_version: Callable[[], str],
        on_refused: Callable[[str], None],
    ) -> None:
        self.app = app
        self.settings = settings
        self.verifier = verifier
        self.refusals = refusals
        self.policy_version = policy_version
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = Headers(scope=scope)
        token = bearer_token(headers)
        try:
            if token is None:
                raise InvalidToken("This endpoint needs a bearer token.", "missing")
            verified = self.verifier.verify(token)
        except InvalidToken as exc:
            await self._refuse(scope, receive, send, headers, exc, sent_token=token is not None, started=started)
            return
        scope["user"] = AuthenticatedUser(
            AccessToken(
                # The SDK's user object wants a token string; a digest identifies it without holding it.
                token=hashlib.sha256(token.encode()).hexdigest(),
                client_id=verified.client_id,
                scopes=list(verified.scopes),
                expires_at=verified.expires_at,
                resource=self.verifier.audience,
                subject=verified.subject,
                claims={"iss": verified.issuer},
            )
        )
        scope["auth"] = AuthCredentials(list(verified.scopes))
        scope[TOKEN_SCOPE_KEY] = verified
        await self.app(scope, receive, send)

    async def _refuse(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: Headers,
        error: InvalidToken,
        *,
        sent_token: bool,
        started: float,
    ) -> None:
        self.on_refused(error.reason)
        record = refusal_record(
            scope, headers, error, policy_version=self.policy_version(), duration_s=time.perf_counter() - started
        )
        # One kind per reason (a small set): a client that sends expired tokens and one that sends
        # forged ones are told apart in the log even when they share an address.
        await self.refusals.refuse(record, kind=f"unauthenticated:{error.reason}", source=client_address(scope))
        body = (
            {"error": "invalid_token", "error_description": error.message}
            if sent_token
            else {"error": "unauthorized", "error_description": error.message}
        )
        response = JSONResponse(
            body,
            status_code=401,
            headers={"WWW-Authenticate": challenge(self.settings, error if sent_token else None)},
        )
        await response(scope, receive, send)


def client_address(scope: Scope) -> str | None:
    """The HTTP client's address as the server saw it (a proxy's, behind one: see `serve_http`)."""
    client = scope.get("client")
    return str(client[0]) if client else None


def _header(headers: Headers, name: str) -> str | None:
    value = headers.get(name)
    return loggable(value[:MAX_LOGGED_HEADER]) if value else None


def http_refusal_record(
    scope: Scope,
    headers: Headers,
    *,
    status: int,
    outcome: str,
    error: str,
    reason: str,
    policy_version: str,
    duration_s: float,
    principal: str = ANONYMOUS,
    roles: tuple[str, ...] = (),
    authenticated_by: str | None = None,
) -> AuditRecord:
    """The audit record of an HTTP request refused before the MCP layer: the gate's record shape,
    decision `deny`, the refusal as `outcome`, the HTTP status and what the request said about
    itself in `details` (never its token; headers cut to `MAX_LOGGED_HEADER` characters)."""
    return refused_request_record(
        request_id=uuid.uuid4().hex,
        session_id=_header(headers, "mcp-session-id"),
        principal=principal,
        roles=roles,
        authenticated_by=authenticated_by,
        transport="http",
        policy_version=policy_version,
        duration_s=duration_s,
        outcome=outcome,
        error=error,
        details={
            "reason": reason,
            "status": status,
            "http": {
                "method": scope.get("method"),
                "path": loggable(str(scope.get("path", ""))[:MAX_LOGGED_HEADER]),
                "remote": client_address(scope),
                "user_agent": _header(headers, "user-agent"),
                "origin": _header(headers, "origin"),
                "host": _header(headers, "host"),
            },
        },
    )


def refusal_record(
    scope: Scope, headers: Headers, error: InvalidToken, *, policy_version: str, duration_s: float
) -> AuditRecord:
    """The audit record of a request refused for its token: `http_refusal_record` with status 401,
    outcome `unauthenticated` and the token's problem as `reason`."""
    return http_refusal_record(
        scope,
        headers,
        status=401,
        outcome=error.outcome,
        error=error.message,
        reason=error.reason,
        policy_version=policy_version,
        duration_s=duration_s,
        authenticated_by="bearer",
    )

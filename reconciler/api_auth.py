"""Who may use the HTTP face: one static Bearer token, loopback relaxed when configured.

The daemon calls `load` once when it starts the server (refusing a non-loopback bind without a
token), and the server's middleware calls `check` on every request. Rules (HME-002/004):
- The token comes from the environment variable `auth.token_env` or the file `auth.token_file`.
- A request from a loopback address needs no token when `auth.optional_on_loopback` (default);
  every other request needs `Authorization: Bearer <token>`.
- The header is trimmed; the scheme `Bearer` is matched in any case (RFC 9110); an empty
  token, a control character or a header over 8 KiB is refused. Tokens are compared in constant
  time. With no token configured, a loopback caller's header is not looked at (any key, in any
  form), but for its size. A token is printable ASCII (what every HTTP client can send), at
  least 16 characters; a token file others may read is warned about.
- Logs name the caller as `identity=localhost` or `identity=token:<fp6>` (the first 6 hex of
  sha256 of the token), never the token itself.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from state import desired, errors

MAX_HEADER_BYTES = 8192


@dataclass(frozen=True)
class Auth:
    token: str | None
    optional_on_loopback: bool
    warnings: tuple[str, ...] = ()  # logged when the server starts

    @property
    def fingerprint(self) -> str | None:
        return fingerprint(self.token) if self.token else None


@dataclass(frozen=True)
class Verdict:
    identity: str | None  # None: refused
    code: str = ""  # MISSING_TOKEN | BAD_TOKEN when refused
    message: str = ""


class Refused(errors.ConfigProblem):
    """Why the daemon may not listen with this auth: the field at fault, the problem and
    the fix apart (`orchctl validate` prints them as every other finding)."""

    def __init__(self, field: str, problem: str, fix: str | None = None) -> None:
        super().__init__(f"{field}: {problem}" + (f"; {fix}" if fix else ""))
        self.field, self.problem, self.fix = field, problem, fix


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:6]


def is_loopback_host(host: str) -> bool:
    host = host.strip().removeprefix("[").removesuffix("]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load(config: desired.DesiredState, base: Path, *, bind_host: str) -> Auth:
    """The token and policy of `config`; raises ConfigProblem for a non-loopback bind
    without a token (the server must not be reachable from the network unprotected)."""
    token = os.environ.get(config.auth.token_env) or None
    field, source = "auth.token_env", f"the API token in ${config.auth.token_env}"
    warnings: list[str] = []
    if config.auth.token_file:
        path = desired.resolve(base, config.auth.token_file)
        try:
            token = path.read_text(encoding="utf-8").strip() or None
            mode = path.stat().st_mode & 0o777
            field, source = "auth.token_file", f"the API token in {path}"
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
            raise Refused(
                "auth.token_file",
                f"cannot read {path}: {why}",
                "write the token into that file (`openssl rand -hex 24 > FILE; chmod 600 FILE`), "
                "or point auth.token_file at the file holding it",
            ) from None
        if mode & 0o077:
            warnings.append(
                f"auth.token_file {path} may be read by other users (mode {mode:03o}): "
                f"chmod 600 {path}"
            )
    if token is not None and (len(token) < 16 or any(not 33 <= ord(c) <= 126 for c in token)):
        short = len(token) < 16
        raise Refused(
            field,
            f"{source} is {f'{len(token)} characters' if short else 'not printable ASCII'}: "
            "it must be at least 16 printable ASCII characters without spaces (HTTP clients "
            "send no other)",
            "make one with `openssl rand -hex 24`",
        )
    if token is None and config.auth.token_file:
        raise Refused(
            "auth.token_file",
            f"{desired.resolve(base, config.auth.token_file)} is empty: no API token",
            "write the token into it: `openssl rand -hex 24 > FILE; chmod 600 FILE`",
        )
    if token is None and not config.auth.optional_on_loopback:
        # a token is asked of every caller, and there is none: the API would be open to all
        raise Refused(
            "auth.optional_on_loopback",
            f"is false, so every caller needs the API token, but ${config.auth.token_env} "
            "is not set",
            f"export {config.auth.token_env}=$(openssl rand -hex 24) (or set auth.token_file)",
        )
    if token is None and not is_loopback_host(bind_host):
        raise Refused(
            "server.bind",
            f"{bind_host} is reachable from the network, but no API token is set",
            f"export {config.auth.token_env}=$(openssl rand -hex 24) (or set auth.token_file), "
            "or bind 127.0.0.1 and use an SSH tunnel (docs/security.md)",
        )
    if token is not None:  # what the token keeps from other users, their file reads need not
        for name, folder in (("spool", config.paths.spool), ("results", config.paths.results)):
            path = desired.resolve(base, folder)
            try:
                mode = path.stat().st_mode & 0o777
            except OSError:
                continue  # made by the daemon later (with the umask's bits)
            if mode & 0o005:
                warnings.append(
                    f"paths.{name} {path} may be read by other users (mode {mode:03o}), who "
                    "would read every task's prompt and answer the API token keeps from them: "
                    f"chmod o-rx {path}"
                )
    return Auth(token, config.auth.optional_on_loopback, tuple(warnings))


def check(auth: Auth, *, remote: str | None, header: str | None) -> Verdict:
    loopback = remote is not None and is_loopback_host(remote)
    if header is None or not header.strip():
        if loopback and (auth.optional_on_loopback or auth.token is None):
            return Verdict("localhost")
        return Verdict(
            None,
            "MISSING_TOKEN",
            "this request needs `Authorization: Bearer <token>` (the token the daemon reads "
            "from auth.token_env or auth.token_file)",
        )
    if len(header) > MAX_HEADER_BYTES:
        return Verdict(None, "BAD_TOKEN", "the Authorization header is over 8 KiB")
    if auth.token is None and loopback:
        # no token configured: loopback callers may send any key, in any form (an SDK's
        # placeholder, `Bearer` with an empty key, another scheme); there is none to check
        return Verdict("localhost")
    scheme, _, given = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return Verdict(None, "BAD_TOKEN", "the Authorization header must be `Bearer <token>`")
    given = given.strip()
    if not given or any(ord(c) < 32 or ord(c) == 127 for c in given):
        return Verdict(None, "BAD_TOKEN", "the bearer token is empty or has control characters")
    try:
        given_bytes = given.encode()
    except UnicodeEncodeError:  # bytes that are not UTF-8 (aiohttp: lone surrogates)
        return Verdict(None, "BAD_TOKEN", "the bearer token is not UTF-8 text")
    if auth.token is None:
        return Verdict(None, "BAD_TOKEN", "no token is configured on this daemon")
    if not hmac.compare_digest(given_bytes, auth.token.encode()):
        return Verdict(None, "BAD_TOKEN", "the bearer token does not match")
    return Verdict(f"token:{fingerprint(given)}")

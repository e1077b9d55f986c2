"""Who is calling: identities come from credentials, never from what a request claims.

Two kinds of credentials, usable together:

- **Tokens**: a TOML file of ``client_id = "token"`` lines. An agent sends
  ``authorization: Bearer <token>`` metadata; the token maps to its client id (compared in constant
  time with ``hmac.compare_digest``). An optional ``[operators]`` table holds
  ``name = "token"`` entries for people and tools that may read trust (``fedwarden trust list
  --server``) but not train.
- **Mutual TLS**: the common name (CN) of the client certificate, verified by gRPC against
  ``--tls-client-ca``, is the identity. Operator identities are listed with ``--operator CN``.

With both, the token's client id and the certificate's CN must agree. With neither (only allowed
together with ``--insecure``, and on a loopback address unless told otherwise), identities are
taken on trust from the ``x-fedwarden-client-id`` metadata: fine for a demo, never for a
deployment; such an open coordinator never serves trust.

**Allow-list** (``--allow-clients FILE``, required for mutual TLS without tokens): the training
identities, one per line, as a client id (any certificate the CA signed for that CN) or a client
id and the SHA-256 fingerprint of its one certificate (``c00 sha256:9f1c...``; ``openssl x509
-in c00.pem -noout -fingerprint -sha256``). Without it, every certificate the CA ever signed
would be an identity. To revoke a client, delete its line (or change its fingerprint when you
reissue the certificate): the file is re-read when it changes, within a second, without a
restart. A file that disappears or no longer parses denies every training identity until fixed.

Example tokens file::

    c00 = "9f1c...e2"
    c01 = "77ab...0d"

    [operators]
    alice = "5d2e...91"
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import ssl
import threading
import time
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from fedwarden.errors import UsageError
from fedwarden.protocol.convert import CLIENT_ID_HEADER

MIN_TOKEN_LENGTH = 16
_FINGERPRINT = re.compile(r"^sha256:([0-9a-f]{64})$")

log = logging.getLogger("fedwarden.serve")


class AuthError(Exception):
    """The caller could not be identified (``unauthenticated``) or may not do this."""

    def __init__(self, message: str, denied: bool = False):
        super().__init__(message)
        self.denied = denied  # True: identified but not allowed (PERMISSION_DENIED)


@dataclass(frozen=True)
class Identity:
    name: str
    may_train: bool = True  # register, fetch tasks, submit updates
    may_read_trust: bool = False  # GetTrust (fedwarden trust list --server)


def load_tokens(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, str]]:
    """``(client tokens, operator tokens)`` of a tokens TOML file, each ``name -> token``."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"tokens file not found: {path}")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"tokens file {path} is not valid TOML: {exc}") from None
    operators = table.pop("operators", {})
    if not isinstance(operators, dict):
        raise UsageError(f'tokens file {path}: [operators] must be a table of name = "token"')
    clients = table
    seen: dict[str, str] = {}
    for kind, entries in (("client", clients), ("operator", operators)):
        for name, token in entries.items():
            if not isinstance(token, str):
                raise UsageError(
                    f"tokens file {path}: {kind} {name!r} needs a string token, "
                    f'e.g. {name} = "<random hex>"'
                )
            if len(token) < MIN_TOKEN_LENGTH:
                raise UsageError(
                    f"tokens file {path}: the token of {kind} {name!r} has "
                    f"{len(token)} characters; use at least {MIN_TOKEN_LENGTH} "
                    "(python -c 'import secrets; print(secrets.token_hex(16))')"
                )
            if token in seen:
                raise UsageError(
                    f"tokens file {path}: {name!r} and {seen[token]!r} share a token; "
                    "every identity needs its own"
                )
            seen[token] = name
    if not clients and not operators:
        raise UsageError(f'tokens file {path} holds no tokens (lines of client_id = "token")')
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning(
            "tokens file %s is readable or writable by others (mode %o): anyone who can read it "
            "can act as any client; chmod 600 %s",
            path, mode, path,
        )  # fmt: skip
    return dict(clients), dict(operators)


def fingerprint(pem: str | bytes) -> str:
    """``sha256:<hex>`` of a PEM certificate's DER bytes (what ``openssl x509 -fingerprint
    -sha256`` prints, lowercase and without colons)."""
    text = pem.decode() if isinstance(pem, bytes) else pem
    return "sha256:" + hashlib.sha256(ssl.PEM_cert_to_DER_cert(text)).hexdigest()


def parse_allow_list(text: str, path: str | os.PathLike = "<allow-list>") -> dict[str, set[str]]:
    """``client_id -> fingerprints`` of an allow-list (an empty set: any certificate)."""
    allowed: dict[str, set[str]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        name, prints = words[0], [w.replace(":", "").lower() for w in words[1:]]
        prints = ["sha256:" + p[len("sha256"):] for p in prints]  # fmt: skip
        bad = [w for w, p in zip(words[1:], prints) if not _FINGERPRINT.match(p)]
        if bad:
            raise UsageError(
                f"{path} line {number}: {bad[0]!r} is not a certificate fingerprint; write "
                "client_id, optionally followed by sha256:<64 hex digits>"
            )
        allowed.setdefault(name, set()).update(prints)
    return allowed


class AllowList:
    """The training identities of an allow-list file, re-read when the file changes.

    Args:
        path: the file (see the module docstring for its format).
        clock: monotonic seconds.
        recheck_s: how often to look at the file's modification time.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        clock: Callable[[], float] = time.monotonic,
        recheck_s: float = 1.0,
    ):
        self.path = Path(path)
        self.clock = clock
        self.recheck_s = recheck_s
        self._lock = threading.Lock()
        self._checked = -float("inf")
        self._stamp: tuple | None = None
        self._allowed: dict[str, set[str]] = {}
        self._reload(initial=True)

    def _reload(self, initial: bool = False) -> None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._stamp:
                return
            allowed = parse_allow_list(self.path.read_text(), self.path)
        except (OSError, UsageError, UnicodeDecodeError) as exc:
            if initial:
                raise UsageError(f"allow-list {self.path}: {exc}") from None
            if self._stamp is not None:
                log.error("allow-list %s unusable (%s): every client is denied", self.path, exc)
            self._stamp, self._allowed = None, {}
            return
        if not initial:
            log.warning("allow-list %s re-read: %d identities", self.path, len(allowed))
        self._stamp, self._allowed = stamp, allowed

    def permits(self, name: str, cert_fingerprint: str | None = None) -> bool:
        """True if ``name`` (with this certificate, when the list pins one) may train."""
        with self._lock:
            if self.clock() - self._checked >= self.recheck_s:
                self._checked = self.clock()
                self._reload()
            prints = self._allowed.get(name)
        if prints is None:
            return False
        return not prints or cert_fingerprint in prints


class Authenticator:
    """Maps a call's metadata and TLS peer to an :class:`Identity` (or raises AuthError)."""

    def __init__(
        self,
        tokens: dict[str, str] | None = None,
        operator_tokens: dict[str, str] | None = None,
        *,
        mutual_tls: bool = False,
        operator_names: Iterable[str] = (),
        allow: AllowList | None = None,
    ):
        self.allow = allow
        self._tokens = [(t.encode(), name, False) for name, t in (tokens or {}).items()]
        self._tokens += [(t.encode(), name, True) for name, t in (operator_tokens or {}).items()]
        self.mutual_tls = mutual_tls
        self.operator_names = frozenset(operator_names) | frozenset(operator_tokens or {})

    @property
    def open(self) -> bool:
        """True when callers are not authenticated at all (--insecure without tokens or mTLS)."""
        return not self._tokens and not self.mutual_tls

    def identify(
        self,
        metadata: Iterable[tuple[str, str | bytes]],
        peer_common_name: str | None = None,
        peer_fingerprint: str | None = None,
    ) -> Identity:
        """The caller's identity; a training identity must also be on the allow-list."""
        identity = self._identify(metadata, peer_common_name)
        if (
            identity.may_train
            and self.allow is not None
            and not self.allow.permits(identity.name, peer_fingerprint)
        ):
            raise AuthError(
                f"{identity.name!r} is not on the coordinator's allow-list (or was revoked)",
                denied=True,
            )
        return identity

    def _identify(
        self, metadata: Iterable[tuple[str, str | bytes]], peer_common_name: str | None
    ) -> Identity:
        meta = {k.lower(): v for k, v in metadata}
        from_token = self._from_token(meta.get("authorization")) if self._tokens else None
        if self.mutual_tls:
            if not peer_common_name:
                raise AuthError(
                    "a client certificate signed by the coordinator's client CA is required"
                )
            if from_token is not None and from_token.name != peer_common_name:
                raise AuthError(
                    f"the token belongs to {from_token.name!r} but the certificate "
                    f"to {peer_common_name!r}",
                    denied=True,
                )
            operator = peer_common_name in self.operator_names
            return Identity(peer_common_name, may_train=not operator, may_read_trust=operator)
        if from_token is not None:
            return from_token
        claimed = meta.get(CLIENT_ID_HEADER)
        if isinstance(claimed, bytes):
            claimed = claimed.decode(errors="replace")
        if not claimed:
            raise AuthError(f"no identity: send the {CLIENT_ID_HEADER} metadata")
        return Identity(claimed, may_train=True, may_read_trust=False)  # open: nobody reads trust

    def _from_token(self, header: str | bytes | None) -> Identity:
        if isinstance(header, bytes):
            header = header.decode(errors="replace")
        if not header or not header.startswith("Bearer "):
            raise AuthError(
                "missing token: send the authorization metadata 'Bearer <token>' (--token, or "
                "the FEDWARDEN_TOKEN environment variable, of fedwarden agent or fedwarden trust)"
            )
        offered = header[len("Bearer ") :].strip().encode()
        match = None
        for token, name, operator in self._tokens:  # no early exit: same time for every entry
            if hmac.compare_digest(token, offered):
                match = Identity(name, may_train=not operator, may_read_trust=operator)
        if match is None:
            raise AuthError(
                "invalid token: it matches no identity in the coordinator's tokens file"
            )
        return match

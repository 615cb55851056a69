"""API keys: made here, stored hashed, checked in constant time from an in-memory ring.

A key reads ``pfn_<id>_<secret>``: the id is public (it names the key in listings and audit entries), the secret
is 256 random bits of which only a SHA-256 is kept (a slow hash buys nothing against secrets this long). The
ring lets the data plane authenticate without a database round trip; last-used times are collected in memory
and written in batches.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from functions.bounds import shown
from functions.errors import Unauthorized
from functions.store.models import utcnow

ADMIN = "admin"
MANAGE = "manage"
INVOKE = "invoke"
TENANT_SCOPES = frozenset({MANAGE, INVOKE})
ENV_ADMIN_ID = "env-admin"  # the key given in PADDLEFN_ADMIN_KEY, which may have any form

_KEY = re.compile(r"pfn_([0-9a-f]{12})_([A-Za-z0-9_-]{20,})")  # matched whole (fullmatch)


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key id, its tenant (None for admin keys) and what it may do."""

    key_id: str
    tenant: str | None
    scopes: frozenset[str]

    @property
    def is_admin(self) -> bool:
        return ADMIN in self.scopes


@dataclass(frozen=True)
class NewKey:
    id: str
    secret: str

    @property
    def token(self) -> str:
        return f"pfn_{self.id}_{self.secret}"

    @property
    def secret_hash(self) -> str:
        return hash_secret(self.secret)


def new_key() -> NewKey:
    return NewKey(secrets.token_hex(6), secrets.token_urlsafe(32))


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_scopes(scopes: list[str] | None) -> frozenset[str]:
    """None (not given) means every tenant scope; an empty list grants nothing, so it is refused, not widened."""
    if scopes is None:
        return TENANT_SCOPES
    if not scopes:
        raise ValueError(
            f"scopes is empty: give some of {sorted(TENANT_SCOPES)}, or leave scopes out for a key with both"
        )
    unknown = sorted(set(scopes) - TENANT_SCOPES)
    if unknown:
        raise ValueError(f"unknown scope(s) {shown(unknown)}; a tenant key may have: {sorted(TENANT_SCOPES)}")
    return frozenset(scopes)


class KeyRing:
    def __init__(self) -> None:
        self._keys: dict[str, tuple[str, Principal]] = {}
        self._used: dict[str, datetime] = {}

    def add(self, key_id: str, secret_hash: str, principal: Principal) -> None:
        self._keys[key_id] = (secret_hash, principal)

    def remove(self, key_id: str) -> None:
        self._keys.pop(key_id, None)

    def remove_tenant(self, tenant: str) -> None:
        for key_id in [k for k, (_, p) in self._keys.items() if p.tenant == tenant]:
            del self._keys[key_id]

    def authenticate(self, authorization: str | None) -> Principal | None:
        """The caller, None when no key was sent; a key that is sent but not valid is an error."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("send the API key as 'Authorization: Bearer <key>'")
        token = token.strip()
        match = _KEY.fullmatch(token)
        if match and match.group(1) in self._keys:
            key_id, secret = match.group(1), match.group(2)
        else:  # PADDLEFN_ADMIN_KEY may be any string, our format included
            key_id, secret = ENV_ADMIN_ID, token
        entry = self._keys.get(key_id)
        stored = entry[0] if entry else "0" * 64
        if not hmac.compare_digest(hash_secret(secret), stored) or entry is None:
            raise Unauthorized("API key is not valid (revoked, mistyped or from another platform)")
        self._used[key_id] = utcnow()
        return entry[1]

    def drain_last_used(self) -> dict[str, datetime]:
        used, self._used = self._used, {}
        return used

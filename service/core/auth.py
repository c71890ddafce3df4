"""API keys: random, shown once, stored as sha256; each maps to one tenant."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.deps import SessionDep
from service.core.errors import Unauthorized
from service.core.ids import new_id
from service.models import ApiKey, Tenant

KEY_PREFIX = "sk-sarft-"
KEY_CACHE_S = 10.0
"""A valid key is looked up once per this many seconds per process (status polling would
otherwise pay a query per request); a revoked key stops working within this time."""
KEY_CACHE_SIZE = 10_000
KEY_NAME_MAX = 100


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the key's tenant, and the key's name (a reviewer in the audit
    trail; keys made without one are named by their last four characters)."""

    tenant_id: str
    name: str
    tenant_name: str


_known_keys: dict[str, tuple[Caller, float]] = {}


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, tenant_name: str, name: str | None = None) -> str:
    """Create (or reuse) the tenant and return a new key for it, in the clear, once;
    ``name``: who will use it (recorded with each review the key makes)."""
    if name is not None and not 0 < len(name.strip()) <= KEY_NAME_MAX:
        raise ValueError(f"a key's name has 1-{KEY_NAME_MAX} characters")
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(id=new_id("tenant"), name=tenant_name)
        session.add(tenant)
        session.flush()
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(
        ApiKey(
            id=new_id("key"),
            tenant_id=tenant.id,
            key_hash=hash_key(key),
            hint=key[-4:],
            name=None if name is None else name.strip(),
        )
    )
    session.flush()
    return key


def current_caller(
    session: SessionDep,
    authorization: Annotated[str | None, Header(description="Bearer <API key>")] = None,
) -> Caller:
    if not authorization or not authorization.lower().startswith("bearer "):
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    key_hash = hash_key(authorization[7:].strip())
    now = time.monotonic()
    cached = _known_keys.get(key_hash)
    if cached is not None and cached[1] > now:
        return cached[0]
    row = session.execute(
        select(ApiKey, Tenant.name)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .where(ApiKey.key_hash == key_hash)
    ).first()
    if row is None or row[0].revoked:
        raise Unauthorized("unknown or revoked API key")
    key, tenant_name = row
    caller = Caller(key.tenant_id, key.name or f"key ...{key.hint}", tenant_name)
    if len(_known_keys) >= KEY_CACHE_SIZE:
        _known_keys.clear()
    _known_keys[key_hash] = (caller, now + KEY_CACHE_S)
    return caller


CallerDep = Annotated[Caller, Depends(current_caller)]


def current_tenant(caller: CallerDep) -> str:
    return caller.tenant_id


TenantDep = Annotated[str, Depends(current_tenant)]

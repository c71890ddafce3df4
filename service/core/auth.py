"""API keys: random, shown once, stored as sha256; each maps to one tenant."""

from __future__ import annotations

import hashlib
import secrets
from typing import Annotated

from fastapi import Depends, Header
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.deps import SessionDep
from service.core.errors import Unauthorized
from service.core.ids import new_id
from service.models import ApiKey, Tenant

KEY_PREFIX = "sk-sarft-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, tenant_name: str) -> str:
    """Create (or reuse) the tenant and return a new key for it, in the clear, once."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(id=new_id("tenant"), name=tenant_name)
        session.add(tenant)
        session.flush()
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(
        ApiKey(id=new_id("key"), tenant_id=tenant.id, key_hash=hash_key(key), hint=key[-4:])
    )
    session.flush()
    return key


def current_tenant(
    session: SessionDep,
    authorization: Annotated[str | None, Header(description="Bearer <API key>")] = None,
) -> str:
    if not authorization or not authorization.lower().startswith("bearer "):
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    key = authorization[7:].strip()
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    if row is None or row.revoked:
        raise Unauthorized("unknown or revoked API key")
    return row.tenant_id


TenantDep = Annotated[str, Depends(current_tenant)]

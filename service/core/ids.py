"""Object ids: a type prefix, then a time-ordered, random suffix (sortable like ULIDs)."""

from __future__ import annotations

import secrets
import time


def new_id(prefix: str) -> str:
    # 12 hex digits of milliseconds keep ids in creation order until the year 10889.
    return f"{prefix}_{int(time.time() * 1000):012x}{secrets.token_hex(6)}"

"""Assembling what a command needs: settings, the store and (when needed) Redis."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from failfirst import config, store
from failfirst.config import Settings

if TYPE_CHECKING:
    from redis import Redis
    from sqlalchemy import Engine


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    redis: Redis | None


def open_runtime(*, redis: bool = True, settings: Settings | None = None) -> Runtime:
    """Open the store (creating it on first use) and, if asked, connect to Redis."""
    settings = settings or config.load()
    engine = store.open_store(settings.database_url)
    client = None
    if redis:
        from failfirst.connections import get_redis

        client = get_redis(settings)
    return Runtime(settings, engine, client)

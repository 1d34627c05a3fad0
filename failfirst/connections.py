"""Redis connections: the embedded server on demand, or the one REDIS_URL names."""

from __future__ import annotations

from typing import TYPE_CHECKING

from failfirst.config import Settings
from failfirst.embedded import EmbeddedRedis
from failfirst.errors import RedisUnavailable

if TYPE_CHECKING:
    from redis import Redis

_clients: dict[str, Redis] = {}


def redis_url(settings: Settings, *, start: bool = True) -> str:
    """The URL to use; starts the embedded server when REDIS_URL is unset and `start`."""
    if settings.redis_url:
        return settings.redis_url
    server = EmbeddedRedis(settings.home)
    if start:
        server.start()
    return server.url


def hide_password(url: str) -> str:
    """`url` with its password replaced by ***: URLs end up in error messages and reports."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if not password:
        return url
    user, _, host = parts.netloc.rpartition("@")
    name = user.split(":", 1)[0]
    return parts._replace(netloc=f"{name}:***@{host}").geturl()


def describe_redis(settings: Settings) -> str:
    if settings.redis_url:
        from redis.connection import parse_url

        try:
            parts = parse_url(settings.redis_url)
        except ValueError:
            return hide_password(settings.redis_url)
        host = parts.get("path") or f"{parts.get('host', 'localhost')}:{parts.get('port', 6379)}"
        return f"{host} db {parts.get('db', 0)}"
    return f"embedded, {EmbeddedRedis(settings.home).socket}"


def get_redis(settings: Settings, *, start: bool = True, check: bool = True) -> Redis:
    """A shared client for this process; raises RedisUnavailable with the fix when unreachable."""
    from redis import Redis
    from redis.exceptions import RedisError

    url = redis_url(settings, start=start)
    client = _clients.get(url)
    if client is None:
        try:
            client = Redis.from_url(
                url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=30
            )
        except ValueError as exc:
            raise RedisUnavailable(
                f"REDIS_URL {hide_password(url)!r} is not a Redis URL ({exc})", state="malformed URL"
            ) from None
        _clients[url] = client
    if check:
        try:
            client.ping()
        except RedisError as exc:
            raise unavailable(settings, exc) from None
    return client


def unavailable(settings: Settings, exc: Exception) -> RedisUnavailable:
    from redis.exceptions import AuthenticationError

    cause = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
    if isinstance(exc, AuthenticationError):
        return RedisUnavailable(
            f"Redis at {describe_redis(settings)} refused the credentials ({cause}); "
            "check the user and password in REDIS_URL",
            state="credentials refused",
        )
    if settings.redis_url:
        fix = "start that server or unset REDIS_URL to use the embedded one"
    else:
        fix = "run `failfirst up` (or `failfirst down` then `failfirst up`)"
    return RedisUnavailable(f"Redis at {describe_redis(settings)} is unreachable ({cause}); {fix}")


def reset_clients() -> None:
    """Forget cached clients (after a fork, or when the server was restarted)."""
    for client in _clients.values():
        client.close()
    _clients.clear()

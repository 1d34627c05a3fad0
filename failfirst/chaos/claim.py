"""A chaos run's claim on the Redis database that REDIS_URL names.

A run empties its Redis database before it starts (jobs left by an earlier run
would be driven into this one) and after it ends. So it must never empty a
database that holds anything a chaos run did not write, nor one that another
run is using right now. Two keys say so: `OWNER` marks a database that a lab has
used (what it holds are a run's leftovers), and `LIVE`, which expires unless the
run renews it, marks one in use. A run that dies leaves `LIVE` to expire within
`LIVE_TTL` seconds and `OWNER` in place, so the next run may clean up after it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from failfirst.errors import UsageError

if TYPE_CHECKING:
    from redis import Redis

OWNER = "failfirst:chaos:lab"
LIVE = "failfirst:chaos:live"
LIVE_TTL = 10


def claim(redis: Redis, where: str, run: str) -> None:
    """Take the database for `run` and empty it, or refuse with the reason and the fix."""
    if not redis.set(LIVE, run, nx=True, ex=LIVE_TTL):
        other = redis.get(LIVE)
        name = other.decode() if other else "another run"
        raise UsageError(f"Redis {where} is in use by chaos run {name}; one run per Redis database at a time")
    foreign = redis.dbsize() - 1
    if foreign > 0 and not redis.exists(OWNER):
        redis.delete(LIVE)
        raise UsageError(
            f"Redis {where} holds {foreign} key{'s' * (foreign > 1)} that no chaos run wrote, "
            "and a run empties its database: "
            "point REDIS_URL at an empty database (e.g. redis://host:6379/15)"
        )
    redis.flushdb()
    renew(redis, run)


def renew(redis: Redis, run: str) -> None:
    """Keep the claim alive; also puts the keys back after the run's own FLUSHDB fault."""
    pipe = redis.pipeline(transaction=False)
    pipe.set(OWNER, run)
    pipe.set(LIVE, run, ex=LIVE_TTL)
    pipe.execute()

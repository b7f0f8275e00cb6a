"""Container HEALTHCHECK: is this container's daemon alive and well?

Docker runs ``python3 -m cvmfs_publisher.operations.health --daemon cvmfs-repo-sync
--max-age 120`` every interval and reads only the exit code (0 healthy,
1 unhealthy) and the first line of output (``docker inspect`` shows it).

Why the status document and not, say, a TCP probe or ``pgrep``: none of the
daemons listens on a port, and a process can exist while its main loop is
stuck (a hung broker connection, a blocked ``cvmfs_server`` call). Each daemon
refreshes ``updated`` in its JSON status document (``status.py``) at least
every second while its main loop runs and sets ``healthy`` itself, so
"document fresh and healthy" is the best outside view of "working".

Standard library only and nothing else imported from the package: a health
check must keep answering when a daemon dependency is broken, and it starts
a fresh interpreter every few seconds. The same rules as the Zabbix agent's
``health`` key (``zabbix_agent.py``) apply, so that Docker and Zabbix never
disagree about a daemon.

Exit codes are 0 and 1 only: Docker reserves 2, which :mod:`argparse` would
use for a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

#: The daemons and their status file names (``<status dir>/<daemon>.json``).
DAEMONS = ("publisher-consumer", "cvmfs-repo-consumers", "cvmfs-repo-sync")

DEFAULT_STATUS_DIR = "/var/lib/cvmfs-publisher"

#: Environment variables naming the status directory, first found wins: the
#: configuration override the daemons themselves read (``status.dir``), then
#: the one the Zabbix agent's scripts read.
STATUS_DIR_ENV = ("CVMFS_PUBLISHER_STATUS__DIR", "CVMFS_PUBLISHER_STATUS_DIR")

#: Same default freshness limit as the Zabbix ``health`` key.
DEFAULT_MAX_AGE = 120.0

#: A status document is small; anything bigger is not ours and is not read.
MAX_DOCUMENT_BYTES = 16 << 20


def _read_document(status_path: Path) -> dict[str, Any] | str:
    """The parsed document, or a one-line reason why it cannot be used.

    Opened without blocking and required to be a regular file, so that a
    FIFO or a device in its place cannot hang the check (Docker would then
    kill it at the timeout and report nothing useful).
    """
    try:
        fd = os.open(status_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return f"no status document at {status_path} (daemon not started or not writing)"
    except OSError as exc:
        return f"status document unreadable: {status_path}: {exc.strerror}"
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return f"status document is not a regular file: {status_path}"
        if info.st_size > MAX_DOCUMENT_BYTES:
            return f"status document too large ({info.st_size} bytes): {status_path}"
        with os.fdopen(fd, "rb", closefd=False) as fh:
            raw = fh.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as exc:
        return f"status document unreadable: {status_path}: {exc.strerror}"
    finally:
        os.close(fd)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return f"status document is not valid JSON: {status_path}"
    if not isinstance(doc, dict) or "daemon" not in doc:
        return f"not a cvmfs-publisher status document: {status_path}"
    return doc


def check(
    status_path: Path,
    max_age: float,
    *,
    daemon: str | None = None,
    now: float | None = None,
) -> tuple[bool, str]:
    """Judge one status document: ``(healthy, one-line reason)``.

    Healthy means: the document exists and parses, belongs to ``daemon``
    (when given: a volume mix-up must not pass as health), its ``updated``
    stamp is at most ``max_age`` seconds old, and the daemon itself says
    ``healthy: true``. ``now`` is for tests.
    """
    doc = _read_document(Path(status_path))
    if isinstance(doc, str):
        return False, doc
    name = doc.get("daemon")
    if daemon is not None and name != daemon:
        return False, f"status document {status_path} belongs to {name!r}, not {daemon!r}"
    updated = doc.get("updated")
    if isinstance(updated, bool) or not isinstance(updated, int | float) or updated <= 0:
        return False, f"{name}: status document never written by its daemon (updated={updated!r})"
    age = (time.time() if now is None else now) - float(updated)
    if age > max_age:
        return False, f"{name}: status is stale, updated {age:.0f}s ago (limit {max_age:.0f}s)"
    if doc.get("healthy") is not True:
        return False, f"{name}: daemon reports itself unhealthy{_details(doc)}"
    repos = doc.get("repositories")
    count = len(repos) if isinstance(repos, dict) else 0
    return True, f"{name}: ok, updated {max(age, 0.0):.0f}s ago, {count} repositories"


def _details(doc: dict[str, Any]) -> str:
    """A short hint for the operator: the repositories that report errors.

    Only counts and names, never ``last_error`` text: health output lands in
    ``docker inspect`` and is read by people who may not see the logs.
    """
    repos = doc.get("repositories")
    if not isinstance(repos, dict):
        return ""
    failing = sorted(
        str(name) for name, entry in repos.items()
        if isinstance(entry, dict) and entry.get("consecutive_failures")
    )
    if not failing:
        return ""
    shown = ", ".join(failing[:3]) + (f" (+{len(failing) - 3} more)" if len(failing) > 3 else "")
    return f" (failing: {shown})"


def default_status_dir(environ: dict[str, str] | None = None) -> str:
    """The status directory from the environment, else the packaged default."""
    env = os.environ if environ is None else environ
    for var in STATUS_DIR_ENV:
        if env.get(var):
            return env[var]
    return DEFAULT_STATUS_DIR


class _Parser(argparse.ArgumentParser):
    """An argument parser that reports usage errors with exit code 1, not 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(1, f"health: {message}\n")


def _positive(value: str) -> float:
    seconds = float(value)
    if not seconds > 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print one line, return 0 (healthy) or 1 (unhealthy)."""
    parser = _Parser(
        prog="python3 -m cvmfs_publisher.operations.health",
        description="Exit 0 if the daemon's status document is fresh and healthy, else 1.",
    )
    parser.add_argument("--daemon", required=True, choices=DAEMONS)
    parser.add_argument("--max-age", type=_positive, default=DEFAULT_MAX_AGE,
                        help=f"seconds (default {DEFAULT_MAX_AGE:.0f})")
    parser.add_argument("--status-dir", default=None,
                        help=f"default: ${STATUS_DIR_ENV[0]}, ${STATUS_DIR_ENV[1]} "
                             f"or {DEFAULT_STATUS_DIR}")
    args = parser.parse_args(argv)
    status_dir = Path(args.status_dir or default_status_dir())
    ok, reason = check(status_dir / f"{args.daemon}.json", args.max_age, daemon=args.daemon)
    sys.stdout.write(("healthy: " if ok else "unhealthy: ") + reason + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Answers the Zabbix agent's ``UserParameter`` keys from a daemon's JSON status document.

The agent runs one short process per key and per poll, through its shell, with
parameters that come from item keys: anyone who may edit an item in Zabbix
controls them. So this module

* is standard library only and imports nothing else from the package (it
  starts fast, and a broken daemon dependency cannot break monitoring);
* takes the user-controlled values only after a literal ``--`` and parses its
  command line by hand, because :mod:`argparse` would read a value such as
  ``--status-dir=/etc`` as an option, and turns a second ``--`` into a list;
* validates every value against a strict pattern before it is used (the
  daemon name becomes part of a file name; the repository name is only a
  dictionary key, checked anyway);
* never blocks: the status file is opened non-blocking, must be a regular
  file and is read up to a size limit, so a FIFO or a huge file in its place
  cannot hang the agent's worker;
* always prints one line. The agent ignores exit codes and turns whatever a
  command prints into the item's value, so an error is printed as
  ``ZBX_NOTSUPPORTED: <reason>``: numeric items reject it (the reason shows
  in the item's error), and a person running ``zabbix_get`` reads why.
  The exit code (1) is for people and scripts.

Usage (the status directory comes from ``--status-dir``, else the environment
variable ``CVMFS_PUBLISHER_STATUS_DIR``, else ``/var/lib/cvmfs-publisher``)::

    python3 -m cvmfs_publisher.operations.zabbix_agent [--status-dir DIR] health -- DAEMON [MAX_AGE]
    python3 -m cvmfs_publisher.operations.zabbix_agent age -- DAEMON
    python3 -m cvmfs_publisher.operations.zabbix_agent dead_lettered -- DAEMON
    python3 -m cvmfs_publisher.operations.zabbix_agent broker_connected -- DAEMON
    python3 -m cvmfs_publisher.operations.zabbix_agent discovery -- DAEMON
    python3 -m cvmfs_publisher.operations.zabbix_agent repo FIELD -- DAEMON REPOSITORY

``FIELD`` is one of :data:`REPO_FIELDS`.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ENV_STATUS_DIR = "CVMFS_PUBLISHER_STATUS_DIR"
DEFAULT_STATUS_DIR = "/var/lib/cvmfs-publisher"

#: Health's default freshness limit when the key gives none (seconds). Daemons
#: refresh ``updated`` at least every second while their main loop runs.
DEFAULT_MAX_AGE = 120.0

#: A status document is a few hundred bytes per repository; anything larger
#: than this is not ours and is not read into the agent's memory.
MAX_DOCUMENT_BYTES = 16 << 20

#: Daemon names become ``<status_dir>/<daemon>.json``: no dot, no slash.
DAEMON_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")

#: Repository names as ``names.validate_repository`` accepts them (lower-case
#: DNS labels, at most 60 characters), without the domain check: the agent
#: does not know the domain, and the name is only ever a dictionary key here.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
REPO_RE = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
MAX_REPO_NAME = 60

#: A Zabbix time period: seconds with an optional s/m/h/d/w suffix (as in
#: the template's ``{$CVMFS.STATUS.MAX_AGE}`` macro).
PERIOD_RE = re.compile(r"^([0-9]{1,9})([smhdw]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

#: The longest ``last_error`` text returned (Zabbix text items hold more, but
#: an operator needs the first line, not a traceback).
MAX_ERROR_TEXT = 1024

NOT_SUPPORTED = "ZBX_NOTSUPPORTED"


class CheckError(Exception):
    """A key cannot be answered; the message tells the operator why."""


# --------------------------------------------------------------------------- validation


def validate_daemon(value: str) -> str:
    """Return ``value`` if it is a safe daemon name, else raise :class:`CheckError`."""
    if not DAEMON_RE.match(value):
        raise CheckError("invalid daemon name (expected e.g. cvmfs-repo-sync)")
    return value


def validate_repo(value: str) -> str:
    """Return ``value`` if it looks like a repository name, else raise."""
    if len(value) > MAX_REPO_NAME or not REPO_RE.match(value):
        raise CheckError("invalid repository name (lower-case DNS name expected)")
    return value


def parse_period(value: str) -> float:
    """Seconds of a Zabbix period (``300``, ``5m``, ``2h``); empty means the default."""
    if value == "":
        return DEFAULT_MAX_AGE
    match = PERIOD_RE.match(value)
    if not match:
        raise CheckError("invalid period (expected seconds or a number with s/m/h/d/w)")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise CheckError("invalid period (must be positive)")
    return float(seconds)


# --------------------------------------------------------------------------- reading


def status_path(status_dir: Path, daemon: str) -> Path:
    """Where ``daemon`` writes its document (see ``status.py``)."""
    return status_dir / f"{validate_daemon(daemon)}.json"


def load_document(status_dir: Path, daemon: str) -> dict[str, Any]:
    """Read and sanity-check a status document without ever blocking.

    Raises :class:`CheckError` naming the file for a missing, unreadable,
    non-regular, oversized or malformed document.
    """
    path = status_path(status_dir, daemon)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CheckError(f"status document missing: {path}") from None
    except OSError as exc:
        raise CheckError(f"status document unreadable: {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CheckError(f"status document is not a regular file: {path}")
        if info.st_size > MAX_DOCUMENT_BYTES:
            raise CheckError(f"status document larger than {MAX_DOCUMENT_BYTES} bytes: {path}")
        chunks: list[bytes] = []
        remaining = MAX_DOCUMENT_BYTES + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    except OSError as exc:
        raise CheckError(f"status document unreadable: {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    raw = b"".join(chunks)
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise CheckError(f"status document larger than {MAX_DOCUMENT_BYTES} bytes: {path}")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise CheckError(f"status document is not valid JSON: {path}") from None
    if not isinstance(doc, dict) or "daemon" not in doc:
        raise CheckError(f"not a cvmfs-publisher status document: {path}")
    if not isinstance(doc.get("repositories", {}), dict):
        raise CheckError(f"status document has no repositories mapping: {path}")
    return doc


def _number(doc: dict[str, Any], field: str, where: str) -> float:
    """A numeric field; ``bool`` and strings are refused so a bad writer shows up."""
    value = doc.get(field, 0)
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value):
        raise CheckError(f"{where}: field {field!r} is not a number")
    return float(value)


def _integer(doc: dict[str, Any], field: str, where: str) -> str:
    return str(int(_number(doc, field, where)))


def _seconds(value: float) -> str:
    """Ages are printed with millisecond precision (Zabbix float, unit ``s``)."""
    return f"{value:.3f}"


def _repo_entry(doc: dict[str, Any], repo: str) -> dict[str, Any]:
    entry = doc.get("repositories", {}).get(validate_repo(repo))
    if not isinstance(entry, dict):
        raise CheckError(f"repository {repo} not in the status document")
    return entry


# --------------------------------------------------------------------------- checks


def check_health(status_dir: Path, daemon: str, max_age: str = "") -> str:
    """``1`` if the document exists, says ``healthy`` and is fresh; else ``0``.

    The daemon's PID means nothing from another container, so freshness of
    ``updated`` stands for "alive". Any problem reading the document is a
    ``0``, never an error: this is the key triggers rely on. Invalid
    arguments are still errors (a misconfigured key must not look healthy).
    """
    limit = parse_period(max_age)
    validate_daemon(daemon)
    try:
        doc = load_document(status_dir, daemon)
        age = time.time() - _number(doc, "updated", "status document")
    except CheckError:
        return "0"
    return "1" if doc.get("healthy") is True and age <= limit else "0"


def check_age(status_dir: Path, daemon: str) -> str:
    """Seconds since the daemon last wrote its document (``now - updated``)."""
    doc = load_document(status_dir, daemon)
    updated = _number(doc, "updated", "status document")
    if updated <= 0:
        raise CheckError("status document was never written by its daemon (updated=0)")
    return _seconds(time.time() - updated)


def check_dead_lettered(status_dir: Path, daemon: str) -> str:
    """Messages the daemon dead-lettered since it started (all repositories)."""
    return _integer(load_document(status_dir, daemon), "dead_lettered", "status document")


def check_broker_connected(status_dir: Path, daemon: str) -> str:
    """``1`` while the daemon holds a RabbitMQ connection, else ``0``.

    A daemon without a broker (cvmfs-repo-sync) has no such field: the item
    is not supported there, rather than a ``0`` that reads as "disconnected".
    """
    doc = load_document(status_dir, daemon)
    if "broker_connected" not in doc:
        raise CheckError(f"{daemon} uses no broker (no broker_connected in its status document)")
    return "1" if doc["broker_connected"] is True else "0"


def check_discovery(status_dir: Path, daemon: str) -> str:
    """Low-level discovery JSON of the daemon's repositories.

    A missing document is an error rather than an empty list: an empty list
    would tell Zabbix every repository is gone and start deleting their
    items, while an error only marks the discovery rule as failing.
    Names that could not be asked for (invalid) are left out.
    """
    doc = load_document(status_dir, daemon)
    names = sorted(n for n in doc.get("repositories", {}) if isinstance(n, str))
    data = [{"{#REPO}": name} for name in names
            if len(name) <= MAX_REPO_NAME and REPO_RE.match(name)]
    return json.dumps({"data": data}, separators=(",", ":"))


def _repo_last_publish_age(doc: dict[str, Any], entry: dict[str, Any], where: str) -> str:
    """Seconds since the last publish, or since the daemon started if none yet.

    A daemon keeps its status in memory, so after a restart ``last_publish``
    is 0 until the next publish; "since start" is then the honest lower
    bound of how long the repository has gone unpublished.
    """
    last = _number(entry, "last_publish", where)
    anchor = last if last > 0 else _number(doc, "started", "status document")
    return _seconds(time.time() - anchor)


def _repo_last_reconcile_age(doc: dict[str, Any], entry: dict[str, Any], where: str) -> str:
    """Seconds since the last reconcile (anti-entropy), or since start if none yet
    (a host that is not the repository's active consumer never reconciles it)."""
    last = _number(entry, "last_reconcile", where)
    anchor = last if last > 0 else _number(doc, "started", "status document")
    return _seconds(time.time() - anchor)


def _repo_last_result(entry: dict[str, Any], where: str) -> str:
    """``1`` ok, ``0`` failed, ``2`` nothing published yet (template value map).

    Not -1 for "none": the item is Numeric (unsigned), like every counter.
    """
    result = entry.get("last_result", "")
    if not isinstance(result, str):
        raise CheckError(f"{where}: field 'last_result' is not a string")
    if result == "":
        return "2"
    return "1" if result == "ok" else "0"


def _repo_last_error(entry: dict[str, Any], where: str) -> str:
    """The last error message, first line only and bounded."""
    text = entry.get("last_error", "")
    if not isinstance(text, str):
        raise CheckError(f"{where}: field 'last_error' is not a string")
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first[:MAX_ERROR_TEXT]


def _int_field(name: str) -> Callable[[dict[str, Any], dict[str, Any], str], str]:
    def read(_doc: dict[str, Any], entry: dict[str, Any], where: str) -> str:
        return _integer(entry, name, where)

    return read


#: Per-repository fields a key may ask for, and how each is rendered.
REPO_FIELDS: dict[str, Callable[[dict[str, Any], dict[str, Any], str], str]] = {
    "pending": _int_field("pending"),
    "queue_depth": _int_field("queue_depth"),
    "consecutive_failures": _int_field("consecutive_failures"),
    "errors": _int_field("errors"),
    "dead_lettered": _int_field("dead_lettered"),
    "reconcile_healed": _int_field("reconcile_healed"),
    "healed_total": _int_field("healed_total"),
    "last_reconcile_age": _repo_last_reconcile_age,
    "last_publish_age": _repo_last_publish_age,
    "last_result": lambda _doc, entry, where: _repo_last_result(entry, where),
    "last_error": lambda _doc, entry, where: _repo_last_error(entry, where),
}


def check_repo(status_dir: Path, field: str, daemon: str, repo: str) -> str:
    """One per-repository value (``field`` from :data:`REPO_FIELDS`)."""
    render = REPO_FIELDS.get(field)
    if render is None:
        raise CheckError(f"unknown repository field (one of {', '.join(REPO_FIELDS)})")
    validate_daemon(daemon)
    validate_repo(repo)
    doc = load_document(status_dir, daemon)
    entry = _repo_entry(doc, repo)
    return render(doc, entry, f"repository {repo}")


# --------------------------------------------------------------------------- command line

#: subcommand -> (function, minimum and maximum number of user arguments)
_DAEMON_COMMANDS: dict[str, tuple[Callable[..., str], int, int]] = {
    "health": (check_health, 1, 2),
    "age": (check_age, 1, 1),
    "dead_lettered": (check_dead_lettered, 1, 1),
    "broker_connected": (check_broker_connected, 1, 1),
    "discovery": (check_discovery, 1, 1),
}

USAGE = (__doc__ or "").split("Usage", 1)[-1]


def run(argv: Sequence[str], environ: dict[str, str] | None = None) -> str:
    """Answer one key; raises :class:`CheckError` with the reason otherwise.

    Layout: ``[--status-dir DIR] COMMAND [FIELD] -- ARG...``. The ``--`` is
    required so that nothing a Zabbix user types is ever read as an option.
    """
    env = os.environ if environ is None else environ
    args = list(argv)
    status_dir = env.get(ENV_STATUS_DIR) or DEFAULT_STATUS_DIR
    if args and args[0] == "--status-dir":
        if len(args) < 2:
            raise CheckError("--status-dir needs a value")
        status_dir = args[1]
        del args[:2]
    elif args and args[0].startswith("--status-dir="):
        status_dir = args.pop(0).split("=", 1)[1]
    if not args:
        raise CheckError("missing command")
    command = args.pop(0)
    field: str | None = None
    if command == "repo":
        if not args or args[0] == "--":
            raise CheckError("repo needs a FIELD")
        field = args.pop(0)
    if not args or args[0] != "--":
        raise CheckError("user arguments must follow a literal --")
    user_args = args[1:]
    directory = Path(status_dir)

    if command == "repo":
        assert field is not None
        if len(user_args) != 2:
            raise CheckError("repo takes DAEMON and REPOSITORY")
        return check_repo(directory, field, user_args[0], user_args[1])
    spec = _DAEMON_COMMANDS.get(command)
    if spec is None:
        raise CheckError(f"unknown command {command!r}")
    function, low, high = spec
    # The agent passes every declared $N, empty when the key omitted it.
    while len(user_args) > low and user_args[-1] == "":
        user_args.pop()
    if not low <= len(user_args) <= high:
        raise CheckError(f"{command} takes {low} to {high} arguments")
    return function(directory, *user_args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: print the value (0) or ``ZBX_NOTSUPPORTED: reason`` (1)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] in (["-h"], ["--help"]):
        sys.stdout.write("usage:" + USAGE)
        return 0
    try:
        value = run(args)
    except CheckError as exc:
        sys.stdout.write(f"{NOT_SUPPORTED}: {exc}\n")
        return 1
    except Exception as exc:  # a bug: still one line, never a traceback as the value
        sys.stdout.write(f"{NOT_SUPPORTED}: internal error ({type(exc).__name__})\n")
        return 2
    sys.stdout.write(value + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

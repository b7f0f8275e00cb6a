"""Logging for operators: one line per event, to a rotated file and stdout.

Every handler carries a :class:`RedactingFilter` that masks the clear value
of every configured secret and anything that looks like credentials in a URL
(``amqps://user:pass@host``) or a Vault token, so that even an exception
message from a library cannot leak a secret into ``/var/log/publisher``.
"""

from __future__ import annotations

import logging
import logging.handlers
import re
import sys
from collections.abc import Iterable
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]+):[^@/\s]+@")
_TOKENS = re.compile(r"\b(?:hvs|hvb|hvr|s)\.[A-Za-z0-9_-]{20,}\b")
_SECRET_FIELDS = re.compile(
    r"(?i)(?P<k>['\"]?(?:password|secret_id|secret|token|gatewayKey|certificateKey|"
    r"masterKey|aws_secret_access_key|client_token)['\"]?\s*[:=]\s*)(?P<v>'[^']*'|\"[^\"]*\"|[^\s,}]+)"
)


class RedactingFilter(logging.Filter):
    """Replace secrets in the formatted message (and exception text) with ``***``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets: list[str] = []
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        """Register more clear values to mask (longest first, so overlaps mask fully)."""
        for s in secrets:
            if s and len(s) >= 4 and s not in self.secrets:
                self.secrets.append(s)
        self.secrets.sort(key=len, reverse=True)

    def redact(self, text: str) -> str:
        """Mask known secrets and credential-shaped substrings."""
        for s in self.secrets:
            text = text.replace(s, "***")
        text = _URL_CREDENTIALS.sub(r"\g<scheme>\g<user>:***@", text)
        text = _TOKENS.sub("***", text)
        return _SECRET_FIELDS.sub(r"\g<k>***", text)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg = self.redact(message)
        record.args = None
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        return True


_FILTER = RedactingFilter()


def redact(text: str) -> str:
    """Mask secrets in ``text`` with the process-wide filter (for status files)."""
    return _FILTER.redact(text)


def setup(daemon: str, log_dir: str | None, level: str = "INFO", *, max_bytes: int = 10 << 20,
          backups: int = 5, stdout: bool = True, secrets: Iterable[str] = ()) -> logging.Logger:
    """Configure the root logger for ``daemon``; returns the package's logger.

    Every module logs to ``logging.getLogger(__name__)`` (one naming scheme:
    the module's dotted name), so a line says where it comes from and the
    file it is in says which daemon.

    The file is ``<log_dir>/<daemon>.log``, rotated by size. If the directory
    cannot be created the daemon still logs to stdout and says so once.
    """
    _FILTER.add(secrets)
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_cvmfs_publisher", False):  # ours from an earlier setup()
            root.removeHandler(h)
            h.close()
    root.setLevel(level.upper())
    fmt = logging.Formatter(FORMAT)
    handlers: list[logging.Handler] = []
    problem = ""
    if log_dir:
        try:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            fh = logging.handlers.RotatingFileHandler(
                Path(log_dir) / f"{daemon}.log", maxBytes=max_bytes, backupCount=backups,
                encoding="utf-8",
            )
            handlers.append(fh)
        except OSError as exc:
            problem = f"cannot write logs to {log_dir}: {exc.strerror}; logging to stdout only"
    if stdout or not handlers:
        handlers.append(logging.StreamHandler(sys.stdout))
    for h in handlers:
        h.setFormatter(fmt)
        h.addFilter(_FILTER)
        h._cvmfs_publisher = True  # type: ignore[attr-defined]
        root.addHandler(h)
    # Libraries are chatty at INFO (pika logs every connection step).
    for noisy in ("pika", "botocore", "boto3", "urllib3", "hvac"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    log = logging.getLogger("cvmfs_publisher")
    if problem:
        log.warning(problem)
    return log

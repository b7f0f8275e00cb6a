"""What every daemon does at start-up: arguments, configuration, logging, status.

Exit codes of the daemons: 0 after a clean shutdown (SIGTERM/SIGINT),
78 (EX_CONFIG) for a configuration error, 1 for an unexpected crash.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from . import config, logs
from .status import StatusDocument

EX_CONFIG = 78


@dataclass
class Runtime:
    """The pieces every daemon gets from :func:`start`."""

    name: str
    cfg: config.Config
    log: logging.Logger
    status: StatusDocument


def _exit_during_startup(signum: int, frame: object) -> None:
    raise SystemExit(0)


def stop_on_signals(stop: Callable[[], None]) -> None:
    """SIGTERM / SIGINT call ``stop`` (which must only set flags: it runs in a handler).

    Replaces the start-up handlers once the daemon has something to finish.
    """
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop())


def start(name: str, description: str, argv: Sequence[str] | None = None) -> Runtime:
    """Parse ``--config``, validate it for ``name``, set up logging and the status document.

    A configuration error prints one line naming the key and exits 78.
    """
    parser = argparse.ArgumentParser(prog=name, description=description)
    parser.add_argument("--config", "-c", help="YAML configuration file (default: "
                        f"$CVMFS_PUBLISHER_CONFIG or {config.DEFAULT_CONFIG_PATH})")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = parser.parse_args(argv)
    # Until the daemon installs its own handlers (which finish the message in
    # hand), a stop request has nothing to finish: exit 0 at once, as a
    # supervisor expects, rather than dying of the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_during_startup)
    try:
        cfg = config.load(args.config)
        config.require(cfg, name)
    except config.ConfigError as exc:
        print(f"{name}: config error: {exc}", file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None
    log = logs.setup(name, cfg.log.dir, cfg.log.level, max_bytes=cfg.log.max_bytes,
                     backups=cfg.log.backups, stdout=cfg.log.stdout,
                     secrets=config.secret_values(cfg))
    status = StatusDocument(Path(cfg.status.dir) / f"{name}.json", name,
                            min_interval=cfg.status.interval,
                            broker="amqp.password" in config.REQUIRED.get(name, ()))
    log.info("%s %s starting (config %s)", name, __version__,
             args.config or config.DEFAULT_CONFIG_PATH)
    return Runtime(name, cfg, log, status)

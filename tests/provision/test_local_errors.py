"""Local errors of one message are the message's failure, not a lost broker (issue 12).

``OSError`` is the base of disk-full and permission errors: publisher-consumer
must retry the first and dead-letter the second with the reason, not take
either for a dropped AMQP connection (no ack, reconnect, redelivery until
the broker's delivery limit dead-letters it without a reason). The faults
are real: the keys directory is a tiny or a read-only tmpfs.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from tests.conftest import small_filesystem
from tests.provision.helpers import assert_provisioned, running, wait_until


def test_read_only_keys_directory_is_dead_lettered_with_the_reason(scenario, broker,
                                                                   tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "ro", "1m", read_only=True) as ro:
        s = scenario(cvmfs={"keys_dir": str(ro / "keys")}, publisher={"max_attempts": 5})
        with running(s.cfg, broker):
            s.amqp.send(s.csv)
            (props, _), = s.amqp.dead_letters(1)
    error = props.headers["x-error"]
    assert "EROFS" in error and str(ro / "keys") in error, error
    assert props.headers["x-attempts"] == 1, "dead-lettered at once, not after retries"
    log = s.log_text()
    assert "amqp connection lost" not in log
    line = next(ln for ln in log.splitlines() if "outcome=dead-lettered" in ln)
    assert f"repository={s.repo}" in line or "EROFS" in line
    assert s.calls("mkfs") == []


def test_full_keys_directory_is_retried_until_space_is_back(scenario, broker,
                                                            tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "small", "64k") as small:
        s = scenario(cvmfs={"keys_dir": str(small / "keys")}, publisher={"max_attempts": 30})
        filler = small / "filler"
        with open(filler, "wb") as fh, contextlib.suppress(OSError):
            fh.write(b"\0" * (1 << 20))  # until ENOSPC
        with running(s.cfg, broker):
            s.amqp.send(s.csv)
            wait_until("a retry on ENOSPC", lambda: "outcome=retry" in s.log_text()
                       and "ENOSPC" in s.log_text(), 30)
            filler.unlink()
            s.amqp.wait_announcement("created", s.repo, timeout=40)
        assert "amqp connection lost" not in s.log_text()
        assert s.amqp.queue_depth(s.cfg.amqp.dead_letter_queue) == 0
        assert_provisioned(s, broker)

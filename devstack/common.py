"""Small helpers shared by the devstack service launchers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def wait_for(what: str, check: Callable[[], bool], timeout: float, log_file: Path | None = None,
             alive: Callable[[], bool] | None = None, interval: float = 0.1) -> None:
    """Poll ``check`` until true; raise with the log's tail on timeout or death."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if alive is not None and not alive():
            raise RuntimeError(f"{what} died during start-up{_tail(log_file)}")
        time.sleep(interval)
    raise RuntimeError(f"{what} not ready after {timeout:.0f}s{_tail(log_file)}")


def p95(values: Sequence[float]) -> float:
    """The 95th percentile by the nearest-rank method (the benchmarks' figure)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))]


def _tail(log_file: Path | None, lines: int = 15) -> str:
    if not log_file or not log_file.exists():
        return ""
    text = log_file.read_text(errors="replace").splitlines()[-lines:]
    return f" (log {log_file}):\n" + "\n".join(text)


def descendants(pid: int) -> list[int]:
    """Every process under ``pid`` (from /proc's parent links), e.g. a daemon's helpers."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (d / "stat").read_text()
                ppid = int(stat[stat.rfind(")") + 2:].split()[1])
                children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


#: clock ticks per second of /proc/<pid>/stat's CPU times
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, its threads and its descendants (download processes)."""
    total = 0.0
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICK
    return total


def idle_cpu(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """Share of one core each process (with its descendants) used over ``seconds``."""
    before = {n: cpu_seconds(p) for n, p in pids.items()}
    time.sleep(seconds)
    return {n: (cpu_seconds(p) - before[n]) / seconds for n, p in pids.items()}


def kill_process(proc: subprocess.Popen | int, sig: int = signal.SIGTERM,
                 timeout: float = 10.0) -> None:
    """Signal a process (Popen or pid) and wait until it is gone or a zombie."""
    pid = proc.pid if isinstance(proc, subprocess.Popen) else proc
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    if isinstance(proc, subprocess.Popen):
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except (OSError, IndexError):
            return
        if state == "Z":
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt as Ctrl-C does.

    The demo and the benchmarks clean up (processes, mounts, temporary
    directories, broker objects) in ``finally`` blocks; Python's default
    SIGTERM would end the process without running them.
    """
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

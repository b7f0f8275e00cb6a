"""The local demo: a whole stack on loopback, an upload becoming a published repository.

    tools/demo.sh            # set up, run the demo, stop everything at the end (or Ctrl-C)
    tools/demo.sh --keep     # leave the stack running to explore
    tools/demo.sh --stop     # stop a stack left by --keep

Services come from ``cvmfs_publisher.devstack`` (the same code the test
suite uses): a RabbitMQ node of its own (the machine's broker is left alone), OpenBao, a one-node
Ceph RGW, and the ``cvmfs_server`` test double (CernVM-FS itself cannot run
here). The three daemons run as real processes with a generated
configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from .. import amqp
from ..rgw import RGW
from .ceph import Ceph
from .common import kill_process
from .openbao import OpenBao
from .rabbitmq import RabbitNode
from .stack import DOMAIN, REPO_ROOT, Stack, build_stack, make_double, unique_label

DAEMONS = {
    "publisher-consumer": "cvmfs_publisher.daemons.publisher_consumer",
    "cvmfs-repo-consumers": "cvmfs_publisher.daemons.repo_consumers",
    "cvmfs-repo-sync": "cvmfs_publisher.daemons.repo_sync",
}
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "cvmfs-publisher-demo"


class Demo:
    """Starts, drives and stops the demo stack, printing each step with its timing."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.t0 = time.monotonic()
        self.rabbit: RabbitNode | None = None
        self.bao: OpenBao | None = None
        self.ceph: Ceph | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.repo_request: tuple[str, str] = ("", "")
        self.stack: Stack | None = None
        self.double_root = workdir / "cvmfs-root"
        self.labels: list[str] = []

    def step(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.2f}s] {text}", flush=True)

    # -- start ---------------------------------------------------------------------------

    def start(self) -> None:
        if self.workdir.exists():
            stop_saved(self.workdir, quiet=True)
        self.workdir.mkdir(parents=True)
        self.rabbit = RabbitNode(self.workdir / "rabbitmq")
        broker = self.rabbit.start().broker()
        self.step(f"RabbitMQ node {self.rabbit.name} on {broker.host}:{broker.port} "
                  f"(management {broker.management_url})")
        self.bao = OpenBao(self.workdir / "openbao").start()
        self.step(f"OpenBao (Vault) dev server on {self.bao.url}: KV v2 'secrets', AppRole")
        self.ceph = Ceph(self.workdir / "ceph", memstore_bytes=1 << 30).start()
        self.step(f"Ceph RGW on {self.ceph.endpoint} (one mon, one memstore OSD)")
        double = make_double(self.double_root)
        self.stack = build_stack(self.workdir, broker, self.bao, self.ceph, double)
        self.stack.raw["log"]["stdout"] = False
        self.stack.raw["log"]["level"] = "INFO"
        self.stack.raw["sync"].update({"quiet_seconds": 1.0, "max_delay_seconds": 10.0})
        cfg_file = self.stack.write()
        self.step(f"configuration written to {cfg_file}; cvmfs_server test double at "
                  f"{double.command}")
        env = self.stack.subprocess_env()
        for name, module in DAEMONS.items():
            out = open(self.workdir / f"{name}.out", "ab")  # owned by the child process
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", module, "--config", str(cfg_file)], env=env,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            out.close()
        self._save()
        self._wait("the three daemons to report", self._daemons_up, 60)
        self.step("daemons running: " + ", ".join(
            f"{n} (pid {p.pid})" for n, p in self.procs.items()))

    def _daemons_up(self) -> bool:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see "
                                   f"{self.workdir / (name + '.out')}")
        return all((Path(self.stack.raw["status"]["dir"]) / f"{n}.json").exists()  # type: ignore[union-attr]
                   for n in DAEMONS)

    def _save(self) -> None:
        state = {"pids": {n: p.pid for n, p in self.procs.items()},
                 "services": {"openbao": self.bao.proc.pid if self.bao and self.bao.proc else 0,
                              **_rabbit_pids(self.rabbit),
                              **{f"ceph-{n}": p.pid for n, p in
                                 (self.ceph.procs.items() if self.ceph else [])}},
                 "double_root": str(self.double_root), "labels": self.labels}
        (self.workdir / "demo-state.json").write_text(json.dumps(state, indent=1))

    # -- scenario ------------------------------------------------------------------------

    def run(self) -> bool:
        assert self.stack and self.bao and self.ceph
        cfg = self.stack.config()
        label = unique_label("demo-")
        repo = f"{label}.{DOMAIN}"
        self.labels.append(label)
        self._save()
        subject = "demo-subject"
        self.bao.put_keys(f"{subject}/cvmfs_keys/{repo}", {
            "publicKey": "demo public key\n", "certificateKey": "demo certificate\n",
            "gatewayKey": "plain_text demokey demo-gateway-secret\n"})
        rgw = RGW(cfg.s3, cfg.rgw)
        rgw.s3.create_bucket(Bucket=label)
        self.step(f"Vault keys stored at secrets/{subject}/cvmfs_keys/{repo}; bucket {label} "
                  "created")
        conn = amqp.connect(cfg.amqp, "demo")
        ch = conn.channel()
        ch.confirm_delivery()
        t = time.monotonic()
        amqp.publish_confirmed(ch, "", cfg.amqp.publisher_queue,
                               f"alice,{subject},{repo},P".encode())
        conn.close()
        self.step(f"sent 'alice,{subject},{repo},P' on {cfg.amqp.publisher_queue}")
        repos_d = Path(cfg.cvmfs.repositories_dir) / repo
        self._wait("provisioning", lambda: repos_d.is_dir() and rgw.get_notifications(label), 60)
        self.step(f"provisioned in {time.monotonic() - t:.2f}s: keys, mkfs (gateway mode), "
                  f"RGW topic + bucket notification, quorum queue '{label}'")
        self._wait("the consumers to subscribe", lambda: _consumers(cfg, label) > 0, 30)
        files = {
            "cvmfs/README.txt": b"Hello from the cvmfs-publisher demo\n",
            "cvmfs/bin/hello.sh": b"#!/bin/sh\necho hello from CVMFS\n",
            "cvmfs/data/numbers.csv": b"".join(b"%d,%d\n" % (i, i * i) for i in range(100)),
        }
        t = time.monotonic()
        for key, body in files.items():
            rgw.s3.put_object(Bucket=label, Key=key, Body=body)
        rgw.s3.put_object(Bucket=label, Key="cvmfs/tools/demo-tool-1.0.tar.gz",
                          Body=_tarball())
        self.step(f"uploaded {len(files)} files and cvmfs/tools/demo-tool-1.0.tar.gz to "
                  f"s3://{label}/ (Ceph 16.2 delivers a new persistent topic's first "
                  "events up to 30 s after its creation)")
        tree = _published_tree(self.double_root, repo)
        wanted = [tree / "README.txt", tree / "bin/hello.sh", tree / "data/numbers.csv",
                  tree / "software/tools/demo-tool-1.0/bin/demo-tool"]
        self._wait("publication", lambda: all(p.exists() for p in wanted), 90)
        took = time.monotonic() - t
        self.step(f"published in {took:.2f}s after the uploads:")
        for p in wanted:
            st = p.lstat()
            print(f"          /cvmfs/{repo}/{p.relative_to(tree)}  mode {st.st_mode & 0o777:o}"
                  f"  {st.st_size} bytes")
        revs = sorted((self.double_root / "double" / repo / "revisions").glob("*.json"),
                      key=lambda p: int(p.stem))
        for r in revs:
            doc = json.loads(r.read_text())
            print(f"          revision {doc.get('revision')}: {doc.get('command')} "
                  f"+{len(doc.get('added', []))} ~{len(doc.get('changed', []))} "
                  f"-{len(doc.get('deleted', []))}")
        ok = (tree / "bin/hello.sh").stat().st_mode & 0o111 != 0
        self.step("status: " + _status_line(self.stack))
        self.repo_request = (subject, repo)
        return ok

    def deprovision(self) -> None:
        """The other half of the contract: a delete request undoes the provisioning."""
        assert self.stack
        cfg = self.stack.config()
        subject, repo = self.repo_request
        conn = amqp.connect(cfg.amqp, "demo")
        ch = conn.channel()
        ch.confirm_delivery()
        t = time.monotonic()
        amqp.publish_confirmed(ch, "", cfg.amqp.publisher_queue, json.dumps(
            {"action": "delete", "user": "alice", "subject": subject, "repository": repo,
             "type": "personal"}).encode(), content_type="application/json")
        conn.close()
        repos_d = Path(cfg.cvmfs.repositories_dir) / repo
        self._wait("deprovisioning", lambda: not repos_d.exists(), 60)
        self.step(f"deprovisioned {repo} in {time.monotonic() - t:.2f}s (delete request): "
                  "notification, topic, queue, repository and keys removed")

    def _wait(self, what: str, check: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}; logs in "
                           f"{self.workdir / 'log'}")

    # -- stop ----------------------------------------------------------------------------

    def stop(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.rabbit:
            self.rabbit.stop()
        if self.ceph:
            self.ceph.stop()
        if self.bao:
            self.bao.stop()
        _unmount(self.double_root)
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.step("stopped everything the demo started")


def _rabbit_pids(node: RabbitNode | None) -> dict[str, int]:
    """The node's session (script and VM: stopped as a group) and its epmd."""
    pids: dict[str, int] = {}
    if node is not None and node.proc is not None:
        pids["rabbitmq-group"] = node.proc.pid
    if node is not None and node.epmd is not None:
        pids["rabbitmq-epmd"] = node.epmd.pid
    return pids


def _tarball() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, body, mode in (("bin/demo-tool", b"#!/bin/sh\necho demo tool 1.0\n", 0o755),
                                 ("share/doc/README", b"demo tool documentation\n", 0o644)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(body), mode
            tar.addfile(info, io.BytesIO(body))
    return gzip.compress(buf.getvalue())


def _published_tree(root: Path, repo: str) -> Path:
    sys.path.insert(0, str(REPO_ROOT))
    from tests.cvmfs_server_double import published_tree  # noqa: PLC0415 - the double's own API
    return Path(published_tree(root, repo))


def _unmount(root: Path) -> None:
    if not root.exists():
        return
    sys.path.insert(0, str(REPO_ROOT))
    from tests.cvmfs_server_double import unmount_all  # noqa: PLC0415
    unmount_all(root)


def _consumers(cfg: Any, queue: str) -> int:
    try:
        conn = amqp.connect(cfg.amqp, "demo")
    except amqp.CONNECTION_ERRORS:
        return 0
    try:
        return conn.channel().queue_declare(queue, passive=True).method.consumer_count
    except amqp.CONNECTION_ERRORS:
        return 0
    finally:
        if conn.is_open:
            conn.close()


def _status_line(stack: Stack) -> str:
    out = []
    for name in DAEMONS:
        try:
            doc = json.loads((Path(stack.raw["status"]["dir"]) / f"{name}.json").read_text())
            out.append(f"{name} {'healthy' if doc.get('healthy') else 'UNHEALTHY'}")
        except (OSError, ValueError):
            out.append(f"{name} no status")
    return ", ".join(out)


def stop_saved(workdir: Path, quiet: bool = False) -> None:
    """Stop a stack left running by ``--keep`` (pids from its state file)."""
    state_file = workdir / "demo-state.json"
    if state_file.exists():
        state = json.loads(state_file.read_text())
        for pid in state.get("pids", {}).values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
        # the RabbitMQ node is a script and its VM in one session: kill both (its data
        # is thrown away with the workdir)
        rabbit = state.get("services", {}).get("rabbitmq-group", 0)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if rabbit:
                os.killpg(rabbit, signal.SIGKILL)
        for pid in [*state.get("pids", {}).values(), *state.get("services", {}).values()]:
            if pid:
                kill_process(pid, signal.SIGKILL if pid not in state["pids"].values()
                             else signal.SIGTERM)
        _unmount(Path(state.get("double_root", workdir / "cvmfs-root")))
    shutil.rmtree(workdir, ignore_errors=True)
    if not quiet:
        print(f"stopped the demo stack in {workdir}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/demo.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="leave the stack running")
    parser.add_argument("--stop", action="store_true", help="stop a stack left by --keep")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    args = parser.parse_args(argv)
    if args.stop:
        stop_saved(args.workdir)
        return 0
    demo = Demo(args.workdir)
    ok = False
    try:
        demo.start()
        ok = demo.run()
        if ok and not args.keep:
            demo.deprovision()
        demo.step("demo " + ("succeeded" if ok else "FAILED"))
    except KeyboardInterrupt:
        demo.step("interrupted")
    except Exception as exc:
        demo.step(f"demo FAILED: {exc}")
    finally:
        if args.keep and ok:
            cfg = demo.workdir / "publisher.yaml"
            print(f"\nThe stack keeps running. Explore:\n"
                  f"  .venv/bin/cvmfs-publisher --config {cfg} status\n"
                  f"  tail -f {demo.workdir / 'log'}/*.log\n"
                  f"  ls {demo.double_root / 'var/spool/cvmfs'}/*/rdonly\n"
                  f"Stop it with: tools/demo.sh --stop")
        else:
            demo.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

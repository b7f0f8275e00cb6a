"""The local demo: a whole stack on loopback, an upload becoming a published repository.

    tools/demo.sh                  # set up, run the demo, stop everything at the end (or Ctrl-C)
    tools/demo.sh --keep           # leave the stack running to explore
    tools/demo.sh --stop           # stop a stack left by --keep
    tools/demo.sh --workdir DIR    # any of the above in DIR (default /tmp/cvmfs-publisher-demo)

Services come from ``devstack`` (the same code the test
suite uses): a RabbitMQ node of its own (the machine's broker is left alone), OpenBao, a one-node
Ceph RGW, and the ``cvmfs_server`` test double (CernVM-FS itself cannot run
here). The three daemons run as real processes with a generated
configuration.

One demo per work directory: its state (pids, configuration, mounts) lives
there, so demos in different directories run side by side (each has its own
OpenBao, RGW and uniquely named queues on the shared RabbitMQ), and a start
in a directory whose demo is still running refuses and names it instead of
stopping it. A demo left by ``--keep`` also writes its configuration's path
to ``cli.DEMO_CONFIG_POINTER``, so that ``cvmfs-publisher status`` finds it
without ``--config`` on a machine that has no real configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from cvmfs_publisher.adapters import amqp
from cvmfs_publisher.adapters.rgw import RGW
from cvmfs_publisher.operations.cli import DEMO_CONFIG_POINTER

from .ceph import Ceph
from .common import kill_process, sigterm_as_interrupt
from .openbao import OpenBao
from .rabbitmq import RabbitNode
from .stack import DOMAIN, REPO_ROOT, Stack, build_stack, make_double, tear_down, unique_label

DAEMONS = {
    "publisher-consumer": "cvmfs_publisher.daemons.publisher_consumer",
    "cvmfs-repo-consumers": "cvmfs_publisher.daemons.repo_consumers",
    "cvmfs-repo-sync": "cvmfs_publisher.daemons.repo_sync",
}
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "cvmfs-publisher-demo"
STATE_FILE = "demo-state.json"
ENV_FILE = "demo.env"


class DemoRunning(RuntimeError):
    """A demo still runs in the work directory asked for (the message names it)."""


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
        self._save()  # from now on a second start here sees this demo and refuses
        self.rabbit = RabbitNode(self.workdir / "rabbitmq")
        broker = self.rabbit.start().broker()
        self._save()
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
        # the node is the demo's own: the production queue names, as the README has them
        self.stack.raw["amqp"].update({"publisher_queue": "publisher_queue",
                                       "dead_letter_queue": "cvmfs.dead-letter"})
        cfg_file = self.stack.write()
        self.step(f"configuration written to {cfg_file}; cvmfs_server test double at "
                  f"{double.command}")
        a = self.stack.raw["amqp"]
        self.step(f"queues: publisher queue '{a['publisher_queue']}', dead letters "
                  f"'{a['dead_letter_queue']}' (the production names: the node is the demo's own)")
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
        pids = {n: p.pid for n, p in self.procs.items()}
        services = {"openbao": self.bao.proc.pid if self.bao and self.bao.proc else 0,
                    **_rabbit_pids(self.rabbit),
                    **{f"ceph-{n}": p.pid for n, p in
                       (self.ceph.procs.items() if self.ceph else [])}}
        state = {"demo": os.getpid(), "pids": pids, "services": services,
                 "started": {str(pid): process_start(pid)
                             for pid in (os.getpid(), *pids.values(), *services.values())
                             if pid},
                 "double_root": str(self.double_root), "labels": self.labels}
        (self.workdir / STATE_FILE).write_text(json.dumps(state, indent=1))

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

    def keep(self) -> None:
        """Leave the stack running: say how to use it, and let the CLI find its configuration."""
        assert self.stack and self.ceph
        cfg = self.workdir / "publisher.yaml"
        bucket = self.labels[-1]
        published = _published_tree(self.double_root, f"{bucket}.{DOMAIN}")
        env_file = self.workdir / ENV_FILE
        env_file.write_text(
            "# the kept demo's S3 (boto3 and the AWS CLI read these), bucket and published tree\n"
            f"export AWS_ACCESS_KEY_ID={self.ceph.access_key}\n"
            f"export AWS_SECRET_ACCESS_KEY={self.ceph.secret_key}\n"
            f"export AWS_ENDPOINT_URL={self.ceph.endpoint}\n"
            "export AWS_DEFAULT_REGION=default\n"
            f"export DEMO_BUCKET={bucket}\n"
            f"export DEMO_PUBLISHED={published}\n")
        env_file.chmod(0o600)
        DEMO_CONFIG_POINTER.write_text(f"{cfg}\n")
        stop = "tools/demo.sh --stop" + ("" if self.workdir == DEFAULT_WORKDIR
                                         else f" --workdir {self.workdir}")
        print(f"\nThe stack keeps running (configuration {cfg}). Explore:\n"
              "  .venv/bin/cvmfs-publisher status     # finds this configuration by itself\n"
              f"  tail -f {self.workdir / 'log'}/*.log\n"
              f"Upload: anything under cvmfs/ in bucket {bucket} (S3 endpoint "
              f"{self.ceph.endpoint}, credentials in {env_file}) is published:\n"
              f"  . {env_file}\n"
              "  .venv/bin/python -c 'import boto3, os; boto3.client(\"s3\").upload_file("
              "\"README.md\", os.environ[\"DEMO_BUCKET\"], \"cvmfs/README.md\")'\n"
              "  # or, with the AWS CLI: aws s3 cp README.md s3://$DEMO_BUCKET/cvmfs/README.md\n"
              "  ls -l $DEMO_PUBLISHED/README.md      # a few seconds later\n"
              f"Stop it with: {stop}", flush=True)

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
        _forget_pointer(self.workdir)
        # the node is the demo's own: thrown away whole, nothing to clean on it first
        tear_down(self.workdir, self.double_root, [self.rabbit, self.ceph, self.bao],
                  labels=self.labels)
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


def _consumers(cfg: Any, queue: str) -> int:
    try:
        conn = amqp.connect(cfg.amqp, "demo")
    except amqp.CONNECTION_ERRORS:
        return 0
    try:
        declared = amqp.passive_declare(conn, queue)  # None until provisioning declared it
        return declared.consumer_count if declared else 0
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


def process_start(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot), or None if it is gone.

    Stored with each pid in the state file: a pid whose start time differs
    is another process that reuses the number, never ours to signal.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else fields[19]


def _ours(pid: int, state: dict[str, Any]) -> bool:
    started = state.get("started", {}).get(str(pid))
    return bool(pid) and started is not None and process_start(pid) == started


def _state(workdir: Path) -> dict[str, Any]:
    try:
        return json.loads((workdir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def running_pids(workdir: Path) -> dict[str, int]:
    """What still runs of ``workdir``'s demo: the demo itself, its daemons (empty: none)."""
    state = _state(workdir)
    named = {"tools/demo.sh": state.get("demo", 0), **state.get("pids", {})}
    return {name: pid for name, pid in named.items() if _ours(pid, state)}


def prepare_workdir(workdir: Path) -> None:
    """Make ``workdir`` for a new demo, refusing to disturb a running one or foreign files.

    Raises :class:`DemoRunning` if a demo's daemons still run there, and
    ``RuntimeError`` for an existing directory that is not a demo's (the
    demo removes its directory when it stops, so it must be its own).
    """
    if workdir.exists():
        live = running_pids(workdir)
        if live:
            raise DemoRunning(
                f"a demo is already running in {workdir} ("
                + ", ".join(f"{n} pid {p}" for n, p in live.items())
                + f"); stop it with: tools/demo.sh --stop --workdir {workdir}, or start this "
                "one with another --workdir")
        if not (workdir / STATE_FILE).exists() and any(workdir.iterdir()):
            raise RuntimeError(f"{workdir} exists and is not a demo's work directory (no "
                               f"{STATE_FILE}); the demo deletes its directory when it stops: "
                               "choose an empty or new --workdir")
        if (workdir / STATE_FILE).exists():
            print(f"removing the leftovers of a demo that no longer runs in {workdir}")
            stop_saved(workdir, quiet=True)
    workdir.mkdir(parents=True, exist_ok=True)


def _forget_pointer(workdir: Path) -> None:
    """Remove the CLI's pointer to this demo's configuration (not another demo's)."""
    with contextlib.suppress(OSError):
        if DEMO_CONFIG_POINTER.read_text().strip() == str(workdir / "publisher.yaml"):
            DEMO_CONFIG_POINTER.unlink()


def stop_saved(workdir: Path, quiet: bool = False) -> bool:
    """Stop a stack left running by ``--keep`` (pids from its state file).

    Returns False, saying so unless ``quiet``, when there was nothing to stop.
    """
    state_file = workdir / STATE_FILE
    if not state_file.exists():
        if not quiet:
            print(f"no demo in {workdir}: nothing to stop")
            with contextlib.suppress(OSError):
                other = Path(DEMO_CONFIG_POINTER.read_text().strip()).parent
                if other != workdir and running_pids(other):
                    print(f"a demo runs in {other}: tools/demo.sh --stop --workdir {other}")
        return False
    state = _state(workdir)
    demo = state.get("demo", 0)
    if _ours(demo, state) and demo != os.getpid():  # a demo still running its scenario
        kill_process(demo, signal.SIGTERM, timeout=90)  # it stops what it started, then exits
    daemons = [pid for pid in state.get("pids", {}).values() if _ours(pid, state)]
    services = [pid for pid in state.get("services", {}).values() if _ours(pid, state)]
    for pid in daemons:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    for pid in daemons:
        kill_process(pid, signal.SIGTERM)
    # the RabbitMQ node is a script and its VM in one session: kill both (its data
    # is thrown away with the workdir, so nothing needs cleaning on it first)
    rabbit = state.get("services", {}).get("rabbitmq-group", 0)
    if _ours(rabbit, state):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(rabbit, signal.SIGKILL)
    for pid in services:
        kill_process(pid, signal.SIGKILL)
    _forget_pointer(workdir)
    tear_down(workdir, Path(state.get("double_root", workdir / "cvmfs-root")),
              labels=state.get("labels", []))
    if not quiet:
        print(f"stopped the demo stack in {workdir}")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/demo.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true",
                        help="leave the stack running (and say how to use it)")
    parser.add_argument("--stop", action="store_true", help="stop a stack left by --keep")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help="the demo's directory, removed when it stops (default: "
                        "%(default)s); one demo per directory")
    args = parser.parse_args(argv)
    workdir = args.workdir.absolute()
    if args.stop:
        stop_saved(workdir)
        return 0
    try:
        prepare_workdir(workdir)
    except RuntimeError as exc:  # DemoRunning, or a directory that is not a demo's
        print(f"tools/demo.sh: {exc}", file=sys.stderr)
        return 1
    demo = Demo(workdir)
    ok = False
    with sigterm_as_interrupt():  # SIGTERM cleans up like Ctrl-C
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
                demo.keep()
            else:
                demo.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""cvmfs-publisher: the operators' command line.

    cvmfs-publisher status [--json]             is everything published?
    cvmfs-publisher status REPO [--key KEY]     a repository's receipt; where one key stands
    cvmfs-publisher reconcile REPO [--dry-run]  bring a repository in line with its bucket
    cvmfs-publisher provision REPO --user U --subject S [--group]
    cvmfs-publisher deprovision REPO [--user U --subject S] [--group]
    cvmfs-publisher dlq list [--json]           what was dead-lettered, and why
    cvmfs-publisher dlq replay [--repo R]       send dead letters back to their queue
    cvmfs-publisher config check FILE           validate a configuration
    cvmfs-publisher migrate-config parameters.json  convert the seed's configuration
    cvmfs-publisher health --daemon D           container health check

Exit codes: 0 success (for status: everything published and every
daemon fresh), 1 something needs attention or failed, 2 usage error,
78 configuration error.

The configuration is the --config file, else $CVMFS_PUBLISHER_CONFIG, else
/etc/cvmfs-publisher/publisher.yaml; on a machine without that file, the
configuration of a local demo left running by "tools/demo.sh --keep" (the
command says so on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..adapters import amqp
from ..adapters.rabbitmq_api import ManagementAPI
from ..core import config
from ..core.errors import PublisherError, Transient
from ..core.names import InvalidName, validate_repository
from ..provisioning.messages import BadMessage, parse_request
from .health import main as health_main
from .migrate import MigrationError, migrate
from .receipt_view import format_key, format_repository, key_view, repository_view

EX_CONFIG = 78
DAEMONS = ("publisher-consumer", "cvmfs-repo-consumers", "cvmfs-repo-sync")

#: Written by the local demo (``tools/demo.sh --keep``): the path of its configuration.
#: Only consulted when nothing else names a configuration, so a real host's
#: /etc/cvmfs-publisher/publisher.yaml always wins over a demo.
DEMO_CONFIG_POINTER = Path(tempfile.gettempdir()) / "cvmfs-publisher-demo.config"


def config_path(explicit: str | None, env: dict[str, str] | None = None) -> tuple[str, str]:
    """The configuration file to read and why that one (for the message on stderr)."""
    env = dict(os.environ if env is None else env)
    if explicit:
        return explicit, ""
    if env.get(config.ENV_PREFIX + "CONFIG"):
        return env[config.ENV_PREFIX + "CONFIG"], ""
    if Path(config.DEFAULT_CONFIG_PATH).exists():
        return config.DEFAULT_CONFIG_PATH, ""
    try:
        demo = DEMO_CONFIG_POINTER.read_text(encoding="utf-8").strip()
    except OSError:
        demo = ""
    if demo and Path(demo).is_file():
        return demo, (f"using the running demo's configuration {demo} (no --config, no "
                      f"${config.ENV_PREFIX}CONFIG, no {config.DEFAULT_CONFIG_PATH})")
    return config.DEFAULT_CONFIG_PATH, ""


def _load(args: argparse.Namespace) -> config.Config:
    path, why = config_path(args.config)
    if why:
        print(why, file=sys.stderr)
    try:
        return config.load(path)
    except config.ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        if not args.config:
            print("name the configuration with --config FILE (or $CVMFS_PUBLISHER_CONFIG); "
                  "tools/demo.sh --keep leaves a demo whose configuration is used by default",
                  file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None


# ------------------------------------------------------------------------- status


def _age(ts: float, now: float) -> str:
    if not ts:
        return "never"
    s = max(0, now - ts)
    if s < 120:
        return f"{s:.0f}s ago"
    if s < 7200:
        return f"{s / 60:.0f}m ago"
    return f"{s / 3600:.1f}h ago"


def collect_status(cfg: config.Config, with_queues: bool = True) -> dict[str, Any]:
    """Merge the three daemons' status documents (plus queue depths) per repository."""
    now = time.time()
    daemons: dict[str, Any] = {}
    repos: dict[str, dict[str, Any]] = {}
    for name in DAEMONS:
        path = Path(cfg.status.dir) / f"{name}.json"
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            daemons[name] = {"state": "missing", "detail": f"{path}: {exc}"}
            continue
        age = now - float(doc.get("updated", 0))
        fresh = age <= max(60.0, cfg.status.interval * 6)
        daemons[name] = {"state": "ok" if doc.get("healthy") and fresh else
                         ("stale" if not fresh else "unhealthy"),
                         "age": round(age, 1), "dead_lettered": doc.get("dead_lettered", 0)}
        if "broker_connected" in doc:  # cvmfs-repo-sync has no broker: no such field
            daemons[name]["broker_connected"] = doc["broker_connected"]
            for key in ("broker_node", "broker_error", "quorum_lost"):  # which node, or why none
                if doc.get(key):
                    daemons[name][key] = doc[key]
        for repo, entry in (doc.get("repositories") or {}).items():
            r = repos.setdefault(repo, {"pending": 0, "queue_depth": None, "last_publish": 0.0,
                                        "last_result": "", "last_error": "",
                                        "consecutive_failures": 0})
            if name == "cvmfs-repo-sync":
                for k in ("pending", "last_publish", "last_result", "consecutive_failures",
                          "last_publish_duration", "backoff"):
                    if k in entry:
                        r[k] = entry[k]
            elif name == "cvmfs-repo-consumers":
                r["staged"] = entry.get("pending", 0)
                for k in ("last_reconcile", "reconcile_seconds", "reconcile_healed",
                          "healed_total"):
                    if k in entry:
                        r[k] = entry[k]
            if entry.get("last_error"):
                r["last_error"] = f"{name}: {entry['last_error']}"
    dlq = None
    if with_queues:
        try:
            depths = _queue_depths(cfg, [cfg.amqp.dead_letter_queue,
                                         *(repo.split(".", 1)[0] for repo in repos)])
        except PublisherError as exc:
            daemons["rabbitmq"] = {"state": "unreachable", "detail": str(exc)}
        else:
            dlq = depths.get(cfg.amqp.dead_letter_queue)
            for repo, r in repos.items():
                r["queue_depth"] = depths.get(repo.split(".", 1)[0])
    ok = all(d["state"] == "ok" for d in daemons.values()) and all(
        not r.get("pending") and not r.get("staged") and not r.get("queue_depth")
        and r.get("last_result") in ("ok", "") and not r.get("consecutive_failures")
        for r in repos.values()) and not dlq
    return {"time": now, "all_published": ok, "daemons": daemons, "dead_letter_queue": dlq,
            "repositories": repos}


def _queue_depths(cfg: config.Config, queues: list[str]) -> dict[str, int]:
    """Messages per queue: ready ones counted exactly now (AMQP passive declare),
    the larger of that and the management API's sampled total (which also counts
    messages in a consumer's hands, but lags by up to ~20 s)."""
    depths: dict[str, int] = {}
    try:
        conn = amqp.connect(cfg.amqp, "cvmfs-publisher-status")
    except (*amqp.CONNECTION_ERRORS, OSError) as exc:
        raise Transient(f"RabbitMQ unreachable: {amqp.reason(exc)}") from None
    try:
        for q in queues:
            n = amqp.ready_count(conn, q)
            if n is not None:
                depths[q] = n
    except amqp.CONNECTION_ERRORS as exc:
        raise Transient(f"RabbitMQ connection lost while counting queues: "
                        f"{type(exc).__name__}") from None
    finally:
        if conn.is_open:
            conn.close()
    if cfg.amqp.management_endpoints():
        sampled = ManagementAPI(cfg.amqp).queue_depths()  # one call, not one per queue
        for q, ready in list(depths.items()):
            depths[q] = max(ready, sampled.get(q, 0))
    return depths


def cmd_status(args: argparse.Namespace) -> int:
    if args.repository:
        return cmd_repository_status(args)
    if args.key:
        print("--key needs a repository: cvmfs-publisher status REPO --key KEY", file=sys.stderr)
        return 2
    cfg = _load(args)
    st = collect_status(cfg, with_queues=not args.no_queues)
    if args.json:
        print(json.dumps(st, indent=1, sort_keys=True))
        return 0 if st["all_published"] else 1
    now = st["time"]
    for name, d in st["daemons"].items():
        extra = f" (status {d['age']:.0f}s old)" if "age" in d else f" ({d.get('detail', '')})"
        print(f"{name:22} {d['state']}{extra}")
    if st["dead_letter_queue"]:
        print(f"dead-letter queue: {st['dead_letter_queue']} message(s): "
              "see 'cvmfs-publisher dlq list'")
    print()
    print(f"{'REPOSITORY':40} {'QUEUE':>5} {'PENDING':>7} {'LAST PUBLISH':>13} {'RESULT':7} "
          f"{'LAST RECONCILE':>14} HEALED")
    for repo in sorted(st["repositories"]):
        r = st["repositories"][repo]
        depth = "-" if r["queue_depth"] is None else str(r["queue_depth"])
        pending = int(r.get("pending") or 0) + int(r.get("staged") or 0)
        healed = "-" if "healed_total" not in r else str(r["healed_total"])
        print(f"{repo:40} {depth:>5} {pending:>7} {_age(r['last_publish'], now):>13} "
              f"{r['last_result'] or '-':7} {_age(r.get('last_reconcile', 0.0), now):>14} "
              f"{healed}")
        if r["last_error"]:  # whole, on its own indented lines: paths must not be cut
            print(textwrap.indent(f"last error: {r['last_error']}", "    "))
    print()
    print("everything is published" if st["all_published"] else "NOT everything is published")
    return 0 if st["all_published"] else 1


def cmd_repository_status(args: argparse.Namespace) -> int:
    """One repository's receipt, or one key's state; exit 0 when it is all published."""
    cfg = _load(args)
    try:
        repo = validate_repository(args.repository, cfg.cvmfs.domain)
    except InvalidName as exc:
        print(f"{args.repository}: {exc}", file=sys.stderr)
        return 2
    if args.key:
        s3, why = None, ""  # without S3 the view says why and compares nothing
        try:
            # Imported here: boto3 is not in the sync-publisher image (each image
            # holds only what its daemon imports), where the receipt is still shown.
            from ..adapters.rgw import RGW  # noqa: PLC0415 (see above)
            s3 = RGW(cfg.s3, cfg.rgw)
        except ImportError as exc:
            why = (f"no S3 client in this image ({exc.name} is not installed): run the "
                   "command in the cvmfs-repo-consumers container to compare with S3")
        except PublisherError as exc:
            why = str(exc)
        view = key_view(cfg, repo, args.key, s3, why)
        print(json.dumps(view, indent=1, sort_keys=True) if args.json else format_key(view))
        return 0 if view["in_sync"] else 1
    rview = repository_view(cfg, repo)
    print(json.dumps(rview, indent=1, sort_keys=True) if args.json else format_repository(rview))
    done = not rview["pending"]["count"] and not (rview["last_error"] or {}).get("failing")
    return 0 if done else 1


# ------------------------------------------------------------------------- reconcile


def cmd_reconcile(args: argparse.Namespace) -> int:
    # Imported here: reconcile reads S3 (boto3), which the sync-publisher image
    # does not install (each image holds only what its daemon imports).
    from ..pipeline.reconcile import reconcile  # noqa: PLC0415 (see above)

    cfg = _load(args)
    try:
        validate_repository(args.repository, cfg.cvmfs.domain)
    except InvalidName as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        plan = reconcile(cfg, args.repository, dry_run=args.dry_run)
    except PublisherError as exc:
        print(f"reconcile {args.repository} failed: {exc}", file=sys.stderr)
        return 1
    print(plan.render())
    if not plan.ok:
        print("some differences could not be staged: see the lines marked above; run "
              "reconcile again once the cause is fixed", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------- provisioning


def _publish(cfg: config.Config, queue: str, body: bytes) -> None:
    conn = amqp.connect(cfg.amqp, "cvmfs-publisher-cli")
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        amqp.publish_confirmed(ch, "", queue, body, content_type="application/json")
    finally:
        conn.close()


def cmd_provision(args: argparse.Namespace, action: str) -> int:
    cfg = _load(args)
    body = json.dumps({"action": action, "user": args.user, "subject": args.subject,
                       "repository": args.repository,
                       "type": "group" if args.group else "personal"}).encode()
    try:
        parse_request(body, cfg.cvmfs.domain)  # the daemon would dead-letter it: say so now
    except BadMessage as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        _publish(cfg, cfg.amqp.publisher_queue, body)
    except Exception as exc:
        print(f"error: cannot publish to {cfg.amqp.publisher_queue}: {exc}", file=sys.stderr)
        return 1
    print(f"{action} request for {args.repository} queued on {cfg.amqp.publisher_queue}")
    return 0


# ------------------------------------------------------------------------- dead letters


def _dead_letters(cfg: config.Config) -> tuple[Any, Any, list[tuple[Any, Any, bytes]]]:
    """Open a channel and hold every dead letter unacked (closing requeues them)."""
    conn = amqp.connect(cfg.amqp, "cvmfs-publisher-cli")
    ch = conn.channel()
    ch.confirm_delivery()
    total = ch.queue_declare(cfg.amqp.dead_letter_queue, passive=True).method.message_count
    got: list[tuple[Any, Any, bytes]] = []
    if total:
        ch.basic_qos(prefetch_count=total)
        tag = ch.basic_consume(cfg.amqp.dead_letter_queue,
                               lambda c, m, p, b: got.append((m, p, b)))
        deadline = time.monotonic() + 10
        while len(got) < total and time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.2)
        ch.basic_cancel(tag)
    return conn, ch, got


def _describe(method: Any, props: Any, body: bytes) -> dict[str, Any]:
    h = dict(props.headers or {})
    return {"queue": h.get("x-original-queue") or method.routing_key,
            "repository": h.get("x-repository", ""), "error": h.get("x-error", ""),
            "attempts": h.get("x-attempts", 0), "failed_at": h.get("x-failed-at", 0),
            "daemon": h.get("x-daemon", ""),
            "body": body[:300].decode("utf-8", "replace")}


def cmd_dlq(args: argparse.Namespace) -> int:
    cfg = _load(args)
    try:
        conn, ch, msgs = _dead_letters(cfg)
    except Exception as exc:
        print(f"error: cannot read {cfg.amqp.dead_letter_queue}: {exc}", file=sys.stderr)
        return 1
    try:
        if args.dlq_command == "list":
            rows = [_describe(*m) for m in msgs]
            if args.json:
                print(json.dumps(rows, indent=1))
            else:
                print(f"{len(rows)} message(s) in {cfg.amqp.dead_letter_queue}")
                for r in rows:
                    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["failed_at"] or 0))
                    print(f"- {when}Z queue={r['queue']} repository={r['repository'] or '-'} "
                          f"attempts={r['attempts']} error={r['error']}")
            return 0
        replayed = 0
        for method, props, body in msgs:
            d = _describe(method, props, body)
            if args.repo and args.repo not in (d["repository"], d["queue"]) and \
                    args.repo.split(".", 1)[0] != d["queue"]:
                continue
            headers = {k: v for k, v in (props.headers or {}).items()
                       if not k.startswith("x-") or k == "x-replayed"}
            headers["x-replayed"] = int(headers.get("x-replayed", 0) or 0) + 1
            amqp.publish_confirmed(ch, "", d["queue"], body, headers,
                                   props.content_type or "application/octet-stream")
            ch.basic_ack(method.delivery_tag)
            replayed += 1
            print(f"replayed to {d['queue']}: repository={d['repository'] or '-'}")
        print(f"{replayed} message(s) replayed")
        return 0
    finally:
        conn.close()  # unacked messages go back to the dead-letter queue


# ------------------------------------------------------------------------- config


def cmd_config_check(args: argparse.Namespace) -> int:
    try:
        cfg = config.load(args.file)
        for daemon in args.daemon or DAEMONS:
            config.require(cfg, daemon)
    except config.ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EX_CONFIG
    print(f"{args.file}: ok")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    try:
        written = migrate(Path(args.parameters), Path(args.output), Path(args.secrets_dir),
                          args.secrets_mount)
    except (MigrationError, config.ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} and {len(written)} secret file(s) in {args.secrets_dir} "
          "(mode 0600); review the file, then run 'cvmfs-publisher config check'")
    return 0


# ------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cvmfs-publisher", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--config", "-c", help="configuration file (default: $CVMFS_PUBLISHER_CONFIG, "
                   f"else {config.DEFAULT_CONFIG_PATH}, else a running demo's)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("status", help="state of every repository and daemon; with REPO, "
                       "its receipt; with --key, where one key stands")
    s.add_argument("repository", nargs="?", help="one repository: its receipt")
    s.add_argument("--key", help="an S3 object key of the repository's bucket (cvmfs/...)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--no-queues", action="store_true", help="skip the RabbitMQ queue depths")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("reconcile", help="stage every difference between a bucket and its "
                       "repository")
    s.add_argument("repository")
    s.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    s.set_defaults(func=cmd_reconcile)

    for name, action in (("provision", "create"), ("deprovision", "delete")):
        s = sub.add_parser(name, help=f"queue a '{action}' request on the publisher queue")
        s.add_argument("repository")
        s.add_argument("--user", default="admin", help="AAI user (default: admin)")
        s.add_argument("--subject", default="admin", help="IAM subject (Vault path for "
                       "personal repositories)")
        s.add_argument("--group", action="store_true", help="a group repository")
        s.set_defaults(func=lambda a, act=action: cmd_provision(a, act))

    s = sub.add_parser("dlq", help="dead-lettered messages")
    dsub = s.add_subparsers(dest="dlq_command", required=True)
    d = dsub.add_parser("list", help="list dead letters with their reason (nothing consumed)")
    d.add_argument("--json", action="store_true", help="machine-readable output (one object "
                   "per message: queue, repository, error, attempts, failed_at, daemon, body)")
    d = dsub.add_parser("replay", help="send dead letters back to their original queue")
    d.add_argument("--repo", help="only this repository (name or label)")
    s.set_defaults(func=cmd_dlq)

    s = sub.add_parser("config", help="configuration tools")
    csub = s.add_subparsers(dest="config_command", required=True)
    c = csub.add_parser("check", help="validate a configuration file")
    c.add_argument("file")
    c.add_argument("--daemon", action="append", choices=DAEMONS,
                   help="check the keys this daemon requires (default: all three)")
    c.set_defaults(func=cmd_config_check)

    s = sub.add_parser("migrate-config", help="convert the seed's parameters.json to YAML")
    s.add_argument("parameters", help="the seed's parameters.json")
    s.add_argument("--output", "-o", default="publisher.yaml", help="YAML file to write")
    s.add_argument("--secrets-dir", default="secrets", help="where to write secret files")
    s.add_argument("--secrets-mount", help="path of the secrets inside the containers "
                   "(e.g. /run/secrets); default: the files' own paths")
    s.set_defaults(func=cmd_migrate)

    # its options (--daemon, --max-age, --help...) belong to health.main: main() hands
    # them over unparsed (argparse.REMAINDER does not take a leading option)
    sub.add_parser("health", help="container health check (exit 0 healthy, 1 not)",
                   add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "health":
        return health_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())

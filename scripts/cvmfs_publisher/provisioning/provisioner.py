"""Provisioning and deprovisioning of one repository (publisher-consumer).

Every step is idempotent, so a message that is retried, redelivered after
a crash or simply sent twice converges to the same state and changes
nothing the second time. Order matters: the AMQP exchange and queue exist
before RGW is told to push into them (RGW drops events for a missing
exchange silently).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from ..adapters import amqp
from ..adapters.cvmfs import CvmfsError, CvmfsServer, NotInTransaction
from ..adapters.rabbitmq_api import ManagementAPI
from ..adapters.rgw import RGW
from ..adapters.vault import RepositoryKeys, VaultClient
from ..core import durable
from ..core.announcements import announcement
from ..core.config import Config
from ..core.errors import Transient
from ..core.names import label_of, vault_path
from ..staging.area import Staging
from .messages import ProvisionRequest

log = logging.getLogger(__name__)

KEY_MODES = {"pub": 0o444, "crt": 0o444, "gw": 0o400}


def write_keys(keys_dir: Path, repo: str, keys: RepositoryKeys) -> bool:
    """Write ``<repo>.pub/.crt/.gw`` into ``keys_dir``; True if anything changed.

    Files are written in a private (0700) temporary directory inside
    ``keys_dir``, fsynced, given their final mode, then renamed into place:
    a reader never sees a partial or world-readable gateway key.
    """
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(keys_dir, 0o700)
    wanted = {"pub": keys.pub, "crt": keys.crt, "gw": keys.gw}
    current = {}
    for ext in wanted:
        p = keys_dir / f"{repo}.{ext}"
        try:
            current[ext] = (p.read_text(), p.stat().st_mode & 0o777)
        except OSError:
            current[ext] = None
    if all(current[e] == (wanted[e], KEY_MODES[e]) for e in wanted):
        return False
    tmp = Path(tempfile.mkdtemp(prefix=f".{repo}.", dir=keys_dir))  # mode 0700
    try:
        for ext, content in wanted.items():
            p = tmp / f"{repo}.{ext}"
            durable.write_new(p, content.encode("utf-8"), 0o600)
            os.chmod(p, KEY_MODES[ext])
        for ext in wanted:
            os.replace(tmp / f"{repo}.{ext}", keys_dir / f"{repo}.{ext}")
        durable.fsync_dir(keys_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def remove_keys(keys_dir: Path, repo: str) -> None:
    for ext in KEY_MODES:
        with contextlib.suppress(FileNotFoundError):
            (keys_dir / f"{repo}.{ext}").unlink()


class Provisioner:
    """The steps of DESIGN §1 for one repository, on the daemon's clients."""

    def __init__(self, cfg: Config, vault: VaultClient, rgw: RGW, cvmfs: CvmfsServer,
                 mgmt: ManagementAPI) -> None:
        self.cfg = cfg
        self.vault = vault
        self.rgw = rgw
        self.cvmfs = cvmfs
        self.mgmt = mgmt

    # -- create -------------------------------------------------------------------------

    def create(self, req: ProvisionRequest, conn: amqp.Connection,
               ch: amqp.Channel) -> list[str]:
        """Provision ``req.repository``; returns the steps that changed something."""
        repo, label = req.repository, label_of(req.repository)
        changed: list[str] = []
        keys = self.vault.read_keys(vault_path(repo, req.kind, req.subject), repo)
        keys_dir = Path(self.cfg.cvmfs.keys_dir)
        if write_keys(keys_dir, repo, keys):
            changed.append("keys")
        if self._ensure_repository(repo, keys_dir):
            changed.append("mkfs")
        if self._ensure_queue(conn, ch, label):
            changed.append("queue")
        self.rgw.ensure_bucket(label, repo)
        arn = self.rgw.create_topic(label, self.cfg.amqp.notification_exchange, repo)
        if not self._notification_in_place(label, arn):
            self.rgw.put_notification(label, arn, self.cfg.s3.prefix, repo)
            changed.append("notification")
        # a broadcast: the consumers also find new queues by listing the broker
        amqp.publish_confirmed(ch, self.cfg.amqp.control_exchange, f"repository.created.{label}",
                               announcement("created", repo, label, label),
                               content_type="application/json", mandatory=False)
        return changed

    def _ensure_repository(self, repo: str, keys_dir: Path) -> bool:
        """mkfs unless it exists (:meth:`CvmfsServer.create_repository`); Transient on failure."""
        try:
            return self.cvmfs.create_repository(repo, str(keys_dir))
        except CvmfsError as exc:
            raise Transient(str(exc), repo) from None

    def _remove_repository(self, repo: str) -> None:
        """``abort -f`` when in a transaction, then ``rmfs -f``; Transient (retried
        later) when the abort did not succeed, so the gateway lease is never leaked."""
        try:
            if self.cvmfs.in_transaction(repo):
                log.info("repository=%s step=deprovision outcome=aborting: in a transaction, "
                         "abort -f before rmfs (releases the gateway lease)", repo)
                try:
                    self.cvmfs.abort(repo)
                except NotInTransaction:
                    pass
            if self.cvmfs.in_transaction(repo):  # a publish opened one meanwhile
                raise Transient(f"cvmfs_server abort -f {repo}: still in a transaction, rmfs "
                                "would leak its gateway lease; retried later", repo)
            self.cvmfs.rmfs(repo)
        except CvmfsError as exc:
            raise Transient(f"{exc} (rmfs not run: it would leak the gateway lease; "
                            "retried later)" if exc.step == "abort" else str(exc),
                            repo) from None

    def _ensure_queue(self, conn: amqp.Connection,
                      ch: amqp.Channel, label: str) -> bool:
        """Declare the repository queue, or adopt one an older deployment declared."""
        a = self.cfg.amqp
        changed = False
        if amqp.queue_exists(conn, label):
            info = self.mgmt.queue(label) or {}
            args = info.get("arguments") or {}
            if "x-dead-letter-exchange" not in args or "x-delivery-limit" not in args:
                # RabbitMQ refuses a re-declaration with other arguments: a policy
                # adds dead-lettering and the delivery limit to the existing queue.
                # A policy with a key the queue type does not know (delivery-limit
                # on a classic queue) is not applied at all, so set it by type.
                name = f"cvmfs-repo-{label}"
                definition: dict[str, object] = {
                    "dead-letter-exchange": a.dead_letter_exchange,
                    "dead-letter-routing-key": label,
                }
                quorum = args.get("x-queue-type") == "quorum" or info.get("type") == "quorum"
                if quorum:
                    definition["delivery-limit"] = a.delivery_limit
                current = self.mgmt.policy(name)
                if not current or current.get("definition") != definition:
                    self.mgmt.put_policy(name, f"^{re.escape(label)}$", definition)
                    log.info("queue=%s existed without dead-letter arguments: policy %s "
                             "applied", label, name)
                    if not quorum:
                        log.warning("queue=%s is a classic queue (declared by an older "
                                    "deployment): no delivery limit and no single active "
                                    "consumer; delete it and provision again to migrate", label)
                    changed = True
        else:
            ch.queue_declare(label, durable=True,
                             arguments=amqp.work_queue_arguments(a, label, single_active=True))
            changed = True
        ch.queue_bind(label, a.notification_exchange, routing_key=label)
        return changed

    def _notification_in_place(self, bucket: str, arn: str) -> bool:
        for conf in self.rgw.get_notifications(bucket):
            if conf.get("Id") == self.rgw.rgwcfg.notification_id and conf.get("TopicArn") == arn:
                rules = conf.get("Filter", {}).get("Key", {}).get("FilterRules", [])
                if any(r.get("Value") == self.cfg.s3.prefix for r in rules):
                    return True
        return False

    # -- delete -------------------------------------------------------------------------

    def delete(self, req: ProvisionRequest, conn: amqp.Connection,
               ch: amqp.Channel) -> list[str]:
        """Undo :meth:`create`: notification, topic, queue, repository, keys, staging."""
        repo, label = req.repository, label_of(req.repository)
        changed: list[str] = []
        if self.rgw.bucket_exists(label, repo):
            if self.rgw.get_notifications(label):
                self.rgw.delete_notification(label, repo)
                changed.append("notification")
        if self.rgw.delete_topic(label, repo):
            changed.append("topic")
        if amqp.queue_exists(conn, label):
            ch.queue_delete(label)
            changed.append("queue")
        for delay in self.cfg.amqp.retry_delays:
            ch.queue_delete(amqp.retry_queue_name(label, delay))
        if self.mgmt.policy(f"cvmfs-repo-{label}"):
            self.mgmt.delete_policy(f"cvmfs-repo-{label}")
        if self.cvmfs.exists(repo):
            self._remove_repository(repo)
            changed.append("rmfs")
        remove_keys(Path(self.cfg.cvmfs.keys_dir), repo)
        if Staging(self.cfg.cvmfs.staging_dir, repo).remove():
            changed.append("staging")
        amqp.publish_confirmed(ch, self.cfg.amqp.control_exchange, f"repository.deleted.{label}",
                               announcement("deleted", repo, label, label),
                               content_type="application/json", mandatory=False)
        return changed


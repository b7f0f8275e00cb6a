"""The RabbitMQ management HTTP API, for what AMQP cannot tell.

Used to list the repository queues bound to the ``notification`` exchange
(the broker is the registry: a restart or a second host needs no other),
to read queue depths for the status document, and to apply a policy to a
queue that an older deployment declared without our arguments.
Standard library only (urllib); TLS verification on by default. With
``amqp.management_urls`` (one per cluster node) a node that does not answer
is skipped: every node serves the whole cluster's API.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from ..core.config import AmqpConfig
from ..core.errors import Permanent, Transient

log = logging.getLogger(__name__)


class ManagementAPI:
    """A small client of ``/api`` on the management plugin."""

    def __init__(self, cfg: AmqpConfig, timeout: float = 10.0) -> None:
        self.bases = cfg.management_endpoints()
        if not self.bases:
            raise Permanent("amqp.management_url is not configured")
        self._first = 0  # the node that answered last is asked first
        self.vhost = urllib.parse.quote(cfg.vhost, safe="")
        password = cfg.password.get() if cfg.password else ""
        token = base64.b64encode(f"{cfg.user}:{password}".encode()).decode()
        self._auth = f"Basic {token}"
        self.timeout = timeout
        self._ctx: ssl.SSLContext | None = None
        if any(b.startswith("https") for b in self.bases):
            self._ctx = ssl.create_default_context(cafile=cfg.ca_file or None)
            if not cfg.verify:
                log.warning("RabbitMQ management API TLS verification DISABLED (amqp.verify)")
                self._ctx.check_hostname = False
                self._ctx.verify_mode = ssl.CERT_NONE

    @property
    def base(self) -> str:
        return self.bases[self._first]

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        """The call on the first node that answers; Transient naming each when none does."""
        errors: list[tuple[str, Transient]] = []
        n = len(self.bases)
        for i in [(self._first + k) % n for k in range(n)]:
            try:
                result = self._call_one(self.bases[i], method, path, body)
            except Transient as exc:
                errors.append((self.bases[i], exc))
                continue
            self._first = i
            return result
        if n == 1:
            raise errors[0][1]
        raise Transient("; ".join(f"{base}: {exc}" for base, exc in errors))

    def _call_one(self, base: str, method: str, path: str, body: Any) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(  # noqa: S310 - URL scheme comes from configuration
            base + path, data=data, method=method,
            headers={"Authorization": self._auth, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._ctx) as resp:  # noqa: S310
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            if exc.code >= 500:
                raise Transient(f"RabbitMQ management API {method} {path}: "
                                f"HTTP {exc.code}") from None
            raise Permanent(f"RabbitMQ management API {method} {path}: "
                            f"HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Transient(f"RabbitMQ management API unreachable: {reason}") from None
        return json.loads(raw) if raw else {}

    def queues_bound_to(self, exchange: str) -> dict[str, str]:
        """``{queue: routing_key}`` for every queue bound to ``exchange``."""
        ex = urllib.parse.quote(exchange, safe="")
        path = f"/api/exchanges/{self.vhost}/{ex}/bindings/source"
        out: dict[str, str] = {}
        for b in self._call("GET", path) or []:
            if b.get("destination_type") == "queue":
                out[b["destination"]] = b.get("routing_key", "")
        return out

    def queue(self, name: str) -> dict[str, Any] | None:
        """Queue details (``messages``, ``consumers``, ``arguments``...) or None."""
        return self._call("GET", f"/api/queues/{self.vhost}/{urllib.parse.quote(name, safe='')}")

    def queue_depths(self) -> dict[str, int]:
        """``{queue: messages}`` of every queue of the virtual host, in one call.

        One call instead of one per queue: with 1,000 repositories the
        per-queue calls cost the consumers a second of CPU per listing (and
        ``cvmfs-publisher status`` a thousand requests).
        """
        return {name: q["messages"] for name, q in self.queue_overview().items()}

    def queue_overview(self) -> dict[str, dict[str, Any]]:
        """``{queue: {"messages": n, "members": [...], "online": [...]}}`` in one call.

        ``members`` and ``online`` are a quorum queue's nodes (empty for
        others): fewer than a majority online means no quorum, the queue
        neither takes nor delivers messages until a node returns.
        """
        rows = self._call("GET", f"/api/queues/{self.vhost}"
                                 "?columns=name,messages,members,online") or []
        return {r["name"]: {"messages": int(r.get("messages", 0) or 0),
                            "members": list(r.get("members") or []),
                            "online": list(r.get("online") or [])}
                for r in rows if "name" in r}

    def active_consumers(self) -> set[str]:
        """Tags of the consumers the broker has made active on a single-active-consumer
        queue of this vhost (``activity_status`` ``single_active``; one call for all).

        The broker tells an AMQP 0-9-1 consumer nothing when it becomes the
        active one; the management API does (``consumer_details`` ``active``,
        refreshed at the statistics interval, about 5 s; measured on 3.10).
        """
        out: set[str] = set()
        for c in self._call("GET", f"/api/consumers/{self.vhost}") or []:
            if c.get("activity_status") == "single_active" or (
                    c.get("active") and c.get("activity_status") is None):
                out.add(str(c.get("consumer_tag", "")))
        return out

    def put_policy(self, name: str, pattern: str, definition: dict[str, Any],
                   apply_to: str = "queues", priority: int = 10) -> None:
        """Create or replace a policy (idempotent)."""
        self._call("PUT", f"/api/policies/{self.vhost}/{urllib.parse.quote(name, safe='')}",
                   {"pattern": pattern, "definition": definition, "apply-to": apply_to,
                    "priority": priority})

    def delete_policy(self, name: str) -> None:
        self._call("DELETE", f"/api/policies/{self.vhost}/{urllib.parse.quote(name, safe='')}")

    def policy(self, name: str) -> dict[str, Any] | None:
        return self._call("GET", f"/api/policies/{self.vhost}/{urllib.parse.quote(name, safe='')}")

"""Vault / OpenBao access with AppRole: login, renewal, KV v2 key reads.

Only publisher-consumer talks to Vault (least privilege). The token is
renewed when less than half of its TTL is left and the daemon logs in
again when renewal fails, the token expired or Vault answered 403 for a
token reason. Every error message is built by us, from status codes, never
from a response body, so no token or secret_id can reach a log line.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import hvac
import hvac.exceptions
import requests

from ..core.config import VaultConfig
from ..core.errors import Permanent, Transient

log = logging.getLogger(__name__)

#: Vault field -> key file suffix (DESIGN §2). ``masterKey`` is never written.
KEY_FIELDS = {"publicKey": "pub", "certificateKey": "crt", "gatewayKey": "gw"}

_NETWORK = (requests.exceptions.ConnectionError, requests.exceptions.Timeout)
_SERVER = (hvac.exceptions.InternalServerError, hvac.exceptions.VaultDown,
           hvac.exceptions.BadGateway, hvac.exceptions.UnexpectedError,
           hvac.exceptions.RateLimitExceeded)


@dataclass(frozen=True)
class RepositoryKeys:
    """The three public/gateway keys a gateway-mode publisher needs."""

    pub: str
    crt: str
    gw: str

    def __repr__(self) -> str:  # never print key material
        return "RepositoryKeys(***)"


class VaultClient:
    """AppRole-authenticated KV v2 reader."""

    def __init__(self, cfg: VaultConfig) -> None:
        if not cfg.url:
            raise Permanent("vault.url is not configured")
        self.cfg = cfg
        verify: bool | str = cfg.ca_file or True
        if not cfg.verify:
            log.warning("Vault TLS certificate verification is DISABLED by configuration")
            verify = False
        self._client = hvac.Client(url=cfg.url, verify=verify, timeout=cfg.timeout,
                                   namespace=cfg.namespace or None)
        self._secret_id: str | None = None
        self._expires = 0.0
        self._ttl = 0.0

    # -- authentication --------------------------------------------------------------

    def _get_secret_id(self) -> str:
        if self._secret_id is not None:
            return self._secret_id
        if not self.cfg.secret_id or not self.cfg.role_id:
            raise Permanent("vault.role_id / vault.secret_id are not configured")
        raw = self.cfg.secret_id.get()
        if self.cfg.secret_id_wrapped:
            try:
                # the wrapping token authenticates its own unwrap call
                resp = hvac.Client(url=self.cfg.url, token=raw, verify=self._client.session.verify,
                                   timeout=self.cfg.timeout,
                                   namespace=self.cfg.namespace or None).sys.unwrap()
            except _NETWORK as exc:
                raise Transient(f"Vault unreachable while unwrapping secret_id: "
                                f"{type(exc).__name__}") from None
            except hvac.exceptions.VaultError as exc:
                raise Permanent("cannot unwrap the response-wrapped secret_id "
                                f"({type(exc).__name__}); issue a new wrapped secret_id") from None
            raw = resp["data"]["secret_id"]
        self._secret_id = raw
        return raw

    def login(self) -> None:
        """AppRole login; raises Transient/Permanent with a secret-free message."""
        secret_id = self._get_secret_id()
        try:
            resp = self._client.auth.approle.login(
                role_id=self.cfg.role_id.get(),  # type: ignore[union-attr]
                secret_id=secret_id, mount_point=self.cfg.approle_mount,
            )
        except _NETWORK as exc:
            raise Transient(f"Vault unreachable at {self.cfg.url}: {type(exc).__name__}") from None
        except _SERVER as exc:
            raise Transient(f"Vault error during login: {type(exc).__name__}") from None
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden,
                hvac.exceptions.Unauthorized) as exc:
            raise Permanent(f"Vault AppRole login refused ({type(exc).__name__}): "
                            "check role_id / secret_id") from None
        auth = resp["auth"]
        self._ttl = float(auth.get("lease_duration") or 0)
        self._expires = time.monotonic() + self._ttl if self._ttl else float("inf")
        log.info("vault: AppRole login ok (token ttl %ss)", int(self._ttl))

    def _ensure_token(self) -> None:
        now = time.monotonic()
        if not self._client.token or now >= self._expires:
            self.login()
            return
        if self._ttl and self._expires - now < self._ttl / 2:
            try:
                resp = self._client.auth.token.renew_self()
                ttl = float(resp["auth"].get("lease_duration") or 0)
                self._expires = now + ttl if ttl else float("inf")
                log.debug("vault: token renewed (ttl %ss)", int(ttl))
            except (hvac.exceptions.VaultError, *_NETWORK) as exc:
                log.info("vault: token renewal failed (%s); logging in again", type(exc).__name__)
                self.login()

    # -- reads -------------------------------------------------------------------------

    def read(self, path: str, repository: str = "") -> dict[str, str]:
        """Read a KV v2 secret's data; re-login once on 403."""
        for attempt in (1, 2):
            self._ensure_token()
            try:
                resp = self._client.secrets.kv.v2.read_secret_version(
                    path=path, mount_point=self.cfg.mount, raise_on_deleted_version=True,
                )
                return resp["data"]["data"]
            except hvac.exceptions.InvalidPath:
                raise Permanent(f"no keys in Vault at {self.cfg.mount}/{path}",
                                repository) from None
            except hvac.exceptions.Forbidden:
                if attempt == 1:
                    log.info("vault: 403 reading %s; token may have expired, logging in again",
                             path)
                    self._client.token = None
                    continue
                raise Permanent(f"Vault denies read of {self.cfg.mount}/{path} (403): "
                                "check the AppRole policy", repository) from None
            except _NETWORK as exc:
                raise Transient(f"Vault unreachable at {self.cfg.url}: {type(exc).__name__}",
                                repository) from None
            except _SERVER as exc:
                raise Transient(f"Vault error reading keys: {type(exc).__name__}",
                                repository) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def read_keys(self, path: str, repository: str) -> RepositoryKeys:
        """Read the repository's keys and check the three needed fields are there."""
        data = self.read(path, repository)
        missing = [f for f in KEY_FIELDS if not isinstance(data.get(f), str) or not data.get(f)]
        if missing:
            raise Permanent(f"Vault secret {self.cfg.mount}/{path} lacks {', '.join(missing)}",
                            repository)
        return RepositoryKeys(pub=data["publicKey"], crt=data["certificateKey"],
                              gw=data["gatewayKey"])

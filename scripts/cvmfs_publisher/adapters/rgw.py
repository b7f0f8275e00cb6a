"""Ceph RGW through boto3: S3 objects, SNS topics and bucket notifications.

RGW quirks respected here (measured, ``shared/ceph/README.md``):
- botocore's new checksum defaults confuse older RGW: ``when_required``;
- credentials in ``push-endpoint`` are refused over plain HTTP unless RGW
  trusts ``X-Forwarded-Proto: https`` (``rgw.forwarded_https``); RGW then
  also refuses to *list or read* such topics without the header (HTTP 403),
  so the header goes on every SNS call, not only on CreateTopic;
- ``PutBucketNotificationConfiguration`` *merges* by Id, so we always use
  one fixed Id, and removal is RGW's own ``DELETE /<bucket>?notification=<id>``;
- the topic ARN is taken from CreateTopic's answer, never built by hand;
- SNS errors come back as S3-style XML (``Unknown``): we log the status code.
"""

from __future__ import annotations

import datetime
import email.utils
import functools
import logging
import random
import re
import time
import urllib.parse
from typing import Any
from xml.etree import ElementTree

import boto3
import botocore.exceptions
import botocore.loaders
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config as BotoConfig
from botocore.response import StreamingBody

from ..core.config import RgwConfig, S3Config
from ..core.errors import Permanent, Transient

log = logging.getLogger(__name__)

NOTIFICATION_EVENTS = ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]

_NETWORK = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectTimeoutError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectionClosedError,
    botocore.exceptions.ProxyConnectionError,
)


def classify(exc: Exception, what: str, repository: str = "") -> Exception:
    """Map a boto3 exception to Transient / Permanent with a safe message."""
    if isinstance(exc, _NETWORK):
        return Transient(f"RGW unreachable during {what}: {type(exc).__name__}", repository)
    if isinstance(exc, botocore.exceptions.ClientError):
        meta = exc.response.get("ResponseMetadata", {})
        status = int(meta.get("HTTPStatusCode", 0) or 0)
        code = exc.response.get("Error", {}).get("Code", "Unknown")
        if status >= 500 or status in (0, 408, 429) or code in ("SlowDown", "RequestTimeout"):
            return Transient(f"RGW error during {what}: HTTP {status} {code}", repository)
        return Permanent(f"RGW refused {what}: HTTP {status} {code}", repository)
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return Transient(f"RGW client error during {what}: {type(exc).__name__}", repository)
    return exc


#: What boto3's standard retry mode retries, of what a GET meets: the connection
#: failed or broke (a pooled keep-alive connection the server closed, too), the
#: server failed or asked to slow down. The attempts are ``s3.max_attempts``.
_RETRY_NETWORK = (*_NETWORK, botocore.exceptions.HTTPClientError)
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
_RETRY_CODES = frozenset({"SlowDown", "RequestTimeout", "Throttling", "ThrottlingException",
                          "RequestThrottled", "PriorRequestNotComplete"})
_META = "x-amz-meta-"


def _retry_pause(attempt: int) -> None:
    """The standard retry mode's back-off: random up to 2**attempt seconds, at most 20."""
    time.sleep(min(20.0, random.random() * 2 ** attempt))


def _get_answer(resp: Any) -> dict[str, Any]:
    """A 2xx answer to GetObject as boto3 parses the fields the consumers read."""
    h = resp.headers
    length = h.get("Content-Length")
    modified = None
    if h.get("Last-Modified"):
        try:
            modified = email.utils.parsedate_to_datetime(h["Last-Modified"])
        except (TypeError, ValueError, IndexError):
            modified = None
    return {
        "Body": StreamingBody(resp.raw, length),  # checks the length at the end, as boto3
        "ETag": h.get("ETag", ""),
        "LastModified": modified,
        "ContentLength": int(length) if length and length.isdigit() else 0,
        # botocore's header map: the name after the prefix, as sent
        "Metadata": {k[len(_META):]: v for k, v in h.items() if k.lower().startswith(_META)},
    }


def _list_answer(document: bytes, bucket: str) -> dict[str, Any]:
    """A ListObjectsV2 answer (``encoding-type=url``) as boto3's parser returns it."""
    try:
        # what botocore parses S3's answers with; expat (>= 2.4.1) bounds entity
        # expansion and ElementTree resolves no external entity
        root = ElementTree.fromstring(document)  # noqa: S314
    except ElementTree.ParseError as exc:
        raise Transient(f"RGW answered ListObjectsV2 {bucket} with a document that is not "
                        f"XML ({exc}); listed again later") from None
    ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    url = root.findtext(f"{ns}EncodingType") == "url"
    contents = []
    try:
        for el in root.iterfind(f"{ns}Contents"):
            key = el.findtext(f"{ns}Key") or ""
            modified = el.findtext(f"{ns}LastModified")
            contents.append({
                "Key": urllib.parse.unquote_plus(key) if url else key,
                "Size": int(el.findtext(f"{ns}Size") or 0),
                "ETag": el.findtext(f"{ns}ETag") or "",
                "LastModified": datetime.datetime.fromisoformat(modified)
                if modified else None,
            })
    except ValueError as exc:
        raise Transient(f"RGW answered ListObjectsV2 {bucket} with an unreadable entry "
                        f"({exc}); listed again later") from None
    page: dict[str, Any] = {"Contents": contents,
                            "IsTruncated": root.findtext(f"{ns}IsTruncated") == "true"}
    token = root.findtext(f"{ns}NextContinuationToken")
    if token:
        page["NextContinuationToken"] = token
    elif page["IsTruncated"]:
        raise Transient(f"RGW answered ListObjectsV2 {bucket} with a truncated page and no "
                        "continuation token; listed again later")
    return page


def _client_error(resp: Any, operation: str) -> botocore.exceptions.ClientError:
    """A non-2xx answer as boto3 raises it: the S3 error code from the XML body."""
    code, message = str(resp.status_code), ""
    try:
        body = resp.raw.read(64 << 10)
        # the two fields of S3's short error document, not an XML parser on it
        found = re.search(rb"<Code>([A-Za-z0-9.]{1,64})</Code>", body)
        code = found[1].decode() if found else code
        found = re.search(rb"<Message>([^<]{0,512})</Message>", body)
        message = found[1].decode(errors="replace") if found else ""
    except Exception:  # the connection broke: the status says enough
        log.debug("S3 %s: HTTP %d without a readable error document", operation,
                  resp.status_code)
    finally:
        resp.raw.release_conn()
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": message},
         "ResponseMetadata": {"HTTPStatusCode": resp.status_code}}, operation)


def object_missing(exc: Exception) -> bool:
    """The *object* does not exist: 404 / ``NoSuchKey``, never ``NoSuchBucket``.

    A missing bucket is not a deletion of every key: it is a repository that
    is not provisioned (DESIGN §4), which :func:`classify` makes Permanent.
    """
    if not isinstance(exc, botocore.exceptions.ClientError):
        return False
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code != "NoSuchBucket" and (code in ("NoSuchKey", "404", "NotFound") or status == 404)


_LOADER: botocore.loaders.Loader | None = None


def shared_loader() -> botocore.loaders.Loader:
    """One botocore data loader per process, shared by every RGW client.

    The loader caches the parsed service models and endpoint data (several
    MiB of Python objects for S3): loaded once per process, not once per
    session, and, loaded in the consumers' fork server before it forks,
    shared by every download process (:mod:`cvmfs_publisher.pipeline.download_preload`).
    """
    global _LOADER
    if _LOADER is None:
        _LOADER = botocore.loaders.create_loader()
    return _LOADER


def load_s3_models() -> None:
    """Load S3's models into :func:`shared_loader` now: an RGW made and dropped (its S3
    client is built as every RGW's is; it never sends a request)."""
    RGW(S3Config(endpoint_url="http://127.0.0.1:1"))


class RGW:
    """S3 and SNS clients on one RGW endpoint."""

    def __init__(self, s3cfg: S3Config, rgwcfg: RgwConfig | None = None,
                 max_pool_connections: int = 10) -> None:
        if not s3cfg.endpoint_url:
            raise Permanent("s3.endpoint_url is not configured")
        self.s3cfg = s3cfg
        self.rgwcfg = rgwcfg or RgwConfig()
        verify: bool | str = s3cfg.ca_file or True
        if not s3cfg.verify:
            log.warning("S3 TLS certificate verification is DISABLED by configuration (s3.verify)")
            verify = False
        boto_cfg = BotoConfig(
            s3={"addressing_style": "path" if s3cfg.path_style else "auto"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            connect_timeout=s3cfg.connect_timeout,
            read_timeout=s3cfg.read_timeout,
            retries={"max_attempts": s3cfg.max_attempts, "mode": "standard"},
            max_pool_connections=max_pool_connections,
        )
        self._session = boto3.session.Session(
            aws_access_key_id=s3cfg.access_key.get() if s3cfg.access_key else None,
            aws_secret_access_key=s3cfg.secret_key.get() if s3cfg.secret_key else None,
            region_name=s3cfg.region,
        )
        self._session._session.register_component("data_loader", shared_loader())
        kw: dict[str, Any] = {"endpoint_url": s3cfg.endpoint_url, "verify": verify,
                              "config": boto_cfg}
        self._kw = kw
        self.s3 = self._session.client("s3", **kw)
        self._base = s3cfg.endpoint_url.rstrip("/")

    @functools.cached_property
    def sns(self) -> Any:
        """The SNS client, made at its first use (only provisioning needs topics;
        a consumers' download process builds its client in ~0.1 s less)."""
        sns = self._session.client("sns", **self._kw)
        if self.rgwcfg.forwarded_https:
            sns.meta.events.register("before-sign.sns", _forwarded_https)
        return sns

    # -- topics ------------------------------------------------------------------------

    def push_endpoint(self) -> str:
        """The AMQP URL RGW pushes to, with credentials when configured."""
        url = self.rgwcfg.push_endpoint
        if not self.rgwcfg.push_user:
            return url
        parts = urllib.parse.urlsplit(url)
        password = self.rgwcfg.push_password.get() if self.rgwcfg.push_password else ""
        cred = urllib.parse.quote(self.rgwcfg.push_user, safe="")
        if password:
            cred += ":" + urllib.parse.quote(password, safe="")
        return urllib.parse.urlunsplit(parts._replace(netloc=f"{cred}@{parts.hostname}"
                                                      + (f":{parts.port}" if parts.port else "")))

    def topic_attributes(self, exchange: str) -> dict[str, str]:
        attributes = {
            "push-endpoint": self.push_endpoint(),
            "amqp-exchange": exchange,
            "amqp-ack-level": self.rgwcfg.amqp_ack_level,
            "persistent": "true" if self.rgwcfg.persistent else "false",
            "verify-ssl": "true" if self.rgwcfg.verify_ssl else "false",
        }
        if self.rgwcfg.ca_location:  # an amqps broker with a private CA
            attributes["ca-location"] = self.rgwcfg.ca_location
        return attributes

    def create_topic(self, name: str, exchange: str, repository: str = "") -> str:
        """Create (or update: CreateTopic is idempotent on RGW) and return the ARN."""
        try:
            resp = self.sns.create_topic(Name=name, Attributes=self.topic_attributes(exchange))
        except Exception as exc:
            err = classify(exc, f"CreateTopic {name}", repository)
            if isinstance(err, Permanent) and self._credentials_over_http():
                raise Permanent(f"{err.args[0]}: {self._insecure_transport_hint()}",
                                repository) from None
            raise err from None
        arn = resp.get("TopicArn")
        if not arn:
            raise Transient(f"RGW CreateTopic {name} answered without a TopicArn", repository)
        return arn

    def _credentials_over_http(self) -> bool:
        """Push credentials sent to an RGW reached over plain HTTP (RGW refuses them)."""
        return bool(self.rgwcfg.push_user) and \
            urllib.parse.urlsplit(self.s3cfg.endpoint_url).scheme == "http"

    def _insecure_transport_hint(self) -> str:
        if self.rgwcfg.forwarded_https:
            return ("RGW refuses credentials in push-endpoint over plain HTTP and does not "
                    "trust X-Forwarded-Proto: set 'rgw trust forwarded https = true' in RGW's "
                    "ceph.conf (only behind a TLS-terminating proxy), or use an https "
                    "s3.endpoint_url")
        return ("RGW refuses credentials in push-endpoint over plain HTTP: use an https "
                "s3.endpoint_url, or, behind a TLS-terminating proxy, set "
                "rgw.forwarded_https: true (with 'rgw trust forwarded https = true' on RGW), "
                "or leave rgw.push_user empty")

    def find_topic(self, name: str) -> str | None:
        """ARN of the topic called ``name``, if any (paginated ListTopics)."""
        token = None
        while True:
            try:
                resp = self.sns.list_topics(**({"NextToken": token} if token else {}))
            except Exception as exc:
                raise classify(exc, "ListTopics") from None
            for t in resp.get("Topics", []):
                arn = t.get("TopicArn", "")
                if arn.rsplit(":", 1)[-1] == name:
                    return arn
            token = resp.get("NextToken")
            if not token:
                return None

    def get_topic_attributes(self, arn: str) -> dict[str, str]:
        try:
            return self.sns.get_topic_attributes(TopicArn=arn)["Attributes"]
        except Exception as exc:
            raise classify(exc, "GetTopicAttributes") from None

    def delete_topic(self, name: str, repository: str = "") -> bool:
        """Delete the topic if it exists; True when something was deleted."""
        arn = self.find_topic(name)
        if not arn:
            return False
        try:
            self.sns.delete_topic(TopicArn=arn)
        except Exception as exc:
            raise classify(exc, f"DeleteTopic {name}", repository) from None
        return True

    # -- objects --------------------------------------------------------------------------

    def put_object(self, bucket: str, key: str, body: bytes, content_type: str,
                   repository: str = "") -> None:
        """PUT one small object (the receipt); Transient / Permanent on failure."""
        try:
            self.s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type,
                               CacheControl="no-cache")
        except Exception as exc:
            raise classify(exc, f"PutObject {bucket}/{key}", repository) from None

    def head_object(self, bucket: str, key: str, repository: str = "") -> dict[str, Any] | None:
        """``{"etag", "size", "modified"}`` of an object, None when it does not exist."""
        try:
            resp = self.s3.head_object(Bucket=bucket, Key=key)
        except Exception as exc:
            if object_missing(exc):
                return None
            raise classify(exc, f"HeadObject {bucket}/{key}", repository) from None
        return {"etag": str(resp.get("ETag", "")).strip('"'),
                "size": int(resp.get("ContentLength", 0)),
                "modified": resp["LastModified"].timestamp() if resp.get("LastModified") else 0.0}

    # -- buckets and notifications ----------------------------------------------------------

    def bucket_exists(self, bucket: str, repository: str = "") -> bool:
        try:
            self.s3.head_bucket(Bucket=bucket)
            return True
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
                return False
            raise classify(exc, f"HeadBucket {bucket}", repository) from None
        except Exception as exc:
            raise classify(exc, f"HeadBucket {bucket}", repository) from None

    def ensure_bucket(self, bucket: str, repository: str = "") -> None:
        """The bucket must exist; created only when ``rgw.create_buckets`` says so."""
        if self.bucket_exists(bucket, repository):
            return
        if not self.rgwcfg.create_buckets:
            raise Permanent(f"bucket {bucket} does not exist: create it (or set "
                            "rgw.create_buckets) and replay the message", repository)
        try:
            self.s3.create_bucket(Bucket=bucket)
        except Exception as exc:
            raise classify(exc, f"CreateBucket {bucket}", repository) from None
        log.info("repository=%s bucket=%s outcome=bucket-created", repository, bucket)

    def get_notifications(self, bucket: str) -> list[dict[str, Any]]:
        try:
            resp = self.s3.get_bucket_notification_configuration(Bucket=bucket)
        except Exception as exc:
            raise classify(exc, f"GetBucketNotificationConfiguration {bucket}") from None
        return resp.get("TopicConfigurations", [])

    def put_notification(self, bucket: str, topic_arn: str, prefix: str,
                         repository: str = "") -> None:
        """One notification (fixed Id, so RGW's merge-by-Id makes this idempotent)."""
        conf = {"TopicConfigurations": [{
            "Id": self.rgwcfg.notification_id,
            "TopicArn": topic_arn,
            "Events": NOTIFICATION_EVENTS,
            "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": prefix}]}},
        }]}
        try:
            self.s3.put_bucket_notification_configuration(Bucket=bucket,
                                                          NotificationConfiguration=conf)
        except Exception as exc:
            raise classify(exc, f"PutBucketNotificationConfiguration {bucket}",
                           repository) from None

    # -- requests signed by hand --------------------------------------------------------

    @functools.cached_property
    def _credentials(self) -> Any:
        """The session's credentials, frozen (static keys: read once); None without."""
        creds = self._session.get_credentials()
        return creds.get_frozen_credentials() if creds is not None else None

    def _send(self, method: str, url: str, stream: bool = False) -> Any:
        """``method url`` signed with botocore's SigV4 signer and sent on the S3
        client's own HTTP session (its TLS verification, CA, proxies, timeouts and
        connection pool); botocore's exceptions when the connection fails."""
        req = AWSRequest(method=method, url=url)
        S3SigV4Auth(self._credentials, "s3", self.s3cfg.region).add_auth(req)
        req.stream_output = stream
        return self.s3._endpoint.http_session.send(req.prepare())

    def _request(self, url: str, operation: str) -> Any:
        """A signed GET with the standard retry mode's retries; its 2xx answer, streamed.

        Non-2xx: a ``ClientError`` with the S3 error code and HTTP status, as
        boto3 raises it; connection failures: botocore's exceptions.
        """
        attempts = max(1, self.s3cfg.max_attempts)
        for attempt in range(attempts):
            last = attempt + 1 >= attempts
            try:
                resp = self._send("GET", url, stream=True)
            except _RETRY_NETWORK:
                if last:
                    raise
                _retry_pause(attempt)
                continue
            if resp.status_code < 300:
                return resp
            error = _client_error(resp, operation)
            if last or not (resp.status_code in _RETRY_STATUS
                            or error.response["Error"]["Code"] in _RETRY_CODES):
                raise error
            _retry_pause(attempt)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _lean(self) -> bool:
        """Can a request be signed by hand? Path-style addressing with credentials;
        virtual-hosted addressing and anonymous access keep boto3's calls."""
        return self.s3cfg.path_style and self._credentials is not None

    def get_object(self, bucket: str, key: str) -> dict[str, Any]:
        """GET ``bucket/key`` for the consumers: boto3's answer, for half its CPU.

        The same as ``self.s3.get_object(Bucket=bucket, Key=key)`` for what the
        consumers read: ``Body`` (a stream that checks its length), ``ETag``,
        ``LastModified``, ``ContentLength``, ``Metadata``; a ``ClientError``
        with the S3 error code and HTTP status; botocore's connection errors;
        the standard retry mode's retries and back-off. Why: boto3's request
        pipeline (parameter validation, endpoint rules, event hooks, response
        parsing) costs 1.1 ms of CPU per 1 KiB GET on this project's machines,
        this path 0.57 ms, and the consumers' downloads are CPU-bound (issue
        14, B1; ``bench/bench_consumers.py``).
        """
        if not self._lean():
            return self.s3.get_object(Bucket=bucket, Key=key)
        # botocore's rest-xml serialisation of {Bucket} and {Key+}
        url = f"{self._base}/{urllib.parse.quote(bucket, safe='~')}/" \
              f"{urllib.parse.quote(key.encode(), safe='/~')}"
        return _get_answer(self._request(url, "GetObject"))

    def list_page(self, bucket: str, prefix: str, token: str | None = None,
                  max_keys: int = 1000) -> dict[str, Any]:
        """One ListObjectsV2 page as boto3's paginator yields it, for a fraction of its CPU.

        What the anti-entropy reads: ``Contents`` (``Key``, ``Size``, ``ETag``,
        ``LastModified`` as an aware datetime), ``IsTruncated``,
        ``NextContinuationToken``. Keys travel URL-encoded
        (``encoding-type=url``, as boto3 asks: a key may hold characters XML
        cannot carry) and are decoded here as botocore does. Why: every
        repository is reconciled every ``consumers.reconcile_interval``, and
        at 1,000 repositories boto3's listing of an empty bucket was most of
        the consumers' idle CPU (bench/bench_scale.py). An answer that does not
        parse, or a truncated page without a token, is :class:`Transient`: a
        partial listing must never reach the diff, where a missing key reads
        as a deletion.
        """
        if not self._lean():
            return boto3_list_page(self.s3, bucket, prefix, token, max_keys)
        params = {"encoding-type": "url", "list-type": "2", "max-keys": str(max_keys),
                  "prefix": prefix}
        if token:
            params["continuation-token"] = token
        # the canonical query of SigV4: sorted, every value quoted but -_.~
        query = "&".join(f"{k}={urllib.parse.quote(v, safe='-_.~')}"
                         for k, v in sorted(params.items()))
        url = f"{self._base}/{urllib.parse.quote(bucket, safe='~')}?{query}"
        return _list_answer(self._request(url, "ListObjectsV2").content, bucket)

    def delete_notification(self, bucket: str, repository: str = "") -> None:
        """RGW's ``DELETE /<bucket>?notification=<id>``, SigV4-signed by hand."""
        url = f"{self._base}/{urllib.parse.quote(bucket)}" \
              f"?notification={urllib.parse.quote(self.rgwcfg.notification_id)}"
        try:
            resp = self._send("DELETE", url)
        except Exception as exc:
            raise classify(exc, f"DeleteBucketNotification {bucket}", repository) from None
        if resp.status_code == 404:
            return
        if resp.status_code >= 500:
            raise Transient(f"RGW error deleting notification of {bucket}: "
                            f"HTTP {resp.status_code}", repository)
        if resp.status_code >= 300:
            raise Permanent(f"RGW refused deleting notification of {bucket}: "
                            f"HTTP {resp.status_code}", repository)


def boto3_list_page(s3: Any, bucket: str, prefix: str, token: str | None = None,
                    max_keys: int = 1000) -> dict[str, Any]:
    """One ListObjectsV2 page through a boto3 client: :meth:`RGW.list_page`'s shape,
    for a client the lean listing cannot serve (or a caller handed a plain client)."""
    kw: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": max_keys}
    if token:
        kw["ContinuationToken"] = token
    return s3.list_objects_v2(**kw)


def _forwarded_https(request: AWSRequest, **_: Any) -> None:
    """RGW accepts credentials in push-endpoint only over (forwarded) HTTPS."""
    request.headers["X-Forwarded-Proto"] = "https"

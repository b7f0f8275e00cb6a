"""Repository announcements on the control exchange: ``created`` / ``deleted``.

publisher-consumer sends one after provisioning or deprovisioning a
repository; the consumers' event source reacts at once instead of waiting
for its next listing. The format is shared by both, so it lives in the core.
"""

from __future__ import annotations

import json


class BadAnnouncement(ValueError):
    """A control message that is not an announcement (ignored, with a log line)."""


def announcement(event: str, repository: str, label: str, queue: str) -> bytes:
    """Body of a control-exchange announcement (``created`` / ``deleted``)."""
    return json.dumps(
        {"event": event, "repository": repository, "label": label, "queue": queue},
        sort_keys=True,
    ).encode()


def parse_announcement(body: bytes) -> dict[str, str]:
    """Parse a control announcement; raises :class:`BadAnnouncement`."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadAnnouncement("control message is not JSON") from None
    if (
        not isinstance(doc, dict)
        or doc.get("event") not in ("created", "deleted")
        or not all(isinstance(doc.get(k), str) and doc.get(k) for k in ("repository", "queue"))
    ):
        raise BadAnnouncement("control message lacks event/repository/queue")
    return doc

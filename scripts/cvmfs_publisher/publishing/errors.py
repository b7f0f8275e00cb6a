"""The sync daemon's one failure type: a step that failed, with the tool's words."""

from __future__ import annotations

from ..adapters.cvmfs import CvmfsError, tool_message
from ..core.errors import PublisherError
from ..core.logs import redact


class PublishError(PublisherError):
    """A step that failed: the batch stays in staging and is retried with backoff.

    ``rc`` is the tool's exit code, or the errno of a failed file operation.
    ``needs_operator``: True when retrying cannot help until someone acts (the
    detail says what to do); the daemon then retries rarely.
    """

    def __init__(self, repository: str, step: str, rc: int, message: str,
                 needs_operator: bool = False) -> None:
        self.step, self.rc, self.detail = step, rc, redact(message)
        self.needs_operator = needs_operator
        super().__init__(f"step={step} rc={rc} error={self.detail}", repository)

    @classmethod
    def from_cvmfs(cls, exc: CvmfsError) -> PublishError:
        detail = tool_message(exc)
        return cls(exc.repository, exc.step, exc.rc, detail)

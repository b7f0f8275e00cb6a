"""Repository names, labels and the Vault paths derived from them (DESIGN §2)."""

from __future__ import annotations

import re

_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_SUBJECT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9@._+-]{0,254}$")
MAX_NAME = 60


class InvalidName(ValueError):
    """A repository name, label or subject that must not be used."""


def validate_repository(name: str, domain: str) -> str:
    """Return ``name`` if it is a valid repository of ``domain``, else raise.

    Lower-case letters, digits, ``-`` and ``.``; DNS labels of 1-63
    characters; at most 60 characters; ends with ``.<domain>`` and has a
    label before it.
    """
    if not isinstance(name, str) or not name:
        raise InvalidName("repository name is empty")
    if len(name) > MAX_NAME:
        raise InvalidName(f"repository name is longer than {MAX_NAME} characters")
    labels = name.split(".")
    for label in labels:
        if not _LABEL.match(label):
            raise InvalidName(f"repository name {name!r}: invalid DNS label {label!r}")
    if not name.endswith("." + domain) or len(labels) <= len(domain.split(".")):
        raise InvalidName(f"repository name {name!r} is not under domain {domain!r}")
    return name


def label_of(repository: str) -> str:
    """First DNS label: bucket, topic, queue and routing key."""
    return repository.split(".", 1)[0]


def repository_of(label: str, domain: str) -> str:
    """Inverse of :func:`label_of` for the default naming."""
    return f"{label}.{domain}"


def validate_subject(subject: str) -> str:
    """An IAM subject becomes a Vault path component: no ``/``, no ``..``."""
    if not isinstance(subject, str) or not _SUBJECT.match(subject) or ".." in subject:
        raise InvalidName(f"subject {subject!r} is not a safe Vault path component")
    return subject


def vault_path(repository: str, kind: str, subject: str) -> str:
    """KV v2 path of the repository's keys (relative to the mount).

    personal: ``<subject>/cvmfs_keys/<repository>``;
    group: ``groups/<label>/cvmfs_keys/<repository>``.
    """
    if kind == "personal":
        return f"{validate_subject(subject)}/cvmfs_keys/{repository}"
    if kind == "group":
        return f"groups/{label_of(repository)}/cvmfs_keys/{repository}"
    raise InvalidName(f"unknown repository type {kind!r}")

"""The phase planner: a staged batch cut into transactions and ingests.

``cvmfs_server ingest`` opens and publishes its own transaction and must run
outside ours, so a batch that mixes files and tarballs needs several
publishes: :func:`plan` finds the fewest that keep the staging order of
changes to overlapping paths (the same path, or one inside the other).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

from ..staging.area import Entry, ancestors


@dataclass
class Phase:
    """One ``transaction``+``publish`` (``kind="txn"``) or one tarball (``"ingest"``).

    ``parents``: directories a later ingest needs (in gateway mode the parent
    of ``--base_dir`` must exist); created at the end of the phase.
    """

    kind: str
    entries: list[Entry] = field(default_factory=list)
    parents: list[str] = field(default_factory=list)


def plan(entries: list[Entry], is_dir: Callable[[str], bool]) -> list[Phase]:
    """Cut a batch into phases; staging order is kept between overlapping paths.

    Why: ``ingest`` cannot run inside a transaction, so a batch that mixes
    files and tarballs needs several publishes; the fewest that respect the
    order of changes to the same paths. Two paths overlap when one is equal
    to or inside the other (a deletion of ``a`` and a file ``a/b`` must stay
    in order). Inside a transaction phase entries are applied in staging
    order, so overlapping file changes may share a phase; an entry that
    follows an ingest of an overlapping path goes to a phase after it.

    ``is_dir(path)``: is ``path`` a real directory of the published tree now
    (decides whether an ingest-only batch needs a transaction to create the
    parent of its ingest directory). Runs in O(entries x depth).
    """
    phases: list[Phase] = []
    txn_idx: list[int] = []  # indices of transaction phases, ascending
    at: dict[str, int] = {}  # path -> lowest phase allowed for a later overlapping entry
    below: dict[str, int] = {}  # dir -> same, for entries strictly under it
    below_txn: dict[str, int] = {}  # dir -> same, file changes only (may prune the dir)

    def constraint(path: str) -> int:
        lo = at.get(path, 0)
        for a in ancestors(path):
            lo = max(lo, at.get(a, 0))
        return max(lo, below.get(path, 0))

    def parent_constraint(path: str) -> tuple[int, bool]:
        """For creating ``path``: what could remove it (itself, an ancestor, a
        deletion below it that prunes it) must come first."""
        hits = [at[a] for a in (*ancestors(path), path) if a in at]
        if path in below_txn:
            hits.append(below_txn[path])
        return max(hits, default=0), bool(hits)

    def record(path: str, value: int, txn: bool) -> None:
        at[path] = max(at.get(path, 0), value)
        for a in ancestors(path):
            below[a] = max(below.get(a, 0), value)
            if txn:
                below_txn[a] = max(below_txn.get(a, 0), value)

    def txn_at_or_after(lo: int) -> int | None:
        i = bisect.bisect_left(txn_idx, lo)
        return txn_idx[i] if i < len(txn_idx) else None

    def new_txn() -> int:
        phases.append(Phase("txn"))
        txn_idx.append(len(phases) - 1)
        return len(phases) - 1

    for e in sorted(entries, key=lambda x: x.seq):
        if e.is_ingest:
            parent = e.path.rpartition("/")[0]
            if parent and e.op == "ingest":
                lo, conflict = parent_constraint(parent)
                k = txn_at_or_after(lo)
                if k is None and (conflict or not is_dir(parent)):
                    k = new_txn()
                if k is not None and parent not in phases[k].parents:
                    phases[k].parents.append(parent)
            phases.append(Phase("ingest", [e]))
            # Whatever overlaps an ingest and comes later goes after it.
            record(e.path, len(phases), txn=False)
        else:
            lo = constraint(e.path)
            k = txn_at_or_after(lo)
            if k is None:
                k = new_txn()
            phases[k].entries.append(e)
            record(e.path, k, txn=True)
    return phases

"""Requirement snapshots: sandboxes that start with their packages already installed.

After the first sandbox of an image installs a requirement set, its
filesystem is snapshotted (``Sandbox.snapshot_filesystem``, an image) and the
image id is remembered in a ``modal.Dict`` (``<app>-requirement-snapshots``),
keyed by a hash of the base image's id and the sorted requirement set. Every
process and replica reading that Dict starts the next sandbox for the same
set from the snapshot and installs nothing.

The policy (:class:`SnapshotPolicy`): entries older than ``max_age`` are not
used (and dropped); beyond ``max_entries`` the oldest are dropped; Modal keeps
each snapshot image for ``ttl`` seconds, also after its entry is dropped (so
``ttl``, not the entries, bounds what is stored; ``ttl=None`` keeps images
until deleted in Modal). Modal's client reports no image size. A snapshot
Modal no longer has (expired, deleted) makes the sandbox start from the base
image and install, and the entry is dropped.

Every Modal call is a ``.aio`` one; errors translate as the backend's do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import modal

__all__ = ["SnapshotEntry", "SnapshotPolicy", "SnapshotStore", "snapshot_dict_name", "snapshot_key"]

logger = logging.getLogger("async_modal_exec.startup")


@dataclass(frozen=True)
class SnapshotPolicy:
    """How requirement snapshots are kept.

    Attributes:
        max_age: seconds an entry is used after it was made (older: dropped, reinstalled).
        max_entries: entries kept per Dict; the oldest go first.
        ttl: seconds Modal keeps each snapshot image (None: until deleted).
        dict_name: the ``modal.Dict`` holding the entries (None: ``<app>-requirement-snapshots``).
    """

    max_age: float = 7 * 24 * 3600
    max_entries: int = 50
    ttl: int | None = 30 * 24 * 3600
    dict_name: str | None = None

    def __post_init__(self) -> None:
        if self.max_age <= 0 or self.max_entries <= 0:
            raise ValueError("max_age and max_entries must be positive")
        if self.ttl is not None and self.ttl <= 0:
            raise ValueError("ttl must be positive or None")


@dataclass(frozen=True)
class SnapshotEntry:
    """One remembered snapshot (stored as JSON in the Dict)."""

    key: str
    image_id: str
    base_image_id: str
    requirements: tuple[str, ...]
    created: float

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.created

    def to_json(self) -> str:
        return json.dumps(
            {
                "image_id": self.image_id,
                "base_image_id": self.base_image_id,
                "requirements": list(self.requirements),
                "created": self.created,
            }
        )

    @classmethod
    def from_json(cls, key: str, text: Any) -> SnapshotEntry | None:
        """The entry stored under ``key``, or None if the value is not one of ours."""
        try:
            fields = json.loads(text)
            return cls(
                key=key,
                image_id=str(fields["image_id"]),
                base_image_id=str(fields["base_image_id"]),
                requirements=tuple(str(spec) for spec in fields["requirements"]),
                created=float(fields["created"]),
            )
        except (TypeError, ValueError, KeyError):
            return None


def snapshot_key(base_image_id: str, requirements: Sequence[str]) -> str:
    """The Dict key of a requirement set on a base image: equal for equal sets, in any order."""
    canonical = json.dumps(
        {"image": base_image_id, "requirements": sorted({r.strip() for r in requirements})}
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def snapshot_dict_name(app_name: str, policy: SnapshotPolicy | None = None) -> str:
    if policy is not None and policy.dict_name:
        return policy.dict_name
    return f"{app_name}-requirement-snapshots"


class SnapshotStore:
    """The Dict of one app's requirement snapshots."""

    def __init__(self, app_name: str, policy: SnapshotPolicy, *, create: bool = True) -> None:
        self.policy = policy
        self.name = snapshot_dict_name(app_name, policy)
        self._dict = modal.Dict.from_name(self.name, create_if_missing=create)

    async def lookup(self, key: str) -> SnapshotEntry | None:
        """The usable entry for ``key``; one past ``max_age`` is dropped and None returned."""
        entry = SnapshotEntry.from_json(key, await self._dict.get.aio(key))
        if entry is not None and entry.age() > self.policy.max_age:
            logger.info("requirement snapshot %s is %.0f s old: dropped", entry.image_id, entry.age())
            await self.drop(key)
            return None
        return entry

    async def remember(self, entry: SnapshotEntry) -> bool:
        """Store ``entry`` unless another process stored one first; keep at most ``max_entries``."""
        created = bool(await self._dict.put.aio(entry.key, entry.to_json(), skip_if_exists=True))
        entries = await self.entries()
        for old in sorted(entries, key=lambda e: e.created)[: max(len(entries) - self.policy.max_entries, 0)]:
            await self.drop(old.key)
        return created

    async def drop(self, key: str) -> None:
        await self._dict.pop.aio(key, None)

    async def entries(self) -> list[SnapshotEntry]:
        """Every entry, oldest first (none if the Dict does not exist)."""
        found = []
        try:
            items = [item async for item in self._dict.items.aio()]
        except modal.exception.NotFoundError:
            return []
        for key, value in items:
            entry = SnapshotEntry.from_json(str(key), value)
            if entry is not None:
                found.append(entry)
        return sorted(found, key=lambda e: e.created)

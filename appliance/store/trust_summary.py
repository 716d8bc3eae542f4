"""What an operator reads about a trust root: ``appliance trust show`` and the TUI's Trust screen.

``describe`` summarises one root (a file's, or the store's root in force): version,
fingerprint and its words, dates, whether it is expired by the host's clock, each role's
threshold and keys, each key with its readable fingerprint and model patterns.
``store_summary`` adds what the store holds: every installed version and each channel's
high-water mark. Both shells lay the same ``TrustSummary`` out; ``to_json`` is the CLI's
``--json`` form.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from appliance.format.fields import format_timestamp
from appliance.format.signing import fingerprint_words
from appliance.format.trust import ROLES, TrustRoot
from appliance.store import trust_state


@dataclass(frozen=True)
class KeySummary:
    key_id: str
    name: str
    roles: tuple[str, ...]
    words: str
    models: tuple[str, ...]  # publisher model patterns; empty for a root-only key

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"key_id": self.key_id, "name": self.name,
                                 "roles": list(self.roles), "words": self.words}
        if self.models:
            entry["models"] = list(self.models)
        return entry


@dataclass(frozen=True)
class RoleSummary:
    name: str
    threshold: int
    key_ids: tuple[str, ...]


@dataclass(frozen=True)
class InstalledVersion:
    version: int
    fingerprint: str
    installed_at: str


@dataclass(frozen=True)
class ChannelMark:
    channel: str
    sequence: int
    manifest: str
    updated_at: str


@dataclass(frozen=True)
class TrustSummary:
    version: int
    fingerprint: str
    words: str | None  # fingerprint words of the signed body (None without it)
    created: str
    expires: str
    expired: bool
    roles: tuple[RoleSummary, ...]
    keys: tuple[KeySummary, ...]
    installed: tuple[InstalledVersion, ...] = ()
    channels: tuple[ChannelMark, ...] = ()

    @property
    def thresholds(self) -> tuple[tuple[str, int, int], ...]:
        """(role, threshold, key count) per role."""
        return tuple((r.name, r.threshold, len(r.key_ids)) for r in self.roles)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "fingerprint": self.fingerprint,
            "fingerprint_words": self.words,
            "created": self.created,
            "expires": self.expires,
            "expired": self.expired,
            "roles": {r.name: {"threshold": r.threshold, "keys": list(r.key_ids)}
                      for r in self.roles},
            "keys": [k.to_json() for k in self.keys],
            "installed": [{"version": i.version, "fingerprint": i.fingerprint,
                           "installed_at": i.installed_at} for i in self.installed],
            "channels": [{"channel": c.channel, "sequence": c.sequence,
                          "manifest": c.manifest, "updated_at": c.updated_at}
                         for c in self.channels],
        }


def describe(root: TrustRoot, body: bytes | None, now: datetime) -> TrustSummary:
    """One root, its keys sorted by name; ``body`` (the signed bytes) gives the words."""
    keys = tuple(
        KeySummary(
            key_id=kid, name=key.name,
            roles=tuple(r for r in ROLES if kid in root.roles[r].key_ids),
            words=fingerprint_words(key.public),
            models=tuple(root.publisher_role.models.get(kid, ())),
        )
        for kid, key in sorted(root.keys.items(), key=lambda item: item[1].name)
    )
    return TrustSummary(
        version=root.version, fingerprint=root.fingerprint,
        words=fingerprint_words(body) if body is not None else None,
        created=format_timestamp(root.created), expires=format_timestamp(root.expires),
        expired=now >= root.expires,
        roles=tuple(RoleSummary(r, root.roles[r].threshold, tuple(root.roles[r].key_ids))
                    for r in ROLES),
        keys=keys,
    )


def store_summary(store_dir: Path, now: datetime) -> TrustSummary | None:
    """The store's root in force with every installed version and the channels; None when the
    store trusts nothing yet."""
    chain = trust_state.installed_chain(store_dir)
    if not chain:
        return None
    return replace(
        describe(chain[-1].root, chain[-1].body, now),
        installed=tuple(InstalledVersion(*v) for v in trust_state.installed_versions(store_dir)),
        channels=tuple(ChannelMark(*c) for c in trust_state.channels(store_dir)),
    )

"""Identity links across partitions: what the profile agent does when identifiers meet (pure).

Every profile and every alias lives on the partition of its own key, so a link between two
keys is carried by commands on ``customer-events``, each handled on the partition that owns
the data it touches:

- ``link(alias -> to)``, on the alias's partition. The alias table maps a key that is no longer
  canonical to the key that absorbed it. If the alias still owns a profile, that profile is
  absorbed: its memberships exit (cause ``merge``), it is deleted, and its state travels in a
  ``merge`` command. If the alias already points elsewhere, the two canonical keys are the
  same customer: ``identity.survivor`` decides which absorbs the other, and a ``link`` is sent
  to the loser; two different CRM customer ids never merge (a counted conflict).
- ``merge(source -> into)``, on the survivor's partition: the absorbed state is merged into
  the survivor's (``identity.merge_profiles``), its memberships re-evaluated (cause ``merge``).
  Idempotent: the survivor remembers the keys it absorbed.
- ``erase(key)``, on the key's partition: any profile under it holding data from before the
  erasure is deleted, and the key keeps a tombstone with the erasure instant: events, merges and
  links still in flight that carry data from before that instant are dropped when they arrive,
  so an erased customer never comes back; newer data under the key starts a new profile.

Events under an alias are forwarded to its canonical key (following chains one hop at a time,
at most ``MAX_HOPS``), so later events under either identifier land on the same profile.

Runaway merges stop at a cap: an alias that has been re-linked ``max_links`` times (a shared
device id seen with ever more customers) refuses further links, and each refusal is counted.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.identity import survivor
from pipeline.profile import ProfileState

OP_HEADER = "pipeline-op"
LINK = b"link"
MERGE = b"merge"
ERASE = b"erase"
HOPS_HEADER = "pipeline-hops"
AT_HEADER = "pipeline-at"  # on a profile-updates tombstone: the instant the profile went away
MAX_HOPS = 8


@dataclass(frozen=True, slots=True)
class Alias:
    """A key that is no longer canonical, and where its customer lives now."""

    to: str  # "" for an erased key that points nowhere
    links: int = 1  # how many times it was (re-)linked: the runaway-merge cap counts these
    erased_at: int | None = None  # the key's customer was erased then: older data under it is dropped

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> Alias:
        return cls(**json.loads(data))


@dataclass(frozen=True, slots=True)
class Command:
    op: str  # link, merge, erase
    key: str  # the key whose partition handles it (alias for link/erase, survivor for merge)
    to: str = ""  # link: the canonical key to link to
    source: str = ""  # merge: the absorbed key
    state: dict[str, Any] | None = None  # merge: the absorbed profile
    at: int = 0  # evaluation instant of the event that caused it (epoch ms)
    cause: str = ""

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> Command:
        return cls(**json.loads(data))

    def headers(self) -> list[tuple[str, bytes]]:
        return [(OP_HEADER, self.op.encode())]


@dataclass
class LinkOutcome:
    alias: Alias | None = None  # the alias record to write (None: leave as is)
    absorb: bool = False  # the alias key's own profile is absorbed into ``alias.to``
    send: list[Command] | None = None  # further commands
    conflict: bool = False  # refused: two different CRM customers
    capped: bool = False  # refused: the alias hit the re-link cap


def on_link(cmd: Command, current: Alias | None, own_profile: ProfileState | None, *, max_links: int) -> LinkOutcome:
    """Decide what a ``link(cmd.key -> cmd.to)`` does, given the alias's current record and profile."""
    alias, target = cmd.key, cmd.to
    if alias == target:
        return LinkOutcome()
    erased_at = current.erased_at if current is not None else None
    if current is not None and not current.to:
        current = None  # an erased key is free to link again (its erasure instant is kept)
    if current is None:
        winner = survivor(alias, target)
        if winner is None:
            return LinkOutcome(conflict=True)
        if winner == alias:  # the alias key is the stronger: the link goes the other way
            return LinkOutcome(send=[Command("link", target, to=alias, at=cmd.at, cause=cmd.cause)])
        return LinkOutcome(alias=Alias(target, erased_at=erased_at), absorb=own_profile is not None)
    if current.to == target:
        return LinkOutcome()
    if current.links >= max_links:
        return LinkOutcome(capped=True)
    winner = survivor(current.to, target)
    if winner is None:
        return LinkOutcome(conflict=True)
    loser = target if winner == current.to else current.to
    # Point the alias straight at the survivor (shorter chains) and absorb the loser.
    return LinkOutcome(alias=Alias(winner, current.links + 1, erased_at),
                       send=[Command("link", loser, to=winner, at=cmd.at, cause=cmd.cause)])


def canonical(current: Alias | None, key: str) -> str:
    """Where an event under ``key`` belongs: ``key`` itself unless it became an alias."""
    return current.to if current is not None and current.to and current.to != key else key


def erased_before(current: Alias | None, at: int | None) -> bool:
    """Whether data of instant ``at`` under this key predates its customer's erasure (and is dropped)."""
    return current is not None and current.erased_at is not None and at is not None and at <= current.erased_at

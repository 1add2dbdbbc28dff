"""Hypothesis strategies for valid license documents."""

from __future__ import annotations

from datetime import UTC, date, datetime

from hypothesis import strategies as st

from tessera.core.fingerprint import COMPONENT_KINDS, Component, LockingId
from tessera.core.model import Binding, Entitlement, Identity, License, Location, MatchLevel
from tessera.core.passwords import hash_secret
from tessera.core.versions import VersionRange

_SECRET_HASH = hash_secret("admin-secret", salt=b"0123456789abcdef")

feature_codes = st.from_regex(r"\A[A-Za-z][A-Za-z0-9_-]{0,12}(\.[a-z0-9]{1,8}){0,2}\Z")
location_names = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,10}\Z")
text = (
    st.text(
        alphabet=st.characters(codec="utf-8", categories=("L", "N", "P", "Zs", "S")), min_size=1, max_size=40
    )
    .map(str.strip)
    .filter(lambda s: bool(s) and all(ch.isprintable() for ch in s))
)
serials = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,20}\Z")
products = st.from_regex(r"\A[a-z][a-z0-9_-]{0,10}\Z")
timestamps = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
).map(lambda d: d.replace(microsecond=0))
expiries = st.one_of(st.none(), st.dates(min_value=date(2000, 1, 1), max_value=date(2999, 12, 31)))
versions = st.sampled_from(["*", "4.*", "4.2", ">=4.1, <5", "1.2.3", "==2", ">0"]).map(VersionRange.parse)
ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_-]{7,20}\Z")


components = st.builds(Component, st.sampled_from(sorted(COMPONENT_KINDS)), st.binary(min_size=5, max_size=5))


@st.composite
def locking_ids(draw: st.DrawFn) -> str:
    return str(LockingId(tuple(draw(st.lists(components, min_size=1, max_size=8)))))


@st.composite
def machine_pairs(draw: st.DrawFn) -> tuple[LockingId, LockingId]:
    """A licensed machine and a machine asking later: some of the licensed one's components
    kept (none, some or all), others added (a kind seen twice, weights that just reach a
    level or miss it)."""
    licensed = draw(st.lists(components, min_size=1, max_size=7, unique=True))
    kept = draw(st.integers(0, len(licensed)))
    extra = draw(st.lists(components, min_size=0 if kept else 1, max_size=7, unique=True))
    return LockingId(tuple(licensed)), LockingId(tuple(licensed[:kept] + extra))


@st.composite
def locations(draw: st.DrawFn) -> Location:
    features = draw(st.lists(feature_codes, min_size=1, max_size=6, unique=True))
    ents = tuple(Entitlement(f, draw(st.integers(0, 1_000_000_000)), draw(expiries)) for f in features)
    return Location(draw(location_names), ents)


@st.composite
def licenses(draw: st.DrawFn) -> License:
    binding = draw(st.sampled_from(list(Binding)))
    locs = draw(st.lists(locations(), min_size=1, max_size=3, unique_by=lambda loc: loc.name))
    return License(
        licensee=draw(text),
        serial=draw(serials),
        product=draw(products),
        version=draw(versions),
        issued=draw(timestamps),
        locations=tuple(locs),
        binding=binding,
        locking_id=draw(locking_ids()) if binding is Binding.MACHINE else draw(st.none() | locking_ids()),
        match=draw(st.sampled_from(list(MatchLevel))),
        instance_id=draw(ids) if binding is Binding.INSTANCE else None,
        user_id=draw(ids) if binding is Binding.USER else None,
        revision=draw(st.integers(1, 10_000)),
        connect=draw(st.booleans()),
        validation_hours=draw(st.integers(1, 1000)),
        failover_days=draw(st.integers(0, 365)),
        checkpoint_days=draw(st.none() | st.integers(1, 365)),
        emergency=tuple(draw(st.lists(feature_codes, max_size=3, unique=True))),
        recovery_allowance=draw(st.none() | st.integers(0, 10)),
        recovery_interval_days=draw(st.none() | st.integers(0, 365)),
        agent_key=draw(st.none() | st.just("MCowBQYDK2VwAyEAabcdefghijklmnopqrstuvwxyz0123456789AB=")),
    )


@st.composite
def identities(draw: st.DrawFn) -> Identity:
    return Identity(
        licensee=draw(text),
        serial=draw(serials),
        product=draw(products),
        version=draw(versions),
        location=draw(location_names),
        instance_id=draw(ids),
        admin_secret=_SECRET_HASH,
        issued=draw(timestamps),
    )


documents = st.one_of(licenses(), identities())

"""Realistic documents for the benchmarks: what a vendor ships, not a minimal toy.

A license like the spec's example (machine-bound, one location, a handful of features, an
emergency set), so the parser's cost per line is measured on a typical line count.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from tessera.core import License, Location, SigningKey, sign_document
from tessera.core.model import Binding, Entitlement, MatchLevel
from tessera.core.versions import VersionRange

__all__ = ["LOCKING_ID", "sample_license", "signed_sample"]

LOCKING_ID = "TL1-MP5UNZP2ZRSFQMXIPVBGRKZMPWZZK3IG57Y7CM3V5T6EEOS5"
ISSUED = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)
#: Expiries a year ahead of the run, so the sample never rots into an expired license.
SOON = date.today() + timedelta(days=365)


def sample_license(serial: str = "2026-000123", locking_id: str = LOCKING_ID) -> License:
    return License(
        licensee="myCompany, City",
        serial=serial,
        product="cortex",
        version=VersionRange.parse("4.*"),
        issued=ISSUED,
        binding=Binding.MACHINE,
        locking_id=locking_id,
        match=MatchLevel.MEDIUM,
        emergency=("ctxjs",),
        locations=(
            Location(
                "abc",
                (
                    Entitlement("backup", 1, SOON),
                    Entitlement("uniplex", 5, SOON),
                    Entitlement("ctxjs", 1, None),
                    Entitlement("reporting", 10, SOON + timedelta(days=180)),
                    Entitlement("partner.acme.reporting", 2, SOON + timedelta(days=180)),
                ),
            ),
        ),
    )


def signed_sample(key: SigningKey) -> bytes:
    return sign_document(sample_license(), key).encode("utf-8")

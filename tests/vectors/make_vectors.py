"""Regenerate the test vectors: ``python tests/vectors/make_vectors.py``.

The keys are derived from fixed strings so the files are reproducible (Ed25519 signatures
are deterministic); only the sealed vector changes, since sealing draws a random nonce.
Each vector's expected verdict is in ``verdicts.json``; docs/license-format.md explains them.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, date, datetime
from pathlib import Path

from tessera.core import Keyring, SigningKey, seal, sign_document
from tessera.core.fingerprint import Component, LockingId
from tessera.core.model import Entitlement, Identity, License, Location
from tessera.core.passwords import hash_secret
from tessera.core.versions import VersionRange

HERE = Path(__file__).parent
VENDOR = SigningKey.from_raw(hashlib.sha256(b"tessera test vector vendor key").digest())
STRANGER = SigningKey.from_raw(hashlib.sha256(b"tessera test vector stranger key").digest())
LICENSE_KEY = "K7QXM-2VDRT-9HFNA-PC4WE-8BZJY"


def locking_id(seed: str) -> str:
    parts = [(k, hashlib.sha256(f"{seed}/{k}".encode()).digest()[:5]) for k in "mucdh"]
    return str(LockingId(tuple(Component(k, d) for k, d in parts)))


MACHINE_A = locking_id("machine-a")
MACHINE_B = locking_id("machine-b")


def base(**changes: object) -> License:
    lic = License(
        licensee="myCompany, City",
        serial="2026-000123",
        product="cortex",
        version=VersionRange.parse("4.*"),
        issued=datetime(2026, 11, 22, 10, 0, tzinfo=UTC),
        locking_id=MACHINE_A,
        emergency=("ctxjs",),
        locations=(
            Location(
                "abc",
                (
                    Entitlement("backup", 1, date(2027, 1, 15)),
                    Entitlement("uniplex", 5, date(2027, 1, 15)),
                    Entitlement("ctxjs", 1, None),
                    Entitlement("partner.acme.reporting", 2, date(2027, 6, 30)),
                ),
            ),
        ),
    )
    return lic.evolve(**changes)


def main() -> None:
    verdicts: list[dict[str, object]] = []

    def vector(name: str, content: str | bytes, verdict: str, **extra: object) -> None:
        data = content.encode("utf-8") if isinstance(content, str) else content
        (HERE / name).write_bytes(data)
        verdicts.append({"file": name, "verdict": verdict, **extra})

    today = "2026-12-01"
    good = sign_document(base(), VENDOR)
    vector("valid.lic", good, "valid", today=today)
    vector("valid.lic", good, "valid", today=today, locking_id=MACHINE_A)
    vector("valid.lic", good, "wrong-binding", today=today, locking_id=MACHINE_B)
    par = Identity(
        licensee="myCompany, City",
        serial="2026-000124",
        product="cortex",
        version=VersionRange.parse("4.*"),
        location="abc",
        instance_id="inst-7f3a9c2e",
        admin_secret=hash_secret("vector secret", salt=b"vector-salt-0001"),
        issued=datetime(2026, 11, 22, 10, 0, tzinfo=UTC),
    )
    vector("valid-identity.par", sign_document(par, VENDOR), "valid", today=today)
    inst = base(serial="2026-000124", binding="instance", locking_id=None, instance_id="inst-7f3a9c2e")
    vector("valid-instance.lic", sign_document(inst, VENDOR), "valid", today=today)
    expired = base(
        serial="2026-000125",
        emergency=(),
        locations=(
            Location(
                "abc",
                (Entitlement("backup", 1, date(2025, 1, 15)), Entitlement("uniplex", 5, date(2025, 1, 15))),
            ),
        ),
    )
    vector("expired.lic", sign_document(expired, VENDOR), "expired", today=today)
    vector("wrong-key.lic", sign_document(base(), STRANGER), "unknown-key", today=today)
    forged = sign_document(base(), STRANGER).replace(STRANGER.key_id, VENDOR.key_id)
    vector("forged-key-id.lic", forged, "bad-signature", today=today)
    vector("tampered-count.lic", good.replace("uniplex = 5,", "uniplex = 50,"), "bad-signature", today=today)
    vector(
        "tampered-expiry.lic",
        good.replace("backup = 1, 2027-01-15", "backup = 1, permanent"),
        "bad-signature",
        today=today,
    )
    vector(
        "tampered-locking-id.lic",
        good.replace(MACHINE_A, MACHINE_B),
        "bad-signature",
        today=today,
        locking_id=MACHINE_B,
    )
    vector(
        "malformed-spacing.lic",
        good.replace("uniplex = 5", "uniplex =  5"),
        "malformed",
        line=18,
        today=today,
    )
    vector(
        "malformed-date.lic", good.replace("2027-01-15", "2027-13-15", 1), "malformed", line=17, today=today
    )
    vector(
        "malformed-count.lic",
        good.replace("uniplex = 5", "uniplex = five"),
        "malformed",
        line=18,
        today=today,
    )
    vector(
        "malformed-unknown-section.lic",
        good.replace("[LOCATION abc]", "[PLACE abc]"),
        "malformed",
        line=16,
        today=today,
    )
    vector(
        "malformed-duplicate-key.lic",
        good.replace("product = cortex\n", "product = cortex\nproduct = cortex\n"),
        "malformed",
        line=6,
        today=today,
    )
    vector(
        "malformed-unknown-key.lic",
        good.replace("product = cortex\n", "product = cortex\ncolour = blue\n"),
        "malformed",
        line=6,
        today=today,
    )
    vector("malformed-unsigned.lic", good[: good.index("[SIGNATURE]")], "malformed", today=today)
    vector("malformed-truncated.lic", good[: len(good) // 2], "malformed", today=today)
    vector("malformed-crlf.lic", good.replace("\n", "\r\n"), "malformed", line=1, today=today)
    vector("malformed-binary.lic", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "malformed", today=today)
    sealed = sign_document(seal(base(serial="2026-000126"), LICENSE_KEY), VENDOR)
    vector("sealed.lic", sealed, "valid", today=today, license_key=LICENSE_KEY)
    vector("sealed.lic", sealed, "decryption", today=today, license_key="AAAAA-AAAAA-AAAAA-AAAAA-AAAAA")
    (HERE / "vendor.pub").write_text(Keyring([VENDOR.public]).dumps())
    (HERE / "verdicts.json").write_text(json.dumps(verdicts, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Every test vector in tests/vectors/ gets the verdict docs/license-format.md promises."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from tessera.core import Keyring
from tessera.core.errors import (
    BindingError,
    DecryptionError,
    FormatError,
    SignatureError,
    UnknownKeyError,
)
from tessera.core.model import License
from tessera.core.sealing import unseal
from tessera.core.verify import check_binding, expired_features, load_signed

VECTORS = Path(__file__).parent.parent / "vectors"
KEYRING = Keyring.loads((VECTORS / "vendor.pub").read_bytes())
CASES: list[dict[str, Any]] = json.loads((VECTORS / "verdicts.json").read_text())


def judge(case: dict[str, Any]) -> tuple[str, int | None]:
    """The reference verifier: parse, signature, open, binding, expiry, in that order."""
    try:
        signed = load_signed((VECTORS / case["file"]).read_bytes(), KEYRING)
        doc = signed.document
        if isinstance(doc, License):
            if doc.sealed is not None:
                doc = unseal(doc, case["license_key"])
            if "locking_id" in case:
                check_binding(doc, case["locking_id"])
            if not expired_features(doc, date.fromisoformat(case["today"])).valid:
                return "expired", None
    except FormatError as exc:
        return "malformed", exc.line
    except UnknownKeyError:
        return "unknown-key", None
    except SignatureError:
        return "bad-signature", None
    except DecryptionError:
        return "decryption", None
    except BindingError:
        return "wrong-binding", None
    return "valid", None


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['file']}-{c['verdict']}")
def test_vector(case: dict[str, Any]) -> None:
    verdict, line = judge(case)
    assert verdict == case["verdict"]
    if "line" in case:
        assert line == case["line"]


def test_every_vector_file_is_judged() -> None:
    files = {p.name for p in VECTORS.iterdir() if p.suffix in (".lic", ".par")}
    assert files == {c["file"] for c in CASES}

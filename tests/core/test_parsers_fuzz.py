"""Property tests for the parsers the other files fuzz only with random bytes (or not yet).

Random bytes rarely get past a JSON or TOML decoder, so here a *valid* input is taken apart
field by field: any field replaced by any JSON value, dropped, or joined by a stray one.
Every parser must answer with its documented error (a ``TesseraError``, or ``ValueError``
where its docstring says so), never anything else. Also here: license specs, version
numbers and ranges, license keys, sealed entitlements, public keys, PEM key files, and
identity files edited line by line.
"""

from __future__ import annotations

import base64
import contextlib
import json
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tessera.core import SigningKey, generate_license_key
from tessera.core.errors import DecryptionError, FormatError, KeyFileError, TesseraError
from tessera.core.fileformat import parse
from tessera.core.fingerprint import collect_facts, locking_id_for
from tessera.core.licensekey import normalize_license_key
from tessera.core.model import License
from tessera.core.protocol import (
    ActivationRequest,
    CheckinRequest,
    ServerResponse,
    new_nonce,
    new_system_id,
)
from tessera.core.sealing import seal, unseal
from tessera.core.signing import Keyring, PublicKey
from tessera.core.spec import license_from_spec, load_spec
from tessera.core.versions import VersionRange, parse_version

from .strategies import licenses

VENDOR = SigningKey.from_raw(bytes(range(32)))
AGENT = SigningKey.from_raw(bytes(range(2, 34)))
LOCKING_ID = str(locking_id_for(collect_facts(), "cortex"))
KEY = generate_license_key()
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
VECTORS = Path(__file__).parent.parent / "vectors"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def _mutated(valid: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    """The valid object with one to three fields replaced, dropped or added."""
    obj = dict(valid)
    for _ in range(data.draw(st.integers(1, 3))):
        action = data.draw(st.sampled_from(["replace", "drop", "add"]))
        if action == "add" or not obj:
            obj[data.draw(st.text(max_size=12))] = data.draw(json_values)
        elif action == "drop":
            obj.pop(data.draw(st.sampled_from(sorted(obj))))
        else:
            obj[data.draw(st.sampled_from(sorted(obj)))] = data.draw(json_values)
    return obj


ACTIVATION = json.loads(ActivationRequest.create(KEY, LOCKING_ID, new_system_id(), AGENT).to_json())
CHECKIN = json.loads(CheckinRequest.create(KEY, LOCKING_ID, new_system_id(), AGENT).to_json())
NONCE = new_nonce()
RESPONSE = json.loads(
    ServerResponse("checkin", NONCE, NOW, "2026-000123", directives=("lock",)).signed(VENDOR).to_json()
)


@given(st.data())
def test_mutated_requests_are_format_or_signature_errors(data: st.DataObject) -> None:
    for cls, valid in ((ActivationRequest, ACTIVATION), (CheckinRequest, CHECKIN)):
        text = json.dumps(_mutated(valid, data))
        with contextlib.suppress(TesseraError):
            cls.from_json(text)
        with contextlib.suppress(TesseraError):  # also as a mapping (the server's path)
            cls.from_json(json.loads(text))


@given(st.data())
def test_mutated_server_responses_are_refused_cleanly(data: st.DataObject) -> None:
    with contextlib.suppress(TesseraError):
        ServerResponse.from_json(json.dumps(_mutated(RESPONSE, data)), Keyring([VENDOR.public]), NONCE)


SPEC = {
    "licensee": "myCompany, City",
    "serial": "2026-000123",
    "product": "cortex",
    "version": "4.*",
    "failover-days": 30,
    "emergency": ["ctxjs"],
    "locations": {"abc": {"backup": "1, 2027-01-15", "uniplex": {"count": 5, "expiry": date(2027, 1, 15)}}},
}


@given(st.data())
def test_mutated_license_specs_are_format_errors(data: st.DataObject) -> None:
    spec = _mutated(SPEC, data)
    if data.draw(st.booleans()):  # or break inside a location
        spec["locations"] = {"abc": _mutated(SPEC["locations"]["abc"], data)}
    with contextlib.suppress(FormatError):
        license_from_spec(spec, NOW)


@given(st.text(max_size=400))
def test_random_spec_text_is_a_format_error(text: str) -> None:
    with contextlib.suppress(FormatError):
        load_spec(text, NOW)


@given(st.text(max_size=40))
def test_version_parsers_raise_only_value_error(text: str) -> None:
    with contextlib.suppress(ValueError):
        parse_version(text)
    with contextlib.suppress(ValueError):
        VersionRange.parse(text)


@given(st.text(max_size=120))
def test_license_key_normalization_raises_only_value_error(text: str) -> None:
    try:
        key = normalize_license_key(text)
    except ValueError:
        return
    assert normalize_license_key(key) == key


@given(licenses(), st.binary(min_size=1, max_size=150).map(lambda b: base64.b64encode(b).decode()))
def test_random_sealed_blobs_are_decryption_errors(lic: License, blob: str) -> None:
    # Any blob a file can carry (the model admits only base64) and any wrong key.
    sealed = seal(lic, KEY)
    for candidate in (sealed.evolve(sealed=blob), sealed):
        with contextlib.suppress(DecryptionError):
            unseal(candidate, generate_license_key())
    assert unseal(sealed, KEY).locations == lic.locations


@given(st.text(max_size=100))
def test_random_public_keys_raise_only_documented_errors(text: str) -> None:
    with contextlib.suppress(KeyFileError, ValueError):
        PublicKey.from_base64(text)


@given(st.binary(max_size=600), st.one_of(st.none(), st.binary(max_size=20)))
def test_random_pem_key_files_are_key_file_errors(data: bytes, passphrase: bytes | None) -> None:
    with contextlib.suppress(KeyFileError):
        SigningKey.from_pem(data, passphrase)


@given(st.data())
def test_identity_file_line_edits_never_crash_the_parser(data: st.DataObject) -> None:
    lines = (VECTORS / "valid-identity.par").read_text().split("\n")
    i = data.draw(st.integers(0, len(lines) - 1))
    lines[i] = data.draw(st.text(max_size=80))
    with contextlib.suppress(FormatError):
        parse("\n".join(lines))

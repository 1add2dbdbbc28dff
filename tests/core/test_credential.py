"""The credential file of user-bound licenses and the lease messages."""

from __future__ import annotations

import contextlib
import json
import os
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tessera.core.credential import (
    Credential,
    LeaseRequest,
    LeaseResponse,
    parse_credential,
    render_credential,
)
from tessera.core.errors import FormatError, SignatureError, UnknownKeyError, VerificationError
from tessera.core.signing import Keyring, SigningKey

NOW = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)
VENDOR = SigningKey.generate()
KEYRING = Keyring([VENDOR.public])


def make_file(user: str = "ann", generation: int = 1, vendor: SigningKey = VENDOR) -> str:
    seed = os.urandom(32)
    public = SigningKey.from_raw(seed).public.to_base64()
    return render_credential(Credential("2026-000001", "cortex", user, generation, public, NOW), seed, vendor)


GOOD = make_file()


def test_round_trip_and_vendor_signature() -> None:
    parsed = parse_credential(GOOD)
    assert parsed.verify(KEYRING).user_id == "ann"
    assert parsed.credential.generation == 1
    assert parsed.key.public.to_base64() == parsed.credential.public_key


def test_forged_file_is_refused_by_the_keyring() -> None:
    forged = parse_credential(make_file(vendor=SigningKey.generate()))
    with pytest.raises(UnknownKeyError):
        forged.verify(KEYRING)
    # The right key id but altered content: the signature no longer matches.
    lines = GOOD.split("\n")
    lines[4] = "user-id = bob"
    with pytest.raises(SignatureError):
        parse_credential("\n".join(lines)).verify(KEYRING)


@pytest.mark.parametrize(
    ("mutate", "line", "words"),
    [
        (lambda t: t.replace("generation = 1", "generation = 01"), 6, "generation"),
        (lambda t: t.replace("user-id = ann", "user-id = a n"), 5, "user-id"),
        (lambda t: t.replace("product = cortex", "product = cortex\nproduct = x"), 5, "duplicate"),
        (lambda t: t.replace("[PRIVATE]", "[SECRET]"), 9, "expected [PRIVATE]"),
        (lambda t: t.replace("serial = ", "serial-number = "), 3, "unknown key"),
        (lambda t: t.replace("\n[SIGNATURE]", "\n\n[SIGNATURE]"), 11, "empty line"),
    ],
)
def test_malformed_files_name_the_line(mutate, line, words) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FormatError) as info:
        parse_credential(mutate(GOOD))
    assert info.value.line == line, str(info.value)
    assert words in str(info.value)


def test_private_key_must_match_the_public_key() -> None:
    other = make_file().split("\n")
    lines = GOOD.split("\n")
    lines[9] = other[9]  # someone else's seed
    with pytest.raises(FormatError, match="line 10: the private key does not belong"):
        parse_credential("\n".join(lines))


def test_truncated_and_empty() -> None:
    with pytest.raises(FormatError):
        parse_credential(GOOD[: GOOD.index("[SIGNATURE]")])
    with pytest.raises(FormatError, match="empty"):
        parse_credential(b"")


@given(st.binary(max_size=2048))
def test_random_bytes_never_crash_the_parser(data: bytes) -> None:
    with contextlib.suppress(FormatError):
        parse_credential(data)


@given(st.integers(min_value=0, max_value=len(GOOD) - 1), st.characters())
def test_any_single_change_is_a_format_or_signature_error(at: int, char: str) -> None:
    text = GOOD[:at] + char + GOOD[at + 1 :]
    if text == GOOD:
        return
    try:
        parse_credential(text).verify(KEYRING)
    except (FormatError, VerificationError):
        return
    raise AssertionError("a changed credential file was accepted")


def test_lease_request_signed_by_the_credential_key() -> None:
    cred = parse_credential(GOOD)
    request = LeaseRequest.create("lease", cred, "uniplex", NOW)
    parsed = LeaseRequest.from_json(request.to_json())
    parsed.verify_with(cred.credential.public_key)
    other = parse_credential(make_file())
    with pytest.raises(SignatureError):
        parsed.verify_with(other.credential.public_key)
    with pytest.raises(FormatError, match="lease_id"):
        LeaseRequest.from_json(request.to_json().replace(b'"lease_id":""', b'"lease_id":"x"'))


def test_lease_response_must_be_vendor_signed_and_echo_the_nonce() -> None:
    response = LeaseResponse("lease", "A" * 22, NOW, "2026-000001", "uniplex", "l" * 24, NOW, 1, 2)
    body = response.signed(VENDOR).to_json()
    assert LeaseResponse.from_json(body, KEYRING, "A" * 22).in_use == 1
    with pytest.raises(VerificationError, match="replayed"):
        LeaseResponse.from_json(body, KEYRING, "B" * 22)
    with pytest.raises(SignatureError):
        LeaseResponse.from_json(body.replace(b'"in_use":1', b'"in_use":0'), KEYRING, "A" * 22)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


_VALID = json.loads(LeaseRequest.create("lease", parse_credential(GOOD), "uniplex", NOW).to_json())


@given(st.sampled_from([*sorted(_VALID), "x"]), _JSON)
def test_any_field_value_is_a_lease_request_or_a_format_error(name: str, value: object) -> None:
    """A valid request with one field replaced by any JSON value: parsed or one FormatError."""
    with contextlib.suppress(FormatError):
        LeaseRequest.from_json(json.dumps({**_VALID, name: value}))


@given(st.binary(max_size=512))
def test_random_bytes_are_never_a_lease_request(data: bytes) -> None:
    with contextlib.suppress(FormatError):
        LeaseRequest.from_json(data)

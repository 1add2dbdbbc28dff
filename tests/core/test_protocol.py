from __future__ import annotations

import base64
import contextlib
import json
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tessera.core import Keyring, SigningKey, generate_license_key
from tessera.core.errors import FormatError, SignatureError, VerificationError
from tessera.core.fingerprint import collect_facts, locking_id_for
from tessera.core.protocol import (
    ActivationRequest,
    CheckinRequest,
    ServerResponse,
    canonical_json,
    derive_checkin_key,
    new_nonce,
    new_system_id,
    open_checkin_key,
    seal_checkin_key,
)
from tessera.core.signing import PublicKey

from .crafted import mixed_order_activation

VENDOR = SigningKey.from_raw(bytes(range(32)))
AGENT = SigningKey.from_raw(bytes(range(2, 34)))
LOCKING_ID = str(locking_id_for(collect_facts(), "cortex"))
KEY = generate_license_key()


def test_activation_request_round_trips_and_self_verifies() -> None:
    request = ActivationRequest.create(KEY, LOCKING_ID, new_system_id(), AGENT)
    again = ActivationRequest.from_json(request.to_json())
    assert again == request
    assert again.agent_key == AGENT.public.to_base64()


def test_activation_request_carries_only_allowed_fields() -> None:
    body = json.loads(ActivationRequest.create(KEY, LOCKING_ID, new_system_id(), AGENT).to_json())
    assert set(body) == {
        "protocol",
        "type",
        "license_key",
        "locking_id",
        "system_id",
        "nonce",
        "agent_key",
        "signature",
    }
    body = json.loads(CheckinRequest.create(KEY, LOCKING_ID, new_system_id(), AGENT).to_json())
    fields = {"protocol", "type", "license_key", "locking_id", "system_id", "nonce", "accept"}
    assert set(body) == fields | {"signature"}


def test_tampered_activation_request_is_refused() -> None:
    body = json.loads(ActivationRequest.create(KEY, LOCKING_ID, new_system_id(), AGENT).to_json())
    body["system_id"] = new_system_id()
    with pytest.raises(SignatureError):
        ActivationRequest.from_json(json.dumps(body))


@pytest.mark.parametrize("agent_key", ["AAAA", base64.b64encode(bytes(33)).decode()])
def test_an_agent_key_of_the_wrong_length_is_malformed_not_a_bad_signature(agent_key: str) -> None:
    body = json.loads(ActivationRequest.create(KEY, LOCKING_ID, new_system_id(), AGENT).to_json())
    body["agent_key"] = agent_key
    with pytest.raises(FormatError, match="field 'agent_key' is not an Ed25519 public key"):
        ActivationRequest.from_json(json.dumps(body))


def test_an_agent_key_with_a_small_order_part_is_refused_though_it_signed_its_request() -> None:
    """Such a key verifies its own request half the time but cannot be sealed to: the
    request is malformed (422 naming the field), not a failure of the server later on."""
    body = mixed_order_activation(ActivationRequest.create(KEY, LOCKING_ID, new_system_id(), AGENT))
    obj = json.loads(body)
    key = base64.b64decode(obj["agent_key"])
    signed = canonical_json({k: v for k, v in obj.items() if k != "signature"})
    assert PublicKey(key).verify(base64.b64decode(obj["signature"]), signed)  # a valid signature
    with pytest.raises(FormatError, match="field 'agent_key' is not a usable Ed25519 public key"):
        ActivationRequest.from_json(body)
    with pytest.raises(FormatError, match="agent key is not a usable"):
        seal_checkin_key(bytes(32), PublicKey(key))


@given(st.binary(min_size=32, max_size=32))
def test_sealing_to_any_agent_key_opens_for_it_alone(seed: bytes) -> None:
    """The X25519 form of the key is computed once at parsing and reused for sealing."""
    agent = SigningKey.from_raw(seed)
    request = ActivationRequest.create(KEY, LOCKING_ID, new_system_id(), agent)
    parsed = ActivationRequest.from_json(request.to_json())
    sealed = seal_checkin_key(b"k" * 32, PublicKey.from_base64(parsed.agent_key))
    assert open_checkin_key(sealed, agent) == b"k" * 32
    with pytest.raises(FormatError):
        open_checkin_key(sealed, AGENT if agent.public != AGENT.public else SigningKey.generate())


def test_checkin_request_verifies_only_with_the_registered_key() -> None:
    request = CheckinRequest.from_json(
        CheckinRequest.create(KEY, LOCKING_ID, new_system_id(), AGENT).to_json()
    )
    request.verify_with(AGENT.public)
    with pytest.raises(SignatureError):
        request.verify_with(VENDOR.public)


def checkin_key() -> bytes:
    return derive_checkin_key(b"server secret" * 3, AGENT.public.to_base64())


def test_checkin_key_is_bound_to_the_agent_key_and_the_server_secret() -> None:
    other_agent = derive_checkin_key(b"server secret" * 3, VENDOR.public.to_base64())
    other_server = derive_checkin_key(b"another secret", AGENT.public.to_base64())
    assert len(checkin_key()) == 32
    assert len({checkin_key(), other_agent, other_server}) == 3


def test_sealed_checkin_key_opens_only_for_its_agent() -> None:
    sealed = seal_checkin_key(checkin_key(), AGENT.public)
    assert checkin_key().hex() not in sealed and open_checkin_key(sealed, AGENT) == checkin_key()
    with pytest.raises(FormatError):
        open_checkin_key(sealed, VENDOR)
    with pytest.raises(FormatError):
        open_checkin_key("not base64!", AGENT)


def test_maced_checkin_request_authenticates_only_with_its_key() -> None:
    made = CheckinRequest.create(KEY, LOCKING_ID, new_system_id(), AGENT, checkin_key())
    body = json.loads(made.to_json())
    assert set(body) == {
        "protocol",
        "type",
        "license_key",
        "locking_id",
        "system_id",
        "nonce",
        "accept",
        "mac",
    }
    request = CheckinRequest.from_json(made.to_json())
    assert request == made
    request.authenticate(AGENT.public.to_base64(), checkin_key())
    with pytest.raises(SignatureError):
        request.authenticate(AGENT.public.to_base64(), bytes(32))
    body["system_id"] = new_system_id()  # tampered: the MAC covers every field
    with pytest.raises(SignatureError):
        CheckinRequest.from_json(json.dumps(body)).authenticate(AGENT.public.to_base64(), checkin_key())


def test_signed_checkin_request_still_authenticates_by_the_agent_key() -> None:
    request = CheckinRequest.from_json(
        CheckinRequest.create(KEY, LOCKING_ID, new_system_id(), AGENT).to_json()
    )
    request.authenticate(AGENT.public.to_base64(), checkin_key())
    with pytest.raises(SignatureError):
        request.authenticate(VENDOR.public.to_base64(), checkin_key())


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b.update(signature=base64.b64encode(bytes(64)).decode()),  # both
        lambda b: b.pop("mac"),  # neither
        lambda b: b.update(mac="AAAA"),  # not 32 bytes
    ],
)
def test_checkin_request_needs_exactly_one_proof(mutate) -> None:  # type: ignore[no-untyped-def]
    body = json.loads(CheckinRequest.create(KEY, LOCKING_ID, new_system_id(), AGENT, checkin_key()).to_json())
    mutate(body)
    with pytest.raises(FormatError):
        CheckinRequest.from_json(json.dumps(body))


def test_checkin_key_only_travels_in_a_signed_activation_response() -> None:
    nonce = new_nonce()
    sealed = seal_checkin_key(checkin_key(), AGENT.public)
    when = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
    good = ServerResponse("activation", nonce, when, "2026-000123", checkin_key=sealed).signed(VENDOR)
    again = ServerResponse.from_json(good.to_json(), Keyring([VENDOR.public]), nonce)
    assert again.checkin_key == sealed
    body = json.loads(good.to_json())
    body["checkin_key"] = seal_checkin_key(bytes(32), AGENT.public)  # swapped in transit
    with pytest.raises(SignatureError):
        ServerResponse.from_json(json.dumps(body), Keyring([VENDOR.public]), nonce)
    wrong_kind = ServerResponse("checkin", nonce, when, "2026-000123", checkin_key=sealed).signed(VENDOR)
    with pytest.raises(FormatError):
        ServerResponse.from_json(wrong_kind.to_json(), Keyring([VENDOR.public]), nonce)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b.pop("nonce"),
        lambda b: b.update(extra="x"),
        lambda b: b.update(protocol="other/1"),
        lambda b: b.update(license_key="nope"),
        lambda b: b.update(locking_id="TL1-XYZ"),
        lambda b: b.update(nonce=123),
        lambda b: b.update(type="checkin"),
    ],
)
def test_malformed_requests_are_format_errors(mutate) -> None:  # type: ignore[no-untyped-def]
    body = json.loads(ActivationRequest.create(KEY, LOCKING_ID, new_system_id(), AGENT).to_json())
    mutate(body)
    with pytest.raises(FormatError):
        ActivationRequest.from_json(json.dumps(body))


@given(st.binary(max_size=512))
def test_random_request_bytes_never_crash(data: bytes) -> None:
    for cls in (ActivationRequest, CheckinRequest):
        with contextlib.suppress(FormatError, SignatureError):
            cls.from_json(data)


def response(nonce: str) -> ServerResponse:
    return ServerResponse(
        "checkin", nonce, datetime(2026, 11, 22, 12, 0, tzinfo=UTC), "2026-000123", directives=("lock",)
    ).signed(VENDOR)


def test_response_verifies_against_keyring_and_nonce() -> None:
    nonce = new_nonce()
    got = ServerResponse.from_json(response(nonce).to_json(), Keyring([VENDOR.public]), nonce)
    assert got.directives == ("lock",)


def test_replayed_response_is_refused() -> None:
    old = response(new_nonce()).to_json()
    with pytest.raises(VerificationError, match="replayed"):
        ServerResponse.from_json(old, Keyring([VENDOR.public]), new_nonce())


def test_response_signed_by_another_key_is_refused() -> None:
    nonce = new_nonce()
    forged = ServerResponse("checkin", nonce, datetime(2026, 1, 1, tzinfo=UTC), "x1").signed(AGENT)
    with pytest.raises(VerificationError):
        ServerResponse.from_json(forged.to_json(), Keyring([VENDOR.public]), nonce)


def test_altered_response_is_refused() -> None:
    nonce = new_nonce()
    body = json.loads(response(nonce).to_json())
    body["directives"] = []
    with pytest.raises(SignatureError):
        ServerResponse.from_json(json.dumps(body), Keyring([VENDOR.public]), nonce)


@given(st.binary(max_size=512))
def test_random_response_bytes_never_crash(data: bytes) -> None:
    try:
        ServerResponse.from_json(data, Keyring([VENDOR.public]), new_nonce())
    except VerificationError:
        pass
    except FormatError:
        pass


def test_the_proof_covers_every_field_but_itself() -> None:
    """A field added to a request later must be signed too, or it could be changed freely."""
    import dataclasses

    for cls in (ActivationRequest, CheckinRequest):
        wire = {f.name for f in dataclasses.fields(cls)} - {"locking"}  # parsed locking_id, not sent
        assert set(cls.COVERED) == wire - {"signature", "mac"}


def test_signed_json_is_the_signed_response_serialized() -> None:
    nonce = new_nonce()
    r = ServerResponse(
        "checkin", nonce, datetime(2026, 11, 22, 12, 0, tzinfo=UTC), "2026-000123", message="m"
    )
    assert r.signed_json(VENDOR) == r.signed(VENDOR).to_json()  # Ed25519 is deterministic
    assert ServerResponse.from_json(r.signed_json(VENDOR), Keyring([VENDOR.public]), nonce).message == "m"


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(st.text(), _JSON_VALUES, max_size=6))
def test_canonical_json_is_the_standard_librarys_definition(obj: dict[str, object]) -> None:
    """The fast writer (orjson) must never change a byte that a signature covers."""
    definition = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    assert canonical_json(obj) == definition


@pytest.mark.parametrize(
    "obj",
    [
        {"control": "".join(map(chr, range(128)))},  # every ASCII character, DEL included
        {"umlaut": "Müller", "emoji": "\U0001f600", "surrogate": "\ud800"},
        {"big": 2**64, "float": 1e16, "tuple": ("a", 1)},
        {"é": 1, "e": 2},
    ],
)
def test_canonical_json_edge_cases_keep_the_definition(obj: dict[str, object]) -> None:
    definition = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    assert canonical_json(obj) == definition


@pytest.mark.parametrize(
    "body",
    # Objects, so each is refused for what the stdlib parser let through, not for its shape.
    [b"{", b'{"a": NaN}', b'{"a": "\xff"}', b'{"a": "\\ud800"}', b"[" * 2000 + b"]" * 2000, b'{"n": 1e400}'],
)
def test_request_that_is_not_strict_json_is_a_format_error(body: bytes) -> None:
    with pytest.raises(FormatError):
        CheckinRequest.from_json(body)


def test_activation_request_names_its_product_under_the_signature() -> None:
    request = ActivationRequest.create(KEY, LOCKING_ID, new_system_id(), AGENT, product="cortex")
    body = json.loads(request.to_json())
    assert body["product"] == "cortex"
    assert ActivationRequest.from_json(request.to_json()).product == "cortex"
    body["product"] = "reportix"  # another product for the same key: the signature breaks
    with pytest.raises(SignatureError):
        ActivationRequest.from_json(json.dumps(body))
    body["product"] = "Not A Product"
    with pytest.raises(FormatError, match="product"):
        ActivationRequest.from_json(json.dumps(body))


def test_activation_request_without_product_is_the_older_agents_message() -> None:
    request = ActivationRequest.create(KEY, LOCKING_ID, new_system_id(), AGENT)
    assert "product" not in json.loads(request.to_json())  # signed bytes unchanged for them
    assert ActivationRequest.from_json(request.to_json()).product == ""


def test_checkin_request_says_under_its_mac_that_it_takes_batch_answers() -> None:
    checkin_key = bytes(32)
    request = CheckinRequest.create(KEY, LOCKING_ID, new_system_id(), AGENT, checkin_key)
    body = json.loads(request.to_json())
    assert body["accept"] == "batch"
    CheckinRequest.from_json(request.to_json()).authenticate(AGENT.public.to_base64(), checkin_key)
    del body["accept"]  # stripped on the way: the MAC no longer fits
    with pytest.raises(SignatureError):
        CheckinRequest.from_json(json.dumps(body)).authenticate(AGENT.public.to_base64(), checkin_key)
    body["accept"] = "everything"
    with pytest.raises(FormatError, match="accept"):
        CheckinRequest.from_json(json.dumps(body))


def test_checkin_request_without_accept_is_the_older_agents_message() -> None:
    request = CheckinRequest.create(KEY, LOCKING_ID, new_system_id(), AGENT, accept_batch=False)
    assert "accept" not in json.loads(request.to_json())  # signed bytes unchanged for them
    parsed = CheckinRequest.from_json(request.to_json())
    assert parsed.accept == ""
    parsed.authenticate(AGENT.public.to_base64(), b"")


def test_checkin_request_names_the_revision_in_force_under_its_mac() -> None:
    checkin_key = bytes(32)
    request = CheckinRequest.create(KEY, LOCKING_ID, new_system_id(), AGENT, checkin_key, revision=3)
    body = json.loads(request.to_json())
    assert body["revision"] == 3
    parsed = CheckinRequest.from_json(request.to_json())
    assert parsed.revision == 3
    parsed.authenticate(AGENT.public.to_base64(), checkin_key)
    body["revision"] = 4  # changed on the way: the MAC no longer fits
    with pytest.raises(SignatureError):
        CheckinRequest.from_json(json.dumps(body)).authenticate(AGENT.public.to_base64(), checkin_key)
    # Without a license in force (0) the field is left out, as older agents leave it out.
    none_held = CheckinRequest.create(KEY, LOCKING_ID, new_system_id(), AGENT, checkin_key)
    assert "revision" not in json.loads(none_held.to_json())
    assert CheckinRequest.from_json(none_held.to_json()).revision == 0


@pytest.mark.parametrize("value", [0, -1, "3", True, 3.0, None, 10**12, [3]])
def test_a_malformed_revision_is_named(value: object) -> None:
    body = json.loads(CheckinRequest.create(KEY, LOCKING_ID, new_system_id(), AGENT, bytes(32)).to_json())
    body["revision"] = value
    with pytest.raises(FormatError, match="'revision'"):
        CheckinRequest.from_json(json.dumps(body))


def test_a_revision_out_of_range_is_not_made() -> None:
    with pytest.raises(ValueError, match="revision"):
        CheckinRequest.create(KEY, LOCKING_ID, new_system_id(), AGENT, revision=-1)

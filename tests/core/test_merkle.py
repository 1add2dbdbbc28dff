"""Batch-signed server responses: every answer verifies alone, nothing else does."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tessera.core import Keyring, SigningKey
from tessera.core.errors import FormatError, SignatureError, VerificationError
from tessera.core.merkle import MAX_DEPTH, ROOT_CONTEXT, leaf_hash, root_from_path, tree
from tessera.core.protocol import ServerResponse, canonical_json, new_nonce, sign_batch

VENDOR = SigningKey.from_raw(bytes(range(32)))
OTHER = SigningKey.from_raw(bytes(range(1, 33)))
KEYRING = Keyring([VENDOR.public])


def answers(n: int) -> list[ServerResponse]:
    at = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
    return [ServerResponse("checkin", new_nonce(), at, f"2026-{i:06d}") for i in range(n)]


@given(st.lists(st.binary(max_size=40), min_size=1, max_size=70))
def test_every_leaf_leads_to_the_root(messages: list[bytes]) -> None:
    leaves = [leaf_hash(m) for m in messages]
    root, paths = tree(leaves)
    for index, (leaf, path) in enumerate(zip(leaves, paths, strict=True)):
        assert root_from_path(leaf, index, path) == root
        if len(leaves) > 1:  # another position, or a neighbour's path: another root
            other = (index + 1) % len(leaves)
            assert root_from_path(leaf, other, path) != root or leaves[other] == leaf
            assert root_from_path(leaf, index, paths[other]) != root or paths[other] == path


def test_an_inner_node_is_no_leaf() -> None:
    """The second-preimage trick: present an inner node as an answer one level up."""
    leaves = [leaf_hash(bytes([i])) for i in range(4)]
    root, paths = tree(leaves)
    inner_path = paths[0][32:]  # the path above the pair (0, 1)
    pair = paths[1][:32]
    assert root_from_path(leaf_hash(leaves[0] + pair), 0, inner_path) != root


@pytest.mark.parametrize(
    ("index", "path"),
    [(0, b"x" * 31), (2, b"x" * 32), (-1, b""), (1, b""), (0, b"x" * 32 * (MAX_DEPTH + 1))],
)
def test_paths_no_tree_makes_are_refused(index: int, path: bytes) -> None:
    with pytest.raises(ValueError):
        root_from_path(leaf_hash(b"a"), index, path)


def test_batch_signed_answers_verify_each_on_its_own() -> None:
    batch = answers(5)
    for response, body in zip(batch, sign_batch(batch, VENDOR), strict=True):
        got = ServerResponse.from_json(body, KEYRING, response.nonce)
        assert got.serial == response.serial and got.batch_path is not None
        assert got.to_json() == body  # what the agent keeps reads back the same


def test_one_signature_covers_the_batch_and_nothing_alone() -> None:
    batch = answers(3)
    bodies = [json.loads(b) for b in sign_batch(batch, VENDOR)]
    assert len({b["signature"] for b in bodies}) == 1
    root = tree([leaf_hash(canonical_json(r.payload())) for r in batch])[0]
    assert VENDOR.public.verify(base64.b64decode(bodies[0]["signature"]), ROOT_CONTEXT + root)
    # Without its path the signature fits no answer: it was made over the root, not the answer.
    alone = {k: v for k, v in bodies[0].items() if not k.startswith("batch_")}
    with pytest.raises(SignatureError):
        ServerResponse.from_json(json.dumps(alone), KEYRING, batch[0].nonce)


def _tampered(change: Any) -> None:
    batch = answers(4)
    bodies = [json.loads(b) for b in sign_batch(batch, VENDOR)]
    body = change(bodies)
    ServerResponse.from_json(json.dumps(body), KEYRING, batch[0].nonce)


@pytest.mark.parametrize(
    "change",
    [
        lambda b: {**b[0], "directives": ["lock"]},  # the answer itself
        lambda b: {**b[0], "batch_index": 1},  # another position
        lambda b: {**b[0], "batch_path": b[1]["batch_path"]},  # a neighbour's path
        lambda b: {**b[1], "nonce": b[0]["nonce"]},  # another agent's answer with my nonce
    ],
)
def test_a_changed_batch_answer_is_refused(change: Any) -> None:
    with pytest.raises(SignatureError):
        _tampered(change)


@pytest.mark.parametrize(
    "change",
    [
        lambda b: {k: v for k, v in b[0].items() if k != "batch_index"},
        lambda b: {**b[0], "batch_index": "0"},
        lambda b: {**b[0], "batch_index": True},
        lambda b: {**b[0], "batch_index": 2**40},
        lambda b: {**b[0], "batch_path": "not base64!"},
        lambda b: {**b[0], "batch_path": base64.b64encode(b"x" * 33).decode()},
    ],
)
def test_malformed_batch_fields_are_format_errors(change: Any) -> None:
    with pytest.raises(FormatError):
        _tampered(change)


def test_a_batch_signed_by_another_key_is_refused() -> None:
    batch = answers(2)
    with pytest.raises(VerificationError):
        ServerResponse.from_json(sign_batch(batch, OTHER)[0], KEYRING, batch[0].nonce)

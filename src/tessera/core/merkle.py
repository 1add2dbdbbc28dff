"""One signature for a batch of server responses: a Merkle tree over them (as Roughtime).

A license server answers check-ins in batches (one database transaction each). Signing
every answer costs one Ed25519 signature each, a large share of a check-in's CPU; signing
the root of a hash tree over the batch's answers costs one per batch, and each answer
carries the sibling hashes on its way to the root (a few hundred bytes for a batch of
hundreds). An agent recomputes the root from its own answer and checks the signature over
it: a changed answer, another answer's path or another position gives another root.

Hashes are domain-separated (RFC 6962's idea): leaves, inner nodes and the padding that
fills the tree to a power of two each hash with their own first byte, so no inner node can
pass for a leaf. The signed message starts with :data:`ROOT_CONTEXT`, which holds a NUL
byte, so it can never be the bytes of a signed JSON message or license file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = ["MAX_DEPTH", "ROOT_CONTEXT", "leaf_hash", "root_from_path", "tree"]

#: What the vendor key signs: this, then the 32-byte root.
ROOT_CONTEXT = b"tessera-connect/1 response batch root\x00"
#: Deepest tree an agent accepts (65,536 answers): bounds its work on a hostile answer.
MAX_DEPTH = 16
HASH_SIZE = 32

_LEAF = b"\x00"
_NODE = b"\x01"
_PAD = hashlib.sha256(b"\x02").digest()


def leaf_hash(message: bytes) -> bytes:
    return hashlib.sha256(_LEAF + message).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_NODE + left + right).digest()


def tree(leaves: Sequence[bytes]) -> tuple[bytes, list[bytes]]:
    """The root over ``leaves`` (leaf hashes) and, for each, its path: the sibling hashes
    from the bottom up, concatenated."""
    if not leaves:
        raise ValueError("a batch needs at least one answer")
    size = 1
    while size < len(leaves):
        size *= 2
    if size > 1 << MAX_DEPTH:
        raise ValueError(f"a batch holds at most {1 << MAX_DEPTH} answers")
    level = list(leaves) + [_PAD] * (size - len(leaves))
    paths = [bytearray() for _ in leaves]
    positions = list(range(len(leaves)))
    while len(level) > 1:
        for i, position in enumerate(positions):
            paths[i] += level[position ^ 1]
            positions[i] = position // 2
        level = [_node(level[k], level[k + 1]) for k in range(0, len(level), 2)]
    return level[0], [bytes(p) for p in paths]


def root_from_path(leaf: bytes, index: int, path: bytes) -> bytes:
    """The root ``leaf`` at ``index`` leads to along ``path``; ``ValueError`` for a path
    or index no :func:`tree` makes."""
    if len(path) % HASH_SIZE or len(path) > MAX_DEPTH * HASH_SIZE:
        raise ValueError("batch path has a wrong length")
    depth = len(path) // HASH_SIZE
    if not 0 <= index < 1 << depth:
        raise ValueError("batch index is out of range")
    node = leaf
    for level in range(depth):
        sibling = path[level * HASH_SIZE : (level + 1) * HASH_SIZE]
        node = _node(sibling, node) if index >> level & 1 else _node(node, sibling)
    return node

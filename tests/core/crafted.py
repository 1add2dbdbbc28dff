"""Requests no honest agent makes, built with libsodium's point arithmetic."""

from __future__ import annotations

import base64
import hashlib
import json
import os

from nacl import bindings as sodium

from tessera.core.protocol import ActivationRequest, canonical_json, new_nonce

#: The point (0, -1) of Ed25519: order 2.
ORDER_TWO = (2**255 - 20).to_bytes(32, "little")


def mixed_order_activation(request: ActivationRequest) -> bytes:
    """``request`` with its agent key replaced by one with a small-order part (``aB + T``,
    ``T`` of order 2), signed so that libsodium verifies it: cofactorless verification
    accepts such a signature whenever its challenge is even, so new nonces are tried
    until one is. The bytes of the request, as an agent would send them."""
    a = sodium.crypto_core_ed25519_scalar_reduce(os.urandom(64))
    key = sodium.crypto_core_ed25519_add(sodium.crypto_scalarmult_ed25519_base_noclamp(a), ORDER_TWO)
    obj = json.loads(request.to_json())
    obj["agent_key"] = base64.b64encode(key).decode("ascii")
    for _ in range(200):
        obj["nonce"] = new_nonce()
        message = canonical_json({k: v for k, v in obj.items() if k != "signature"})
        r = sodium.crypto_core_ed25519_scalar_reduce(os.urandom(64))
        big_r = sodium.crypto_scalarmult_ed25519_base_noclamp(r)
        h = sodium.crypto_core_ed25519_scalar_reduce(hashlib.sha512(big_r + key + message).digest())
        signature = big_r + sodium.crypto_core_ed25519_scalar_add(
            r, sodium.crypto_core_ed25519_scalar_mul(h, a)
        )
        try:
            sodium.crypto_sign_open(signature + message, key)
        except Exception:
            continue
        obj["signature"] = base64.b64encode(signature).decode("ascii")
        return canonical_json(obj)
    raise AssertionError("no even challenge in 200 tries")

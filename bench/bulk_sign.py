"""Bulk issue: licenses rendered and signed per second, extrapolated to 100,000.

SPEC section 7 wants 100,000 licenses issued in one bulk run in under a minute. Signing is
the floor of that cost (storage comes on top: the ``bulk issue`` rows measure it
through the real server, bench/bulk_issue.py), so the baseline is the raw Ed25519 sign
rate on the same body (PyNaCl's SigningKey.sign, the library the product signs with): the
ratio shows what building and rendering cost.
"""

from __future__ import annotations

import itertools

import nacl.signing

from bench.harness import Context, Row, benchmark, compare
from bench.samples import sample_license
from tessera.core import SigningKey, sign_document
from tessera.core.fileformat import serialize_body

BULK = 100_000
TARGET_SECONDS = 60.0


@benchmark("bulk-sign")
def bulk_sign(ctx: Context) -> list[Row]:
    """build, render and sign licenses with core vs raw Ed25519 sign"""
    key = SigningKey.generate()
    raw_key = nacl.signing.SigningKey(key.to_raw())
    body = serialize_body(sample_license()).encode("utf-8")
    serials = (f"2026-{n:06d}" for n in itertools.count(1))
    seconds = ctx.budget(2.0, 8.0)

    # A new License per call: the bulk run builds (and validates) each document, it does
    # not re-sign one object.
    full, raw, ratio = compare(
        lambda: sign_document(sample_license(next(serials)), key), lambda: raw_key.sign(body), seconds
    )
    projected = BULK / full
    return [
        Row("bulk sign (build+render+sign)", full, "licenses/s", "raw Ed25519 sign", raw, paired_ratio=ratio),
        Row(
            f"bulk sign: {BULK:,} licenses",
            projected,
            "s (projected)",
            target=f"< {TARGET_SECONDS:.0f} s",
            passed=projected < TARGET_SECONDS,
            note="signing only, storage not included",
        ),
    ]

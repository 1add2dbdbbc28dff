"""``tessera license sign`` and ``tessera license verify``: licenses without a server."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from tessera.cli._common import (
    EXIT_DENIED,
    FORCE,
    check_writable,
    cli_path,
    console,
    emit_json,
    fail,
    read_input_file,
    write_file_atomic,
)
from tessera.cli.apps import license_app
from tessera.cli.keys import load_keyring, load_signing_key
from tessera.core import sign_document
from tessera.core.errors import (
    BindingError,
    DecryptionError,
    FormatError,
    SignatureError,
    UnknownKeyError,
    VerificationError,
    VersionError,
)
from tessera.core.fileformat import SignedDocument, parse
from tessera.core.model import Identity, License
from tessera.core.sealing import seal, unseal
from tessera.core.spec import load_spec
from tessera.core.verify import check_binding, check_version, expired_features, verify_signature


@license_app.command("sign")
def sign(
    spec: Path = typer.Argument(
        ..., help="License spec (TOML), see docs/license-format.md.", parser=cli_path
    ),
    key: Path = typer.Option(..., "--key", help="vendor.key, or the directory holding it.", parser=cli_path),
    out: Path = typer.Option(
        ..., "-o", "--out", help="Where to write the signed license file.", parser=cli_path
    ),
    seal_with: str | None = typer.Option(
        None, "--seal", metavar="LICENSE_KEY", help="Encrypt the entitlements to this license key."
    ),
    force: bool = FORCE,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Sign a license from a spec file with an offline vendor key."""
    check_writable(out, force=force)  # before the passphrase is asked for
    text = read_input_file(spec, "license spec")
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError:
        fail(f"license spec {spec} is not UTF-8 text")
    lic = load_spec(decoded, datetime.now(UTC))
    signing_key = load_signing_key(key)
    if seal_with is not None:
        try:
            lic = seal(lic, seal_with)
        except VerificationError as exc:
            fail(f"--seal: {exc}")
    write_file_atomic(out, sign_document(lic, signing_key).encode("utf-8"), force=force)
    if as_json:
        emit_json({"serial": lic.serial, "file": str(out), "key_id": signing_key.key_id})
    else:
        console.print(f"signed license {lic.serial} for {lic.licensee} -> {out}")


def _describe(signed: SignedDocument, lic_view: License | None) -> dict[str, Any]:
    doc = signed.document
    info: dict[str, Any] = {
        "kind": signed.kind,
        "serial": doc.serial,
        "licensee": doc.licensee,
        "product": doc.product,
        "version": str(doc.version),
        "key_id": signed.key_id,
    }
    if isinstance(doc, Identity):
        info.update(location=doc.location, instance_id=doc.instance_id)
        return info
    info.update(binding=doc.binding.value, revision=doc.revision, sealed=doc.sealed is not None)
    if lic_view is not None and lic_view.locations:
        info["locations"] = {
            loc.name: {
                e.feature: {
                    "count": e.count,
                    "expiry": "permanent" if e.expiry is None else e.expiry.isoformat(),
                }
                for e in loc.entitlements
            }
            for loc in lic_view.locations
        }
    return info


#: The verdicts of docs/license-format.md ("Verdicts"), by the error that decides them.
_VERDICTS: dict[type[VerificationError], str] = {
    UnknownKeyError: "unknown-key",
    SignatureError: "bad-signature",
    DecryptionError: "decryption",
    BindingError: "wrong-binding",
    VersionError: "wrong-version",
}


@license_app.command("verify")
def verify(
    file: Path = typer.Argument(..., help="A license (.lic) or identity (.par) file.", parser=cli_path),
    vendor_key: Path = typer.Option(
        None,
        "--vendor-key",
        envvar="TESSERA_VENDOR_KEY",
        help="Vendor keyring (vendor.pub).",
        parser=cli_path,
    ),
    locking_id: str | None = typer.Option(
        None, "--locking-id", help="Also check the binding against this Locking ID."
    ),
    product_version: str | None = typer.Option(
        None, "--product-version", help="Also check the licensed version range."
    ),
    license_key: str | None = typer.Option(
        None, "--license-key", help="Open sealed entitlements with this license key."
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Check a license file's signature (and binding): exit 0 valid, 1 rejected, 2 unreadable."""
    if vendor_key is None:
        fail("--vendor-key is required (or set TESSERA_VENDOR_KEY)")
    keyring = load_keyring(vendor_key)
    data = read_input_file(file, "license file")
    try:
        signed = parse(data)
    except FormatError as exc:
        if not as_json:
            raise
        # The documented verdict, as one JSON object; the error line still goes to stderr.
        emit_json({"verdict": "malformed", "reason": exc.reason, "line": exc.line})
        fail(str(exc))
    verdict = "valid"
    reason = ""
    lic_view: License | None = None
    try:
        # In the order docs/license-format.md gives: the first failing check is the verdict.
        verify_signature(signed, keyring)
        doc = signed.document
        if isinstance(doc, License):
            lic_view = doc
            if doc.sealed is not None and license_key is not None:
                lic_view = unseal(doc, license_key)
            if locking_id is not None:
                check_binding(doc, locking_id)
        elif locking_id is not None:
            raise BindingError("an identity file is not bound to a Locking ID")
        if product_version is not None:
            check_version(doc, product_version)
        if lic_view is not None and lic_view.locations:
            report = expired_features(lic_view, datetime.now(UTC).date())
            if not report.valid:
                verdict, reason = "expired", "every entitlement has expired"
    except VerificationError as exc:
        verdict, reason = _VERDICTS.get(type(exc), "rejected"), str(exc)

    info = _describe(signed, lic_view)
    info["verdict"] = verdict
    if reason:
        info["reason"] = reason
    if as_json:
        emit_json(info)
    else:
        table = Table(show_header=False, box=None)
        for k in ("kind", "serial", "licensee", "product", "version", "binding", "key_id"):
            if k in info:
                table.add_row(k, str(info[k]))
        for loc, features in info.get("locations", {}).items():
            for feature, ent in features.items():
                table.add_row(f"{loc}/{feature}", f"{ent['count']}, {ent['expiry']}")
        console.print(table)
        console.print(f"verdict: {verdict}" + (f" ({reason})" if reason else ""))
    if verdict != "valid":
        if not as_json:
            from tessera.cli._common import err_console

            err_console.print(f"error: {reason}", markup=False)
        raise typer.Exit(EXIT_DENIED)

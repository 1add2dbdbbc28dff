"""``tessera keys``: offline vendor key pairs."""

from __future__ import annotations

from pathlib import Path

import typer

from tessera.cli._common import cli_path, console, emit_json, fail, read_passphrase, write_file_atomic
from tessera.cli.apps import keys_app
from tessera.core.signing import Keyring, SigningKey

PRIVATE_NAME = "vendor.key"
PUBLIC_NAME = "vendor.pub"


@keys_app.command("generate")
def generate(
    out: Path = typer.Option(
        ..., "-o", "--out", help="Directory for vendor.key and vendor.pub.", parser=cli_path
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing key pair."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Make a new Ed25519 vendor key pair: vendor.key (encrypted) and vendor.pub (keyring)."""
    private = out / PRIVATE_NAME
    public = out / PUBLIC_NAME
    if not force:
        for file in (private, public):  # both, before anything is written
            if file.exists() or file.is_symlink():
                fail(f"{file} exists already (use --force to replace it)")
    passphrase = read_passphrase(confirm=True)
    key = SigningKey.generate()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"cannot create {out}: {exc.strerror}")
    write_file_atomic(private, key.to_pem(passphrase), mode=0o600, force=force)
    write_file_atomic(public, Keyring([key.public]).dumps().encode("ascii"), force=force)
    if as_json:
        emit_json({"key_id": key.key_id, "private_key": str(private), "public_key": str(public)})
    else:
        console.print(f"key id      {key.key_id}")
        console.print(f"private key {private} (encrypted)")
        console.print(f"public key  {public} (ship this keyring with the product)")


def load_signing_key(path: Path) -> SigningKey:
    """``path`` is a vendor.key file or a directory holding one."""
    from tessera.cli._common import read_input_file

    file = path / PRIVATE_NAME if path.is_dir() else path
    data = read_input_file(file, "private key")
    return SigningKey.from_pem(data, read_passphrase())


def load_keyring(path: Path) -> Keyring:
    from tessera.cli._common import read_input_file

    file = path / PUBLIC_NAME if path.is_dir() else path
    return Keyring.loads(read_input_file(file, "vendor keyring"))

"""Files the CLI writes with -o: complete or not there at all, and never written over an
existing file unless --force (a signed license, a response, a backup or a credential
replaced by mistake is lost work)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tessera.cli._common import CliError, write_file_atomic
from tessera.core import Keyring, SigningKey

from .test_offline_license import SPEC

Run = Callable[..., subprocess.CompletedProcess[str]]


def test_an_existing_file_is_kept_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "license.lic"
    out.write_text("the earlier license")
    with pytest.raises(CliError, match="exists already"):
        write_file_atomic(out, b"new")
    assert out.read_text() == "the earlier license"
    write_file_atomic(out, b"new", force=True)
    assert out.read_text() == "new"
    write_file_atomic(tmp_path / "fresh.lic", b"fresh", mode=0o600)
    assert (tmp_path / "fresh.lic").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.lic", "license.lic"]  # no temporary left


def test_a_write_that_fails_half_way_leaves_no_half_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "backup.bin"
    real_write = os.write

    def half_then_full_disk(fd: int, data: bytes | memoryview) -> int:
        if len(data) > 10:
            return real_write(fd, bytes(data[:10]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full_disk)
    for force in (False, True):
        with pytest.raises(CliError, match="No space left on device"):
            write_file_atomic(out, b"x" * 100, force=force)
        assert list(tmp_path.iterdir()) == []
    out.write_text("old backup")
    with pytest.raises(CliError):
        write_file_atomic(out, b"x" * 100, force=True)
    assert out.read_text() == "old backup" and list(tmp_path.iterdir()) == [out]


def test_a_file_system_without_hard_links_still_never_replaces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(src: object, dst: object) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    write_file_atomic(tmp_path / "a.lic", b"first")
    with pytest.raises(CliError, match="exists already"):
        write_file_atomic(tmp_path / "a.lic", b"second")
    assert (tmp_path / "a.lic").read_bytes() == b"first" and len(list(tmp_path.iterdir())) == 1


def test_license_sign_keeps_an_existing_file_unless_forced(tessera: Run, tmp_path: Path) -> None:
    keys = tessera("keys", "generate", "-o", "keys")
    assert keys.returncode == 0, keys.stderr
    lid = tessera("agent", "locking-id", "--product", "cortex").stdout.strip()
    (tmp_path / "spec.toml").write_text(SPEC.format(lid=lid))
    (tmp_path / "out.lic").write_text("a license signed earlier")
    refused = tessera("license", "sign", "spec.toml", "--key", "keys", "-o", "out.lic",
                      env={"TESSERA_KEY_PASSPHRASE": ""})  # fmt: skip
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert "out.lic exists already (use --force to replace it)" in lines[0]  # before the passphrase
    assert (tmp_path / "out.lic").read_text() == "a license signed earlier"
    forced = tessera("license", "sign", "spec.toml", "--key", "keys", "-o", "out.lic", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "serial = 2026-000123" in (tmp_path / "out.lic").read_text()
    again = tessera("keys", "generate", "-o", "keys")
    assert again.returncode == 2 and "exists already" in again.stderr


def test_agent_request_and_backup_keep_an_existing_file(tessera: Run, tmp_path: Path) -> None:
    pub = tmp_path / "vendor.pub"
    pub.write_text(Keyring([SigningKey.generate().public]).dumps())
    env = {"TESSERA_VENDOR_KEY": str(pub), "TESSERA_AGENT_DIR": str(tmp_path / "state")}
    key = "K7QXM-AAAAA-AAAAA-AAAAA-AAAAA"
    (tmp_path / "req.json").write_text("an earlier request")
    refused = tessera("agent", "request", "--key", key, "-o", "req.json", env=env)
    assert refused.returncode == 2 and "req.json exists already" in refused.stderr
    assert not (tmp_path / "state").exists()  # refused before the installation was set up
    made = tessera("agent", "request", "--key", key, "-o", "req.json", "--force", env=env)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "req.json").read_text().startswith("{")
    (tmp_path / "bk").write_text("last week's backup")
    for kind in ("--with-license", "--without-license"):
        kept = tessera("agent", "backup", kind, "-o", "bk", env=env)
        assert kept.returncode == 2 and "bk exists already" in kept.stderr
    assert (tmp_path / "bk").read_text() == "last week's backup"
    assert tessera("agent", "backup", "--without-license", "-o", "bk", "--force", env=env).returncode == 0

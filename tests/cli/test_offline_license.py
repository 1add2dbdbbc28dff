"""The foundation's journey from the outside: keys, sign, verify, Locking ID."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import assert_one_line_error

SPEC = """\
licensee = "myCompany, City"
serial = "2026-000123"
product = "cortex"
version = "4.*"
locking-id = "{lid}"
emergency = ["ctxjs"]

[locations.abc]
backup = "1, 2099-01-15"
uniplex = {{ count = 5, expiry = 2099-01-15 }}
ctxjs = 1
"""


def make_license(tessera, tmp_path: Path) -> tuple[Path, str]:  # type: ignore[no-untyped-def]
    tessera("keys", "generate", "-o", "keys", check=True)
    lid = tessera("agent", "locking-id", "--product", "cortex", check=True).stdout
    assert lid.count("\n") == 1 and lid.startswith("TL1-")
    lid = lid.strip()
    (tmp_path / "spec.toml").write_text(SPEC.format(lid=lid))
    tessera("license", "sign", "spec.toml", "--key", "keys", "-o", "a.lic", check=True)
    return tmp_path / "a.lic", lid


def test_sign_and_verify_journey(tessera, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _lic, lid = make_license(tessera, tmp_path)
    assert "ENCRYPTED" in (tmp_path / "keys/vendor.key").read_text()

    ok = tessera("license", "verify", "a.lic", "--vendor-key", "keys/vendor.pub", "--json")
    assert ok.returncode == 0, ok.stderr
    info = json.loads(ok.stdout)
    assert info["verdict"] == "valid" and info["serial"] == "2026-000123"
    assert info["locations"]["abc"]["uniplex"] == {"count": 5, "expiry": "2099-01-15"}

    here = tessera("license", "verify", "a.lic", "--vendor-key", "keys/vendor.pub", "--locking-id", lid)
    assert here.returncode == 0, here.stderr

    other = tessera("agent", "locking-id", "--product", "other-product", check=True).stdout.strip()
    elsewhere = tessera(
        "license", "verify", "a.lic", "--vendor-key", "keys/vendor.pub", "--locking-id", other
    )
    assert elsewhere.returncode == 1
    assert "another machine" in elsewhere.stderr


def test_flipped_byte_in_signed_part_is_rejected(tessera, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lic, _ = make_license(tessera, tmp_path)
    data = bytearray(lic.read_bytes())
    at = data.index(b"uniplex = 5") + len(b"uniplex = ")
    data[at] = ord("6")
    (tmp_path / "b.lic").write_bytes(bytes(data))
    result = tessera("license", "verify", "b.lic", "--vendor-key", "keys/vendor.pub")
    assert result.returncode == 1
    assert "altered or forged" in result.stderr
    assert "Traceback" not in result.stderr


def test_garbage_file_gets_one_line_error(tessera, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tessera("keys", "generate", "-o", "keys", check=True)
    (tmp_path / "garbage.lic").write_bytes(bytes(range(256)) * 4)
    assert_one_line_error(tessera("license", "verify", "garbage.lic", "--vendor-key", "keys/vendor.pub"), 2)
    (tmp_path / "text.lic").write_text("[LICENSE]\nformat = tessera/1\nlicensee = x\n")
    result = tessera("license", "verify", "text.lic", "--vendor-key", "keys/vendor.pub")
    assert_one_line_error(result, 2)
    assert "missing [SIGNATURE]" in result.stderr
    assert_one_line_error(tessera("license", "verify", "missing.lic", "--vendor-key", "keys/vendor.pub"), 2)
    assert_one_line_error(tessera("license", "verify", "text.lic", "--vendor-key", "text.lic"), 2)


def test_usage_errors_are_one_line_exit_2(tessera) -> None:  # type: ignore[no-untyped-def]
    assert_one_line_error(tessera("license", "verify"), 2)
    assert_one_line_error(tessera("license", "verify", "x.lic", "--bogus"), 2)
    assert tessera("--help").returncode == 0


def test_keys_generate_needs_a_passphrase_without_a_terminal(tessera) -> None:  # type: ignore[no-untyped-def]
    result = tessera("keys", "generate", "-o", "k2", env={"TESSERA_KEY_PASSPHRASE": ""})
    assert_one_line_error(result, 2)
    assert "TESSERA_KEY_PASSPHRASE is set but empty" in result.stderr


def test_wrong_passphrase_is_one_line(tessera, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    make_license(tessera, tmp_path)
    result = tessera(
        "license", "sign", "spec.toml", "--key", "keys", "-o", "c.lic", env={"TESSERA_KEY_PASSPHRASE": "nope"}
    )
    assert_one_line_error(result, 2)
    assert "passphrase" in result.stderr


def test_bad_spec_is_one_line(tessera, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tessera("keys", "generate", "-o", "keys", check=True)
    (tmp_path / "bad.toml").write_text('licensee = "x"\nserial = "1"\nproduct = "p"\nversion = "4.*"\n')
    assert_one_line_error(tessera("license", "sign", "bad.toml", "--key", "keys", "-o", "x.lic"), 2)
    (tmp_path / "bad2.toml").write_text("this is = not toml [")
    assert_one_line_error(tessera("license", "sign", "bad2.toml", "--key", "keys", "-o", "x.lic"), 2)


def test_vectors_through_the_cli(tessera) -> None:  # type: ignore[no-untyped-def]
    vectors = Path(__file__).parent.parent / "vectors"
    pub = str(vectors / "vendor.pub")
    assert (
        tessera("license", "verify", str(vectors / "valid-identity.par"), "--vendor-key", pub).returncode == 0
    )
    assert (
        tessera("license", "verify", str(vectors / "tampered-count.lic"), "--vendor-key", pub).returncode == 1
    )
    assert tessera("license", "verify", str(vectors / "wrong-key.lic"), "--vendor-key", pub).returncode == 1
    assert tessera("license", "verify", str(vectors / "expired.lic"), "--vendor-key", pub).returncode == 1
    bad = tessera("license", "verify", str(vectors / "malformed-date.lic"), "--vendor-key", pub)
    assert_one_line_error(bad, 2)
    assert "line 17" in bad.stderr


def test_lax_spec_values_are_refused_not_signed(tessera, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tessera("keys", "generate", "-o", "keys", check=True)
    lid = tessera("agent", "locking-id", "--product", "cortex", check=True).stdout.strip()
    cases = [
        ('connect = "off"\n', "'connect' must be true or false"),
        ('emergency = "ctxjs"\n', "'emergency' must be a list"),
        ('emergency = ["ctxjs", "nope"]\n', "does not grant: nope"),
    ]
    for line, needle in cases:
        spec = SPEC.format(lid=lid).replace('emergency = ["ctxjs"]\n', line)
        (tmp_path / "lax.toml").write_text(spec)
        result = tessera("license", "sign", "lax.toml", "--key", "keys", "-o", "lax.lic")
        assert needle in assert_one_line_error(result, 2)
        assert not (tmp_path / "lax.lic").exists()
    spec = SPEC.format(lid=lid).replace('backup = "1, 2099-01-15"', 'backup = "1, 20990115"')
    (tmp_path / "lax.toml").write_text(spec)
    result = tessera("license", "sign", "lax.toml", "--key", "keys", "-o", "lax.lic")
    assert "YYYY-MM-DD" in assert_one_line_error(result, 2)


VERDICT_CASES = [
    c
    for c in json.loads((Path(__file__).parent.parent / "vectors" / "verdicts.json").read_text())
    if c["verdict"] not in ("valid", "expired")  # those two depend on the day of the check
]


@pytest.mark.parametrize("case", VERDICT_CASES, ids=lambda c: f"{c['file']}-{c['verdict']}")
def test_verify_json_reports_the_documented_verdict(tessera, case: dict[str, object]) -> None:  # type: ignore[no-untyped-def]
    # Unknown key, bad signature and wrong binding all used to be "rejected".
    vectors = Path(__file__).parent.parent / "vectors"
    pub = str(vectors / "vendor.pub")
    args = ["license", "verify", str(vectors / str(case["file"])), "--vendor-key", pub]
    for option in ("locking_id", "license_key"):
        if option in case:
            args += ["--" + option.replace("_", "-"), str(case[option])]
    result = tessera(*args, "--json")
    info = json.loads(result.stdout)
    assert info["verdict"] == case["verdict"], info
    assert result.returncode == (2 if case["verdict"] == "malformed" else 1)
    if "line" in case:
        assert info["line"] == case["line"]


def test_verify_json_wrong_version(tessera, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    make_license(tessera, tmp_path)
    result = tessera(
        "license", "verify", "a.lic", "--vendor-key", "keys/vendor.pub", "--product-version", "5.0", "--json"
    )
    assert result.returncode == 1 and json.loads(result.stdout)["verdict"] == "wrong-version"

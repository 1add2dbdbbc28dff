"""SoftHSM 2 tokens for the HSM tests: a real PKCS#11 module, tokens in a scratch directory.

``TESSERA_TEST_SOFTHSM`` names the module (``.ci/run`` sets it and installs Debian's
``softhsm2``); when it is set and the module is missing the tests fail. Without it they use
Debian's path if SoftHSM is installed, else they are skipped with the reason.

A process loads a PKCS#11 module once and sees the tokens that existed then: every token
lives in one directory per test process (``SOFTHSM2_CONF`` is set for the whole process,
and passed on to ``tessera`` subprocesses), and the library is initialized again after a
new token is made.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

SOFTHSM_ENV = "TESSERA_TEST_SOFTHSM"
DEBIAN_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")

_tokens_dir: Path | None = None


@dataclass(frozen=True)
class Token:
    module: Path
    label: str
    pin: str
    conf: Path  # SOFTHSM2_CONF for subprocesses


def softhsm_module() -> Path:
    named = os.environ.get(SOFTHSM_ENV)
    if named:
        if not Path(named).is_file() or shutil.which("softhsm2-util") is None:
            pytest.fail(f"{SOFTHSM_ENV}={named} but SoftHSM 2 is not installed (Debian package softhsm2)")
        return Path(named)
    if DEBIAN_MODULE.is_file() and shutil.which("softhsm2-util") is not None:
        return DEBIAN_MODULE
    pytest.skip("SoftHSM 2 is not installed (Debian package softhsm2; .ci/run installs it)")


def _conf() -> Path:
    global _tokens_dir
    if _tokens_dir is None:
        _tokens_dir = Path(tempfile.mkdtemp(prefix="tessera-softhsm-"))
        (_tokens_dir / "tokens").mkdir()
        tokens = _tokens_dir / "tokens"
        (_tokens_dir / "softhsm2.conf").write_text(
            f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
        )
        os.environ["SOFTHSM2_CONF"] = str(_tokens_dir / "softhsm2.conf")
    return _tokens_dir / "softhsm2.conf"


def new_token() -> Token:
    """A freshly initialized token with a PIN of its own, visible to this process."""
    module = softhsm_module()
    conf = _conf()
    label = f"t-{secrets.token_hex(4)}"
    pin = secrets.token_hex(4)
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", pin + "so"],
        check=True,
        capture_output=True,
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
        timeout=60,
    )
    import pkcs11

    pkcs11.lib(str(module)).reinitialize()  # so this process sees the new token
    return Token(module, label, pin, conf)

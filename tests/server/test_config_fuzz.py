"""Property: whatever ``tessera.toml`` (or a relay's ``relay.toml``) holds, loading it is a
config or a ``ConfigError`` (one line for ``server run`` or ``relay run`` to print), never a
traceback."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from tessera.server.config import ConfigError, load_config
from tessera.server.relay import RelayConfig, load_relay_config
from tessera.server.storage import Database

VALID = (
    '[server]\ndatabase = "sqlite:///x.db"\n\n[interfaces]\nadmin_api = true\noffline_activation = false\n'
    "web_portal = true\nmetrics = false\n"
    '\n[web_portal]\ntwo_step_roles = ["admin", "support"]\n'
    '\n[hsm]\nmodule = "/usr/lib/softhsm/libsofthsm2.so"\ntoken = "tessera"\nkey = "tessera-vendor"\n'
)
VALID_RELAY = '[relay]\nupstream = "https://core.internal:7790"\ntimeout_seconds = 10.0\n'
CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"

toml_values = st.one_of(
    st.booleans(),
    st.integers(),
    st.just('["admin", "nobody"]'),
    st.just("[]"),
    st.text(max_size=30).map(lambda t: '"' + t.replace("\\", "\\\\").replace('"', '\\"') + '"'),
    st.just("[1, 2]"),
    st.just("{ a = 1 }"),
)


@given(st.data())
def test_any_config_file_loads_or_is_a_config_error(data: st.DataObject) -> None:
    lines = VALID.split("\n")
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(lines) - 1))
        if data.draw(st.booleans()):
            keys = [
                "database",
                "admin_api",
                "offline_activation",
                "web_portal",
                "metrics",
                "module",
                "token",
                "key",
                "two_step_roles",
                "x",
            ]
            key = data.draw(st.sampled_from(keys))
            lines[i] = f"{key} = {data.draw(toml_values)}"
        else:
            lines[i] = data.draw(st.text(max_size=40))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tessera.toml").write_text("\n".join(lines), encoding="utf-8", errors="replace")
        try:
            config = load_config(Path(tmp))
        except ConfigError:
            return
        assert isinstance(config.database, str)


@given(st.data())
def test_any_relay_config_file_loads_or_is_a_config_error(data: st.DataObject) -> None:
    lines = VALID_RELAY.split("\n")
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(lines) - 1))
        if data.draw(st.booleans()):
            key = data.draw(st.sampled_from(["upstream", "timeout_seconds", "x"]))
            lines[i] = f"{key} = {data.draw(toml_values)}"
        else:
            lines[i] = data.draw(st.text(max_size=40))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "relay.toml").write_text("\n".join(lines), encoding="utf-8", errors="replace")
        (Path(tmp) / "upstream-ca.pem").write_text(CA_PEM)
        try:
            config = load_relay_config(Path(tmp))
        except ConfigError as exc:
            assert "\n" not in str(exc).strip()
            return
        assert isinstance(config, RelayConfig)
        assert config.upstream.startswith("https://")
        assert 0.1 <= config.timeout_seconds <= 300


@given(st.text(max_size=80))
def test_any_database_url_is_a_database_or_a_value_error(url: str) -> None:
    try:
        db = Database(url)
    except ValueError:
        return
    db.dispose()


def test_two_step_roles_are_roles(tmp_path: Path) -> None:
    base = VALID.split("\n[hsm]")[0]
    (tmp_path / "tessera.toml").write_text(base)
    assert load_config(tmp_path).two_step_roles == ("admin", "support")
    (tmp_path / "tessera.toml").write_text(base.replace("[web_portal]\n", "").replace("two_step_roles", "#"))
    assert load_config(tmp_path).two_step_roles == ("admin",)  # the default
    (tmp_path / "tessera.toml").write_text(base.replace('["admin", "support"]', "[]"))
    assert load_config(tmp_path).two_step_roles == ()
    for wrong in ('["admin", "root"]', '"admin"', "[1]"):
        (tmp_path / "tessera.toml").write_text(base.replace('["admin", "support"]', wrong))
        try:
            load_config(tmp_path)
        except ConfigError as exc:
            assert "[web_portal] two_step_roles must be a list of roles (admin, support" in str(exc)
        else:
            raise AssertionError(f"{wrong} was taken")


def test_the_known_role_names_are_the_tokens_roles() -> None:
    from tessera.server.config import ROLE_NAMES
    from tessera.server.tokens import Role

    assert tuple(role.value for role in Role) == ROLE_NAMES

"""Property: whatever mix of machines, reinstalls and re-activations arrives, the license
never binds more machines than sold, slots stay unique, and every installation that got a
license can check in with the key it registered last."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from tessera.core.signing import Keyring
from tessera.server import activation
from tessera.server.app import ServerState
from tessera.server.errors import Forbidden
from tessera.server.models import LicenseRow, Machine
from tessera.server.tokens import Principal

from .conftest import START
from .helpers import FakeAgent, setup_license

pytestmark = pytest.mark.fuzz  # the @given function is inside the test, not the test itself

EXAMPLES = min(int(os.environ.get("TESSERA_FUZZ_EXAMPLES", "25")), 500)

# (hardware 0-5, installation 0-3 on that hardware, nic swapped?)
events = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3), st.booleans()), min_size=1, max_size=12)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(k=st.integers(1, 4), sequence=events)
def _never_oversold(
    state: ServerState,
    admin: Principal,
    keyring: Keyring,
    k: int,
    sequence: list[tuple[int, int, bool]],
) -> None:
    serial, key = setup_license(state, admin, START, machines=k)
    registered: dict[str, FakeAgent] = {}
    for hardware, install, swapped_nic in sequence:
        facts = [
            ("m", f"mid-{hardware}"),
            ("u", f"uuid-{hardware}"),
            ("n", f"nic-{hardware}-{int(swapped_nic)}"),
            ("c", "cpu"),
        ]
        a = FakeAgent(f"hw{hardware}", f"inst-{hardware}-{install}-xx", facts=facts)
        try:
            with state.db.write() as session:
                activation.activate(session, a.activation(key), START, state.signing_key, state.pepper)
            registered[a.system_id] = a
        except Forbidden as exc:
            assert "no free machine left" in str(exc)
    with state.db.read() as session:
        row = session.execute(select(LicenseRow).where(LicenseRow.serial == serial)).unique().scalar_one()
        machines = session.execute(select(Machine).where(Machine.license_id == row.id)).scalars().all()
        assert len(machines) <= k
        assert len({m.slot for m in machines}) == len(machines) and all(0 <= m.slot < k for m in machines)
        bound = {m.system_id: m.agent_key for m in machines}
    for system_id, agent_key in bound.items():
        a = registered[system_id]
        assert a.key.public.to_base64() == agent_key
        with state.db.write() as session:
            activation.checkin(session, a.checkin(key), START, state.signing_key, state.pepper)


def test_activation_never_oversells_property(state: ServerState, admin: Principal, keyring: Keyring) -> None:
    _never_oversold(state, admin, keyring)

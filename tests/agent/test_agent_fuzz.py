"""Property tests: no input makes the agent raise anything but its documented errors,
and none of them changes the state in force."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable

import httpx
from agent_support import make_license
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tessera.agent import Agent, AgentState, BackupError, BadResponse
from tessera.core import SigningKey, TesseraError

EXAMPLES = int(os.environ.get("TESSERA_FUZZ_EXAMPLES", "150"))
fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@fuzz
@given(data=st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
def test_fuzz_import(open_agent: Callable[..., Agent], vendor: SigningKey, data: bytes) -> None:
    with open_agent() as agent:  # closed per example: `make fuzz` runs thousands
        if agent.status().state is AgentState.UNLICENSED:
            agent.import_license(make_license(vendor, connect=False))
        with contextlib.suppress(TesseraError):
            agent.import_license(data)
        assert agent.check("uniplex")


@fuzz
@given(
    doc=st.fixed_dictionaries(
        {
            "format": st.just("tessera-agent-backup/1"),
            "product": st.just("cortex"),
            "kind": st.sampled_from(["with-license", "without-license", "other"]),
        },
        optional={"sealed": json_values, "settings": json_values, "seats": json_values},
    )
    | json_values
)
def test_fuzz_restore(open_agent: Callable[..., Agent], doc: object) -> None:
    with open_agent() as agent:
        with contextlib.suppress(BackupError, TesseraError):
            agent.restore(json.dumps(doc).encode())
        agent.status()


@fuzz
@given(body=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_fuzz_server_answers(activated: Agent, body: bytes) -> None:
    activated._transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))
    with contextlib.suppress(BadResponse):
        activated.connect()
    assert activated.check("uniplex")

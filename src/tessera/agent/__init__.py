"""The Tessera license agent: embed it in the product, ask it "may feature X be used now?".

::

    from tessera.agent import Agent
    from tessera.core import Keyring

    agent = Agent("/var/lib/myproduct/license", Keyring.loads(VENDOR_PUB), "cortex", "4.2")
    agent.start()                      # Connect check-ins in a background thread
    if agent.check("uniplex"): ...     # ~1 µs, no I/O
    agent.require("backup")            # raises FeatureDenied saying why

See :mod:`tessera.agent.errors` for the exception hierarchy and :mod:`tessera.agent.policy`
for the rules (failover, emergency mode, checkpoint, secure clock).
"""

import logging

from tessera.agent.agent import Agent
from tessera.agent.errors import (
    AgentError,
    BackupError,
    BadResponse,
    ConnectError,
    FeatureDenied,
    NotInstalled,
    SeatError,
    ServerRefused,
    ServerUnreachable,
    StaleBlacklist,
    StateError,
)
from tessera.agent.leasing import Lease, LeaseClient, LeaseError, Released
from tessera.agent.policy import CLOCK_TOLERANCE
from tessera.agent.status import AgentState, AgentStatus, FeatureGrant, FeatureSeats

__all__ = [
    "CLOCK_TOLERANCE",
    "Agent",
    "AgentError",
    "AgentState",
    "AgentStatus",
    "BackupError",
    "BadResponse",
    "ConnectError",
    "FeatureDenied",
    "FeatureGrant",
    "FeatureSeats",
    "Lease",
    "LeaseClient",
    "LeaseError",
    "NotInstalled",
    "Released",
    "SeatError",
    "ServerRefused",
    "ServerUnreachable",
    "StaleBlacklist",
    "StateError",
]

# A library logs, the application decides where to: silence the last-resort stderr handler.
logging.getLogger("tessera.agent").addHandler(logging.NullHandler())

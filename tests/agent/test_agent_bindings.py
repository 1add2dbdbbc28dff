"""Instance binding (.par + .lic), sealed entitlements, locations, product and user binding."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from agent_support import LICENSE_KEY, PRODUCT, START, make_license

from tessera.agent import Agent, AgentState
from tessera.core import (
    BindingError,
    DecryptionError,
    Entitlement,
    Identity,
    License,
    Location,
    SigningKey,
    VerificationError,
    VersionRange,
    seal,
    sign_document,
)
from tessera.core.passwords import hash_secret

INSTANCE = "inst-0001-abcdef"


def _identity(vendor: SigningKey, *, serial: str = "2026-000007", location: str = "main") -> str:
    par = Identity(
        licensee="myCompany, City",
        serial=serial,
        product=PRODUCT,
        version=VersionRange.parse("4.*"),
        location=location,
        instance_id=INSTANCE,
        admin_secret=hash_secret("s3cret-admin"),
        issued=START,
    )
    return sign_document(par, vendor)


def _instance_license(vendor: SigningKey, instance_id: str = INSTANCE) -> str:
    lic = License(
        licensee="myCompany, City",
        serial="2026-000007",
        product=PRODUCT,
        version=VersionRange.parse("4.*"),
        issued=START,
        binding="instance",  # type: ignore[arg-type]
        instance_id=instance_id,
        connect=False,
        locations=(
            Location("backup-site", (Entitlement("backup", 1),)),
            Location("main", (Entitlement("uniplex", 3),)),
        ),
    )
    return sign_document(lic, vendor)


def test_instance_license_needs_its_identity(open_agent: Callable[..., Agent], vendor: SigningKey) -> None:
    agent = open_agent()
    with pytest.raises(BindingError, match="identity file"):
        agent.import_license(_instance_license(vendor))
    agent.import_license(_identity(vendor))
    status = agent.import_license(_instance_license(vendor))
    assert status.state is AgentState.NORMAL and status.location == "main"
    assert agent.check("uniplex") and not agent.check("backup")  # other location's feature
    with pytest.raises(BindingError, match="another instance"):
        agent.import_license(_instance_license(vendor, "inst-9999-zzzzzz"))


def test_identity_of_another_license_is_refused(open_agent: Callable[..., Agent], vendor: SigningKey) -> None:
    agent = open_agent()
    agent.import_license(_identity(vendor))
    agent.import_license(_instance_license(vendor))
    with pytest.raises(VerificationError, match="disagree"):
        agent.import_license(
            sign_document(
                Identity(
                    licensee="Someone Else, Town",
                    serial="2026-000007",
                    product=PRODUCT,
                    version=VersionRange.parse("4.*"),
                    location="main",
                    instance_id=INSTANCE,
                    admin_secret=hash_secret("x" * 12),
                    issued=START,
                ),
                vendor,
            )
        )
    assert agent.check("uniplex")


def test_configured_location(open_agent: Callable[..., Agent], vendor: SigningKey) -> None:
    text = make_license(vendor, connect=False)
    with pytest.raises(VerificationError, match="no location"):
        open_agent(location="elsewhere").import_license(text)


def test_other_product_and_user_binding(open_agent: Callable[..., Agent], vendor: SigningKey) -> None:
    agent = open_agent()
    with pytest.raises(VerificationError, match="for product 'other'"):
        agent.import_license(make_license(vendor, product="other"))
    user = License(
        licensee="myCompany, City",
        serial="2026-000008",
        product=PRODUCT,
        version=VersionRange.parse("4.*"),
        issued=START,
        binding="user",  # type: ignore[arg-type]
        user_id="user-0001-abc",
        locations=(Location("main", (Entitlement("uniplex", 1),)),),
    )
    with pytest.raises(BindingError, match="user-bound"):
        agent.import_license(sign_document(user, vendor))
    assert agent.status().state is AgentState.UNLICENSED


def test_sealed_license_opens_with_the_activation_key(
    open_agent: Callable[..., Agent], vendor: SigningKey
) -> None:
    from tessera.core import parse

    plain = parse(make_license(vendor, connect=False).encode()).document
    assert isinstance(plain, License)
    sealed = sign_document(seal(plain, LICENSE_KEY), vendor)
    agent = open_agent()
    with pytest.raises(DecryptionError, match="sealed"):
        agent.import_license(sealed)
    agent.activation_request(LICENSE_KEY)  # remembers the key, as activation does
    assert agent.import_license(sealed).state is AgentState.NORMAL
    assert agent.check("uniplex")
    agent.close()
    assert open_agent(agent.state_dir).check("uniplex")  # the key is kept (encrypted)


def test_new_two_part_license_replaces_the_old_without_a_gap(
    open_agent: Callable[..., Agent], vendor: SigningKey
) -> None:
    agent = open_agent()
    agent.import_license(_identity(vendor))
    agent.import_license(_instance_license(vendor))
    # the next license: a new serial, both parts; the first import must not break anything
    new_par = _identity(vendor, serial="2026-000010")
    new_lic = sign_document(
        License(
            licensee="myCompany, City",
            serial="2026-000010",
            product=PRODUCT,
            version=VersionRange.parse("4.*"),
            issued=START,
            binding="instance",  # type: ignore[arg-type]
            instance_id=INSTANCE,
            connect=False,
            locations=(Location("main", (Entitlement("uniplex", 3), Entitlement("ctxjs", 1))),),
        ),
        vendor,
    )
    assert agent.import_license(new_par).state is AgentState.NORMAL
    assert agent.check("uniplex") and not agent.check("ctxjs")
    assert agent.import_license(new_lic).state is AgentState.NORMAL
    assert agent.check("ctxjs")
    agent.close()
    assert open_agent(agent.state_dir).status().serial == "2026-000010"


def test_instance_license_with_an_identity_of_another_serial(
    open_agent: Callable[..., Agent], vendor: SigningKey
) -> None:
    agent = open_agent()
    agent.import_license(_identity(vendor, serial="2026-000099"))
    with pytest.raises(VerificationError, match="serial"):
        agent.import_license(_instance_license(vendor))

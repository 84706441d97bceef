"""Sensitivity is declared once, in the protos; these tests hold every field to it."""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor

from csx.options.v1 import options_pb2
from csx.referrals.v1 import referrals_pb2 as pb
from csx_common.sensitivity import registry

PERSONAL_SCALARS = (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES)


def test_registry_sees_every_csx_message() -> None:
    names = {d.full_name for d in registry().messages}
    for expected in (
        "csx.referrals.v1.SubmitConcernRequest",
        "csx.panel.v1.PlaceProfile",
        "csx.conferences.v1.ConcludeConferenceRequest",
        "csx.actionplans.v1.ActionPlanPublished",
        "csx.referrals.v1.ConcernRecorded",
    ):
        assert expected in names


def test_every_proto_field_is_classified() -> None:
    assert registry().unclassified() == []


def test_personal_free_text_is_always_encrypted() -> None:
    """A string of a personal data class that is stored must be sealed: no plaintext at rest."""
    unsealed = []
    for desc in registry().messages:
        for field in desc.fields:
            fc = registry().field(field)
            if fc.personal and field.type in PERSONAL_SCALARS and not fc.encrypt:
                unsealed.append(field.full_name)
    assert unsealed == []


def test_events_carry_only_operational_fields() -> None:
    for desc in registry().messages:
        if desc.file.name.endswith("/events.proto"):
            for path, fc in registry().leaf_fields(desc):
                assert fc.data_class == options_pb2.DATA_CLASS_OPERATIONAL, f"{desc.full_name}.{path}"


def test_redacted_view_hides_personal_values() -> None:
    req = pb.SubmitConcernRequest(
        agency_reference="REF-1",
        narrative="CANARY",
        child=pb.ChildIdentity(given_name="CANARY", nhs_number="9434765919"),
        harm_types=[1],
    )
    view = registry().redacted(req)
    assert "CANARY" not in repr(view) and "9434765919" not in repr(view)
    assert view["agency_reference"] == "REF-1"
    assert view["child"]["given_name"] == "<identity>"

"""The actionplans database. Action descriptions live only in `actions.sealed` (ciphertexts)."""

from __future__ import annotations

from sqlalchemy import JSON, Column, DateTime, Integer, MetaData, String, Table

from csx_common.audit import audit_tables
from csx_common.datakeys import data_keys_table
from csx_common.idempotency import idempotency_table
from csx_common.messaging.tables import DeliveryTables
from csx_safeguarding.disclosure import disclosure_tables

metadata = MetaData()
delivery = DeliveryTables(metadata)
# Per-child (and per-place) data keys, wrapped by the keyring's KEKs (csx_common.datakeys).
data_keys = data_keys_table(metadata)
idempotency = idempotency_table(metadata)
# The child's consent and sharing decisions as referrals last announced them, for the policy.
disclosure = disclosure_tables(metadata)
# Who saw what: every disclosure decision, hash-chained.
audit = audit_tables(metadata)

action_plans = Table(
    "action_plans",
    metadata,
    Column("plan_id", String(36), primary_key=True),
    # One plan per conference: a redelivered or republished ConferenceConcluded cannot make two.
    Column("conference_id", String(36), nullable=False, unique=True),
    Column("child_id", String(36), nullable=False, index=True),
    Column("published_at", DateTime(timezone=True), nullable=False),
    # PlanKind and PlanStatus; plans made before kinds were recorded read as UNSPECIFIED, ACTIVE.
    Column("kind", Integer, nullable=False, server_default="0"),
    Column("status", Integer, nullable=False, server_default="1"),
    Column("end_reason", Integer, nullable=False, server_default="0"),
    Column("ended_by_conference_id", String(36)),
    Column("ended_at", DateTime(timezone=True)),
)

actions = Table(
    "actions",
    metadata,
    Column("action_id", String(36), primary_key=True),
    Column("plan_id", String(36), nullable=False, index=True),
    Column("owner_agency", Integer, nullable=False),
    Column("due_on", String(10), nullable=False),
    Column("status", Integer, nullable=False),
    # Optimistic concurrency: bumps on every change.
    Column("version", Integer, nullable=False),
    Column("sealed", JSON, nullable=False),
    # The order the conference agreed the actions in.
    Column("position", Integer, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

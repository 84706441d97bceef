"""The conferences database. Personal fields live only in the `sealed` columns (ciphertexts)."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Column,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
)

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

conferences = Table(
    "conferences",
    metadata,
    Column("conference_id", String(36), primary_key=True),
    # One conference per routed referral; empty for C (context) conferences, which come from the panel.
    Column("referral_id", String(36), unique=True),
    Column("child_id", String(36), nullable=False),
    Column("kind", Integer, nullable=False),
    Column("status", Integer, nullable=False),
    Column("due_on", Date, nullable=False),
    Column("outcome", Integer, nullable=False),
    Column("version", Integer, nullable=False),
    # The Conference message with its sealed fields and its actions cleared: ids, codes, dates.
    Column("body", LargeBinary, nullable=False),
    Column("sealed", JSON, nullable=False),
    Column("scheduled_at", DateTime(timezone=True), nullable=False),
    Column("concluded_at", DateTime(timezone=True)),
    # The London day ConferenceOverdue went out: the sweep reads columns only, never the records.
    Column("overdue_announced_on", Date),
    Index("ix_conferences_child_scheduled", "child_id", "scheduled_at"),
)

# Every routed referral and the conference that took it (scheduled for it, or joined): a routing
# announced again, under any message id and whatever became of that conference, is handled once.
conference_referrals = Table(
    "conference_referrals",
    metadata,
    Column("referral_id", String(36), primary_key=True),
    Column("conference_id", String(36), ForeignKey("conferences.conference_id"), nullable=False),
)

# Agreed actions, one row each: the Sealer seals one message's scalar fields, so each action is
# its own sealed record (bound to its conference and position) rather than a repeated field.
conference_actions = Table(
    "conference_actions",
    metadata,
    Column("conference_id", String(36), ForeignKey("conferences.conference_id"), primary_key=True),
    Column("position", Integer, primary_key=True),
    Column("owner_agency", Integer, nullable=False, index=True),
    # The AgreedAction with its description cleared.
    Column("body", LargeBinary, nullable=False),
    Column("sealed", JSON, nullable=False),
)

# The chair register: one row per chair, their name sealed under the service's own key scope.
chairs = Table(
    "chairs",
    metadata,
    Column("user_id", String(64), primary_key=True),
    Column("version", Integer, nullable=False),
    # The Chair message with its name cleared: the training date, teams and lead period.
    Column("body", LargeBinary, nullable=False),
    Column("sealed", JSON, nullable=False),
)

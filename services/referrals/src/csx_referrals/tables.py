"""The referrals database. Personal fields live only in the `sealed` columns (ciphertexts)."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Date,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    false,
    text,
)

from csx_common.audit import audit_tables
from csx_common.datakeys import data_keys_table
from csx_common.idempotency import idempotency_table
from csx_common.messaging.tables import DeliveryTables

metadata = MetaData()
delivery = DeliveryTables(metadata)
# Per-child (and per-place) data keys, wrapped by the keyring's KEKs (csx_common.datakeys).
data_keys = data_keys_table(metadata)
idempotency = idempotency_table(metadata)
# Who saw what: every disclosure decision, hash-chained (csx_common.audit).
audit = audit_tables(metadata)

children = Table(
    "children",
    metadata,
    Column("child_id", String(36), primary_key=True),
    # Blind indexes: HMAC truncated so that several children share each value, so an index alone
    # neither identifies a child nor confirms a guess. Lookups decrypt the candidates' identity
    # (`sealed`, under the child's own data key) and compare exactly. NULL once erased.
    Column("nhs_index", String(16), index=True),
    Column("name_dob_index", String(16), index=True),
    Column("sealed", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("erased_at", DateTime(timezone=True)),
)

# Erasure of a child's records (by key destruction): requested by one person, approved by another.
erasures = Table(
    "erasures",
    metadata,
    Column("erasure_id", String(36), primary_key=True),
    Column("child_id", String(36), nullable=False, index=True),
    Column("basis", Integer, nullable=False),
    Column("requested_by", String(64), nullable=False),
    Column("requested_at", DateTime(timezone=True), nullable=False),
    Column("approved_by", String(64)),
    Column("erased_at", DateTime(timezone=True)),
    # The reason, sealed under the service's own key: it outlives the child's.
    Column("sealed", JSON, nullable=False),
)

referrals = Table(
    "referrals",
    metadata,
    Column("referral_id", String(36), primary_key=True),
    Column("child_id", String(36), nullable=False, index=True),
    Column("status", Integer, nullable=False),
    Column("outcome", Integer, nullable=False),
    Column("decided_by", String(64)),
    Column("strategy_discussion_on", String(10)),
    Column("opened_at", DateTime(timezone=True), nullable=False),
    Column("decided_at", DateTime(timezone=True)),
    Column("decision_due_on", Date, nullable=False),
    Column("sealed", JSON, nullable=False),
    Column("version", Integer, nullable=False),
    # A referral routed to A or B waits for conferences to announce its conference (scheduled, or
    # joined to the child's open one): until then it keeps the child's case open (docs/adr/0014).
    Column("conference_announced", Boolean, nullable=False, server_default=false()),
    Index("ix_referrals_child_status", "child_id", "status"),
    # At most one referral awaiting a decision per child: concurrent concerns join the same one.
    Index(
        "ux_referrals_one_open_per_child",
        "child_id",
        unique=True,
        sqlite_where=text("status = 1"),
        postgresql_where=text("status = 1"),
    ),
)

concerns = Table(
    "concerns",
    metadata,
    Column("concern_id", String(36), primary_key=True),
    Column("referral_id", String(36), nullable=False, index=True),
    Column("child_id", String(36), nullable=False, index=True),
    Column("agency", Integer, nullable=False),
    Column("agency_reference", String(64), nullable=False),
    # The Concern message with its sealed fields cleared: ids, codes, timestamps only.
    Column("body", LargeBinary, nullable=False),
    Column("sealed", JSON, nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
)

# A concern's child that agrees with a known child only in part: recorded against a new child and
# left unlinked until the MASH decides (same child: merged into the candidate; different: kept).
possible_matches = Table(
    "possible_matches",
    metadata,
    Column("match_id", String(36), primary_key=True),
    Column("child_id", String(36), nullable=False, index=True),
    Column("candidate_child_id", String(36), nullable=False, index=True),
    Column("kind", Integer, nullable=False),
    Column("status", Integer, nullable=False, index=True),
    Column("found_at", DateTime(timezone=True), nullable=False),
    Column("resolved_by", String(64)),
    Column("resolved_at", DateTime(timezone=True)),
    # The reason for the decision, sealed under the candidate child's key.
    Column("sealed", JSON, nullable=False),
    Index("ux_possible_matches_pair", "child_id", "candidate_child_id", unique=True),
)

# Every consent record the child has had, newest version current (history kept for the audit).
consents = Table(
    "consents",
    metadata,
    Column("child_id", String(36), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("status", Integer, nullable=False),
    Column("given_by", Integer, nullable=False),
    Column("agencies", JSON, nullable=False),
    Column("data_classes", JSON, nullable=False),
    Column("recorded_by", String(64), nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    Column("sealed", JSON, nullable=False),
)

sharing_decisions = Table(
    "sharing_decisions",
    metadata,
    Column("decision_id", String(36), primary_key=True),
    Column("child_id", String(36), nullable=False, index=True),
    Column("share", Boolean, nullable=False),
    Column("lawful_basis", Integer, nullable=False),
    Column("approver", String(64), nullable=False),
    Column("decided_by", String(64), nullable=False),
    Column("decided_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True)),
    Column("agencies", JSON, nullable=False),
    Column("data_classes", JSON, nullable=False),
    Column("sealed", JSON, nullable=False),
)

# Emergency access grants: one user, one child, one hour; the end is audited once.
break_glass_grants = Table(
    "break_glass_grants",
    metadata,
    Column("grant_id", String(36), primary_key=True),
    Column("child_id", String(36), nullable=False),
    Column("user_id", String(64), nullable=False),
    Column("agency", Integer, nullable=False),
    Column("granted_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("review_due_at", DateTime(timezone=True), nullable=False),
    Column("end_audited", Boolean, nullable=False),
    # The review by a second person (the notes are sealed beside the reason).
    Column("reviewed_by", String(64)),
    Column("reviewed_at", DateTime(timezone=True)),
    Column("review_outcome", Integer),
    Column("sealed", JSON, nullable=False),
    Index("ix_break_glass_user_child", "user_id", "child_id"),
    Index("ix_break_glass_review_due", "reviewed_at", "review_due_at"),
)

# The child's case (docs/adr/0014): open while a referral awaits a decision, a routed referral waits
# for its conference, or a conference is open; closing starts the retention period. Ids, codes and
# times only: nothing here is personal.
cases = Table(
    "cases",
    metadata,
    Column("child_id", String(36), primary_key=True),
    Column("status", String(6), nullable=False),  # "open" | "closed" (domain.CASE_OPEN, CASE_CLOSED)
    Column("opened_at", DateTime(timezone=True), nullable=False),
    Column("closed_at", DateTime(timezone=True)),
    # The intervention the open case follows (types.Intervention: A, B, or 0 for none yet / closed).
    Column("intervention", Integer, nullable=False),
    Column("version", Integer, nullable=False),
    Index("ix_cases_status_closed_at", "status", "closed_at"),
)

# Conferences' facts about a child's conferences, from their events (referrals-conferences). An event
# may arrive late or twice: a conference goes absent -> open -> closed and never back ("closed wins").
case_conferences = Table(
    "case_conferences",
    metadata,
    Column("conference_id", String(36), primary_key=True),
    Column("child_id", String(36), nullable=False, index=True),
    Column("open", Boolean, nullable=False),
    # Its intervention (A: child protection conferences and reviews; B: contextual reviews; 0 not
    # yet known: a review named by the conclusion that scheduled it, before its own event arrives).
    Column("intervention", Integer, nullable=False),
    Column("changed_at", DateTime(timezone=True), nullable=False),
)

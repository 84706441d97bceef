"""The panel database: ids, codes and timestamps only. No personal data is held here, so nothing
is sealed; details stay in referrals behind its consent gate."""

from __future__ import annotations

from sqlalchemy import JSON, Column, DateTime, Integer, MetaData, String, Table

from csx_common.audit import audit_tables
from csx_common.datakeys import data_keys_table
from csx_common.messaging.tables import DeliveryTables
from csx_safeguarding.disclosure import disclosure_tables

metadata = MetaData()
delivery = DeliveryTables(metadata)
# Per-child (and per-place) data keys, wrapped by the keyring's KEKs (csx_common.datakeys).
data_keys = data_keys_table(metadata)
# The child's consent and sharing decisions as referrals last announced them, for the policy.
disclosure = disclosure_tables(metadata)
# Who saw what: every disclosure decision, hash-chained.
audit = audit_tables(metadata)

# Every concern, including those naming no place, so a child's history is complete.
concern_links = Table(
    "concern_links",
    metadata,
    Column("concern_id", String(36), primary_key=True),
    Column("child_id", String(36), nullable=False, index=True),
    Column("agency", Integer, nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
)

# One row per (concern, place) the concern names: an assertion by the reporting agency.
place_links = Table(
    "place_links",
    metadata,
    Column("concern_id", String(36), primary_key=True),
    Column("place_id", String(64), primary_key=True, index=True),
    Column("context_type", Integer, nullable=False),
    Column("child_id", String(36), nullable=False, index=True),
    Column("agency", Integer, nullable=False),
    Column("harm_types", JSON, nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
)

# Which agencies have a basis for a child: social care routed a referral holding their concerns
# (ReferralRouted). Reporting a concern is not a basis: a partner's own submissions never open the
# panel's picture of a child to it.
routed_agencies = Table(
    "routed_agencies",
    metadata,
    Column("child_id", String(36), primary_key=True),
    Column("agency", Integer, primary_key=True),
)

places = Table(
    "places",
    metadata,
    Column("place_id", String(64), primary_key=True),
    # Set once, when the place first reaches the threshold; never cleared by later concerns.
    Column("flagged_at", DateTime(timezone=True)),
)

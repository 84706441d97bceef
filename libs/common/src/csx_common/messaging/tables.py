"""The delivery tables every service carries in its own database (and its own migrations)."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

PENDING = "pending"
PUBLISHED = "published"


class DeliveryTables:
    def __init__(self, metadata: MetaData) -> None:
        self.outbox = Table(
            "outbox",
            metadata,
            Column("event_id", String(36), primary_key=True),
            Column("subject", String(200), nullable=False),
            Column("event_type", String(200), nullable=False),
            Column("payload", LargeBinary, nullable=False),
            # Trace context of the request that wrote the event, so the journey stays one trace.
            Column("headers", JSON, nullable=False),
            Column("status", String(16), nullable=False),
            Column("attempts", Integer, nullable=False, default=0),
            Column("created_at", DateTime(timezone=True), nullable=False),
            Column("published_at", DateTime(timezone=True)),
            Index("ix_outbox_status_created", "status", "created_at"),
        )
        self.inbox = Table(
            "inbox",
            metadata,
            Column("consumer", String(100), primary_key=True),
            Column("msg_id", String(100), primary_key=True),
            Column("received_at", DateTime(timezone=True), nullable=False),
        )
        self.dead_letters = Table(
            "dead_letters",
            metadata,
            Column("id", Integer, primary_key=True, autoincrement=True),
            Column("consumer", String(100), nullable=False),
            Column("msg_id", String(100), nullable=False),
            Column("subject", String(200), nullable=False),
            Column("payload", LargeBinary, nullable=False),
            Column("deliveries", Integer, nullable=False),
            # The exception type only: messages of exceptions may carry values.
            Column("error", Text, nullable=False),
            Column("dead_at", DateTime(timezone=True), nullable=False),
            # Set by an operator (`csx deadletters replay`) once the cause is fixed; the consumer then
            # applies the event again and sets replayed_at.
            Column("replay_requested_at", DateTime(timezone=True)),
            Column("replayed_at", DateTime(timezone=True)),
        )

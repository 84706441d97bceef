"""How an event looks on the wire: a serialized proto, its type in a header, its id as Nats-Msg-Id."""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import message as pb_message

EVENT_TYPE_HEADER = "Csx-Event-Type"
MSG_ID_HEADER = "Nats-Msg-Id"
# The event's own id when it differs from Nats-Msg-Id: a reconciliation republish of a message the
# broker lost but still remembers (its duplicate window) needs a fresh Nats-Msg-Id, and consumers
# must still see the same event (csx_common.messaging.reconcile).
EVENT_ID_HEADER = "Csx-Event-Id"


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """A JetStream stream: its name and the subjects it stores. Each CSX service owns one, as its
    contract declares it (`topology().stream(service)`: `CSX_REFERRALS` on `csx.referrals.>`)."""

    name: str
    subjects: tuple[str, ...]

    @classmethod
    def for_service(cls, service: str) -> StreamSpec:
        """A stream shaped like a service's for a name no contract declares (a test's scratch
        stream); a CSX service's own comes from csx_common.messaging.topology."""
        return cls(f"CSX_{service.upper()}", (f"csx.{service}.>",))

    def subject(self, event: str) -> str:
        """A subject inside the stream (a test's scratch events); a CSX event's subject is its
        contract's (csx_common.messaging.topology)."""
        return self.subjects[0].removesuffix(">") + event


def event_type(msg: pb_message.Message) -> str:
    return msg.DESCRIPTOR.full_name

"""CSX client library for partner agency systems: sealed intake of concerns over NATS
(docs/adr/0007). Needs only nats-py, cryptography, protobuf and the generated contracts."""

from csx_client.envelope import AgencyIdentity, Recipient, seal
from csx_client.intake import ACCEPTED, REJECTED, IntakeClient

__all__ = ["ACCEPTED", "REJECTED", "AgencyIdentity", "IntakeClient", "Recipient", "seal"]

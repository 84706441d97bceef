"""What the referrals service consumes: conferences' lifecycle events, for the child's case
(docs/adr/0014). The durable, its stream and subjects are the contract's (ReferralsService's
`(csx.options.v1.topology)`)."""

from __future__ import annotations

from csx.conferences.v1 import events_pb2 as conference_events
from csx_common.messaging.consumer import ConsumerSpec
from csx_common.messaging.routes import consumer, route
from csx_referrals.cases import Cases

DURABLE = "referrals-conferences"


def conferences_consumer(cases: Cases) -> ConsumerSpec:
    """Each conference opened or closed, and each routed referral's conference announced, then the
    child's case evaluated, with the inbox row in one unit of work. An event that breaks the
    contract (ids that are not UUIDs, no time) is parked at the route's check; one about a child
    referrals does not hold, or naming a conference of another child, by the handler (PoisonEvent).
    An erased child's events are skipped (the runtime's `obsolete`). Redeliveries are the inbox's;
    a copy under another message id finds nothing left to change."""

    return consumer(
        DURABLE,
        [
            route(conference_events.ConferenceScheduled, cases.on_scheduled),
            route(conference_events.ConferenceConcluded, cases.on_concluded),
            route(conference_events.ConferenceCancelled, cases.on_cancelled),
            route(conference_events.ReferralJoinedConference, cases.on_joined),
        ],
    )

"""The one disclosure policy decision point (docs/security.md).

Default deny; forbid beats permit; every decision names the rule that decided. The policy is data:
`policy.yaml` in this package, reviewed like code (docs/adr/0004-disclosure-policy.md).

    engine = PolicyEngine.default()
    ctx = DisclosureContext(Requester("u1", Agency.AGENCY_POLICE, Role.POLICE_OFFICER,
                                      Purpose.ACTION_DELIVERY),
                            involvement=frozenset({Involvement.ACTION_OWNER}), at=now)
    engine.visible(ctx)                        # deny -> answer NOT_FOUND
    engine.decide(ctx.field(DataClass.DATA_CLASS_HEALTH))
    engine.decide_fields(ctx, {"child.given_name": DataClass.DATA_CLASS_IDENTITY, ...})
    engine.permits_command("record_consent", "social_care", "social_worker", "referral_screening")
"""

from csx_safeguarding.policy.engine import DEFAULT_DENY, Command, PolicyEngine, PolicyError, UnknownCommandError
from csx_safeguarding.policy.model import (
    AGENCY_BY_NAME,
    AGENCY_NAME,
    DATA_CLASS_BY_NAME,
    MAX_BREAK_GLASS,
    Agency,
    BreakGlassGrant,
    Consent,
    ConsentStatus,
    DataClass,
    Decision,
    DisclosureContext,
    FieldSpec,
    FieldSubject,
    HandlingCode,
    IntelligenceHandling,
    Involvement,
    LawfulBasis,
    PolicyRequest,
    Purpose,
    Requester,
    Role,
    SharingDecision,
)

__all__ = [
    "AGENCY_BY_NAME",
    "AGENCY_NAME",
    "DATA_CLASS_BY_NAME",
    "DEFAULT_DENY",
    "MAX_BREAK_GLASS",
    "Agency",
    "BreakGlassGrant",
    "Command",
    "Consent",
    "ConsentStatus",
    "DataClass",
    "Decision",
    "DisclosureContext",
    "FieldSpec",
    "FieldSubject",
    "HandlingCode",
    "IntelligenceHandling",
    "Involvement",
    "LawfulBasis",
    "PolicyEngine",
    "PolicyError",
    "PolicyRequest",
    "Purpose",
    "Requester",
    "Role",
    "SharingDecision",
    "UnknownCommandError",
]

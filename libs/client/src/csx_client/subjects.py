"""NATS names of sealed intake, shared by agency systems and CSX (csx_common.natsauth uses these).

Agencies publish on `csx.intake.<agency>.submit` (a JetStream stream owned by referrals) and hear
back on `csx.intake.<agency>.result` (core NATS); each agency's NATS user may touch only its own.
"""

from __future__ import annotations

import re

SUBMIT_SUBJECTS = "csx.intake.*.submit"
RESULT_SUBJECTS = "csx.intake.*.result"
# Agency names as in csx.types.v1.Agency, lower case: also a safe subject token.
AGENCY_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def submit_subject(agency: str) -> str:
    return f"csx.intake.{_checked(agency)}.submit"


def result_subject(agency: str) -> str:
    return f"csx.intake.{_checked(agency)}.result"


def agency_of(subject: str) -> str | None:
    """The agency of a `csx.intake.<agency>.submit` subject (None for any other subject)."""
    parts = subject.split(".")
    if len(parts) == 4 and parts[:2] == ["csx", "intake"] and parts[3] == "submit" and AGENCY_PATTERN.match(parts[2]):
        return parts[2]
    return None


def agency_user(agency: str) -> str:
    """The NATS user of an agency's system."""
    return f"agency-{_checked(agency)}"


def inbox_prefix(user: str) -> str:
    """The reply-subject prefix a NATS user must connect with (nats-py `inbox_prefix`): each user may
    read replies only under its own prefix."""
    return "_INBOX_" + "".join(c if c.isalnum() else "_" for c in user)


def _checked(agency: str) -> str:
    if not AGENCY_PATTERN.match(agency):
        raise ValueError("agency must be a lower-case name such as 'police'")
    return agency

"""Who the csx command is when it calls the stack: a partner agency's certificate from the
development PKI (`csx up` creates it under <data dir>/pki; CSX_PKI_DIR points elsewhere) and a
short-lived token for a named user of that agency."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import grpc

from csx_common import client
from csx_common.client import TokenSource
from csx_common.identity import Principal, TokenIssuer
from csx_common.pki import Credentials, DevPki, PeerIdentity

DEFAULT_PKI_DIR = Path("var") / "pki"
# Health and stream checks are not about any child: any partnership certificate will do.
PROBE_AGENCY = "social_care"
# The role a user of each agency submits a concern as, unless told otherwise: one the policy's
# `roles` table lets that agency's users hold (services refuse a token pairing any other).
SUBMITTER_ROLES = {
    "police": "police_officer",
    "education": "dsl",
    "health": "health_safeguarding_nurse",
    "youth_justice": "youth_justice_worker",
    "social_care": "social_worker",
}


def submitter_role(agency: str) -> str:
    """Community safety, transport, licensing, housing and the voluntary sector: `practitioner`."""
    return SUBMITTER_ROLES.get(agency, "practitioner")


def default_pki(environ: Mapping[str, str] | None = None) -> DevPki:
    env = os.environ if environ is None else environ
    return DevPki(Path(env.get("CSX_PKI_DIR") or DEFAULT_PKI_DIR))


def probe_credentials(pki: DevPki) -> Credentials:
    return pki.credentials(PeerIdentity("agency", PROBE_AGENCY))


def user_channel(address: str, principal: Principal, pki: DevPki) -> grpc.aio.Channel:
    """A channel calling as `principal`, through its agency's certificate."""
    issuer = TokenIssuer(pki.token_key_file.read_bytes())
    credentials = pki.credentials(PeerIdentity("agency", principal.agency))
    return client.channel(address, credentials, TokenSource(issuer, principal))

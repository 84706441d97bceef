"""`csx token issue`: a signed user token for calling the API by hand — development PKI only.

    TOKEN=$(csx token issue --agency education --role dsl --purpose referral_screening)
    grpcurl -cacert var/pki/ca.crt -cert var/pki/agencys/education.crt \\
        -key var/pki/agencys/education.key -H "authorization: Bearer $TOKEN" 127.0.0.1:50051 list

It signs with the development token-issuer key that `make run` / `csx up` generates
(<CSX_PKI_DIR or var/pki>/token-issuer.key). In production the partnership's identity provider
signs users' tokens and CSX holds only its public key, so there is nothing here to sign with, and
the command says so. Only the token is printed on standard output, so it can be captured.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

token_app = typer.Typer(
    help="End users' signed tokens, for calling the API by hand (development PKI only).",
    no_args_is_help=True,
)

err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_NO_KEY = 1
EXIT_USAGE = 2


def _choices(values: Iterable[str]) -> str:
    return ", ".join(sorted(values))


@token_app.command("issue")
def issue(
    agency: Annotated[
        str, typer.Option("--agency", help="the user's agency, lower case: police, health, education, social_care, ...")
    ],
    role: Annotated[str, typer.Option("--role", help="the user's role, e.g. police_officer, dsl, social_worker")],
    purpose: Annotated[
        str, typer.Option("--purpose", help="why they are calling, e.g. referral_screening, action_delivery")
    ],
    user_id: Annotated[str, typer.Option("--user", help="the user's id (the token's sub)")] = "cli.user",
    ttl: Annotated[
        int, typer.Option("--ttl", min=1, max=3600, help="seconds the token lives (services refuse over an hour)")
    ] = 900,
    pki_dir: Annotated[
        Path | None,
        typer.Option(
            "--pki-dir",
            envvar="CSX_PKI_DIR",
            help="the development PKI folder holding token-issuer.key [default: var/pki]",
        ),
    ] = None,
) -> None:
    """Print a signed token (EdDSA JWT) for one user — development PKI only.

    Signs with the development key that `make run` / `csx up` creates (token-issuer.key).

    In production users' tokens come from the partnership's identity provider: no key to use here.

    Send it as `authorization: Bearer <token>`, over mutual TLS with that agency's certificate.
    """
    import jwt

    from csx_cli.identity import DEFAULT_PKI_DIR
    from csx_common.identity import MAX_CLAIM_LENGTH, Principal, TokenIssuer
    from csx_common.pki import DevPki
    from csx_safeguarding.policy.model import AGENCY_BY_NAME, Purpose, Role

    problems = []
    if agency not in AGENCY_BY_NAME:
        problems.append(f"unknown agency {agency!r} (one of: {_choices(AGENCY_BY_NAME)})")
    if role not in {r.value for r in Role}:
        problems.append(f"unknown role {role!r} (one of: {_choices(r.value for r in Role)})")
    if purpose not in {p.value for p in Purpose}:
        problems.append(f"unknown purpose {purpose!r} (one of: {_choices(p.value for p in Purpose)})")
    if not (0 < len(user_id) <= MAX_CLAIM_LENGTH and user_id.isprintable()):
        problems.append(f"--user must be 1 to {MAX_CLAIM_LENGTH} printable characters")
    if not problems:
        # Services refuse a token whose role the policy does not place in its agency (a police
        # officer of the education agency, say): do not hand out one they would refuse.
        from csx_safeguarding.policy import PolicyEngine

        if not PolicyEngine.default().admits(agency, role, purpose):
            problems.append(f"the policy does not let a user of agency {agency} hold role {role}")
    if problems:
        for problem in problems:
            err.print(f"[red]{problem}[/red]")
        raise typer.Exit(EXIT_USAGE)

    pki = DevPki(pki_dir or DEFAULT_PKI_DIR)
    key_file = pki.token_key_file
    try:
        key = key_file.read_bytes()
    except FileNotFoundError:
        err.print(
            f"[red]no development token-issuer key at {key_file}[/red]: `csx token issue` works only with the "
            "development PKI that `make run` / `csx up` creates (run it first, or point CSX_PKI_DIR / --pki-dir "
            "at its pki folder). In production, users' tokens come from the partnership's identity provider."
        )
        raise typer.Exit(EXIT_NO_KEY) from None
    except OSError as exc:
        err.print(f"[red]cannot read {key_file}:[/red] {exc}")
        raise typer.Exit(EXIT_NO_KEY) from None
    try:
        token = TokenIssuer(key).issue(Principal(user_id, agency, role, purpose), ttl_seconds=ttl)
    except (ValueError, TypeError, jwt.PyJWTError) as exc:
        err.print(f"[red]{key_file} is not an Ed25519 private key (PEM):[/red] {type(exc).__name__}")
        raise typer.Exit(EXIT_NO_KEY) from None
    print(token)

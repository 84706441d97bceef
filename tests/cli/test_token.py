"""`csx token issue`: a token signed with the development PKI's key, refused without one."""

from __future__ import annotations

from pathlib import Path

import jwt
import pytest
from typer.testing import CliRunner

from csx_cli.identity import submitter_role
from csx_cli.main import app
from csx_common.identity import IdentityError, Principal, TokenVerifier
from csx_common.pki import DevPki
from csx_safeguarding.policy import AGENCY_BY_NAME, PolicyEngine
from tests.support import dev_pki

runner = CliRunner()

POLICE = ["--agency", "police", "--role", "police_officer", "--purpose", "referral_screening"]


def flat(text: str) -> str:
    return " ".join(text.split())


def issue(*args: str, pki_dir: Path | None = None) -> tuple[int, str, str]:
    env = {"CSX_PKI_DIR": str(pki_dir)} if pki_dir is not None else {}
    result = runner.invoke(app, ["token", "issue", *args], env={"COLUMNS": "300", **env})
    return result.exit_code, result.stdout, result.stderr


def test_prints_only_a_token_that_verifies_with_the_dev_public_key() -> None:
    pki = dev_pki()
    code, out, err = issue(*POLICE, "--user", "dev.alice", "--ttl", "600", pki_dir=pki.root)
    assert code == 0, err
    assert out.count("\n") == 1 and out.endswith("\n")
    token = out.strip()
    principal = TokenVerifier(pki.token_public_file.read_bytes()).verify(token)
    assert principal == Principal("dev.alice", "police", "police_officer", "referral_screening")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 600
    assert claims["aud"] == "csx"


def test_defaults_user_and_ttl() -> None:
    pki = dev_pki()
    code, out, err = issue(*POLICE, pki_dir=pki.root)
    assert code == 0, err
    claims = jwt.decode(out.strip(), options={"verify_signature": False})
    assert claims["sub"] == "cli.user" and claims["exp"] - claims["iat"] == 900


def test_pki_dir_option_beats_the_environment(tmp_path: Path) -> None:
    pki = dev_pki()
    code, out, err = issue(*POLICE, "--pki-dir", str(pki.root), pki_dir=tmp_path / "elsewhere")
    assert code == 0, err
    TokenVerifier(pki.token_public_file.read_bytes()).verify(out.strip())


def test_a_token_from_another_pki_does_not_verify(tmp_path: Path) -> None:
    ours = dev_pki()
    theirs = DevPki(tmp_path / "other").ensure()
    code, out, _ = issue(*POLICE, pki_dir=theirs.root)
    assert code == 0
    with pytest.raises(IdentityError):
        TokenVerifier(ours.token_public_file.read_bytes()).verify(out.strip())


def test_refuses_without_a_development_key(tmp_path: Path) -> None:
    code, out, err = issue(*POLICE, pki_dir=tmp_path)
    assert code == 1
    assert out == ""
    message = flat(err)
    assert f"no development token-issuer key at {tmp_path / 'token-issuer.key'}" in message
    assert "identity provider" in message


def test_refuses_a_key_that_is_not_one(tmp_path: Path) -> None:
    (tmp_path / "token-issuer.key").write_text("not a key")
    code, out, err = issue(*POLICE, pki_dir=tmp_path)
    assert code == 1 and out == ""
    assert "is not an Ed25519 private key" in flat(err)


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--agency", "polis", "--role", "police_officer", "--purpose", "referral_screening"], "unknown agency"),
        (["--agency", "police", "--role", "sheriff", "--purpose", "referral_screening"], "unknown role"),
        (["--agency", "police", "--role", "police_officer", "--purpose", "curiosity"], "unknown purpose"),
        ([*POLICE, "--user", "x" * 65], "--user must be 1 to 64"),
        ([*POLICE, "--user", "bad\nuser"], "--user must be 1 to 64"),
    ],
)
def test_refuses_what_a_service_would_refuse(args: list[str], complaint: str) -> None:
    code, out, err = issue(*args, pki_dir=dev_pki().root)
    assert code == 2 and out == ""
    assert complaint in flat(err)


@pytest.mark.parametrize("ttl", ["0", "3601"])
def test_ttl_is_at_most_an_hour(ttl: str) -> None:
    code, out, _ = issue(*POLICE, "--ttl", ttl, pki_dir=dev_pki().root)
    assert code == 2 and out == ""


def test_help_says_development_only() -> None:
    result = runner.invoke(app, ["token", "issue", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    assert "development PKI only" in flat(result.output)


def test_refuses_a_role_the_policy_does_not_place_in_the_agency() -> None:
    code, out, err = issue(
        "--agency", "education", "--role", "police_officer", "--purpose", "referral_screening", pki_dir=dev_pki().root
    )
    assert code == 2 and out == ""
    assert "does not let a user of agency education hold role police_officer" in flat(err)


# Every agency that refers children (the partnership's quality-assurance unit does not).
@pytest.mark.parametrize("agency", sorted(set(AGENCY_BY_NAME) - {"safeguarding_partnership"}))
def test_concern_submit_defaults_to_a_role_the_agency_may_hold(agency: str) -> None:
    """`csx concern submit` calls as submitter_role(agency) unless --role says otherwise."""
    assert PolicyEngine.default().admits(agency, submitter_role(agency), "referral_screening")

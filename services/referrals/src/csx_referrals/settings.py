from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from csx_common.settings import ServiceSettings


class ReferralsSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CSX_REFERRALS_", secrets_dir=None, extra="ignore")

    # Years a child's records are kept after the case closes; then `csx retention run` erases them
    # (35: R(C) v Northumberland CC [2015], csx_referrals.domain.RETENTION_YEARS).
    retention_years: int = Field(default=35, ge=1, le=100)

    # Sealed intake (docs/adr/0007): the X25519 private key (PEM) agencies seal concerns to. Empty:
    # no intake consumer. Agencies' signatures are checked against TLS_CA_FILE.
    intake_key_file: str = ""
    # A sealed concern signed longer than this before the broker stored it is rejected as STALE
    # (with the replay check, this bounds how long an old message could be resent).
    intake_max_age_seconds: float = Field(default=300.0, gt=0)
    # How far ahead of the broker's clock an agency's signing time may be.
    intake_clock_skew_seconds: float = Field(default=60.0, ge=0)

    @model_validator(mode="after")
    def _intake_needs_a_ca(self) -> ReferralsSettings:
        if self.intake_key_file and not self.tls_ca_file:
            raise ValueError(
                "CSX_REFERRALS_INTAKE_KEY_FILE needs CSX_REFERRALS_TLS_CA_FILE (agencies' signatures are checked)"
            )
        return self

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from csx_common.settings import ServiceSettings


class ReferralsSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CSX_REFERRALS_", secrets_dir=None, extra="ignore")

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from csx_common.settings import ServiceSettings


class ActionPlansSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CSX_ACTIONPLANS_", secrets_dir=None, extra="ignore")

    # host:port of the conferences gRPC service: the agreed actions are fetched from it, since
    # ConferenceConcluded is thin and carries no narrative.
    conferences_address: str
    # Deadline for each call to conferences; a slow or absent conferences fails the delivery,
    # which is then redelivered with backoff.
    conferences_timeout_seconds: float = 5.0

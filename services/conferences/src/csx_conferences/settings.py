from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from csx_common.settings import ServiceSettings


class ConferencesSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CSX_CONFERENCES_", secrets_dir=None, extra="ignore")

    # Intervention B reviews have no statutory timescale; 15 working days (the same as an initial
    # child protection conference under WT23) is the partnership's local standard, set here.
    contextual_review_working_days: int = Field(default=15, ge=1, le=60)
    # London Safeguarding Children Procedures: a conference is quorate with children's social care
    # and at least two other agencies that have had direct contact with the child.
    quorum_other_agencies: int = Field(default=2, ge=0, le=10)
    # How often overdue conferences (past their due date, not held) are looked for and announced;
    # 0 turns the sweep off in this process (another replica, or a test that counts rows, may want that).
    overdue_check_seconds: float = Field(default=300.0, ge=0, le=86400)
    # host:port of the panel's gRPC service: the panel's view of each place a child protection
    # conference considers is read from it when the context is recorded. Empty: recorded without it.
    panel_address: str = ""
    # Deadline for that read; a slow or absent panel leaves the view out, never the context.
    panel_timeout_seconds: float = Field(default=2.0, gt=0, le=60)

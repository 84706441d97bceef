from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from csx_common.settings import ServiceSettings


class PanelSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CSX_PANEL_", secrets_dir=None, extra="ignore")

    # Distinct children linked to a place before it goes on the MARVE panel's agenda: the panel
    # looks for places that are a risk to a *group* of children (docs/process.md, intervention C).
    flag_threshold_children: int = Field(default=3, ge=1)

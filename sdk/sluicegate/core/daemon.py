"""How the two daemons, the sidecar and the operator, are configured: one pydantic-settings model each,
whose fields are the flags (``--cache-memory``) and the environment variables (``SLUICEGATE_CACHE_MEMORY``).

Needs pydantic-settings, which the ``sidecar`` and ``operator`` extras install; nothing of the user API
imports this module.
"""

from __future__ import annotations

from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict

from sluicegate.core.broker_protocol import ENV_PREFIX

__all__ = ["problems", "settings_config"]


def settings_config(prog: str) -> SettingsConfigDict:
    """Frozen, closed, ``SLUICEGATE_``-prefixed, kebab-case flags that take plain values (no JSON)."""
    return SettingsConfigDict(
        frozen=True,
        extra="forbid",
        env_prefix=ENV_PREFIX,
        cli_prog_name=prog,
        cli_kebab_case=True,
        cli_hide_none_type=True,
        cli_avoid_json=True,
    )


def problems(exc: ValidationError) -> str:
    """A bad configuration in one line, each problem under its flag (``--cache-disk: ...``)."""
    return "; ".join(
        (f"--{'.'.join(str(p) for p in err['loc']).replace('_', '-')}: " if err["loc"] else "")
        + err["msg"].removeprefix("Value error, ")
        for err in exc.errors()
    )

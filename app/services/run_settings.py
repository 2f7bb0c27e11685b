"""Checking the settings of a training run as typed on a form or sent to the API.

Each trainer has a dataclass of settings (trainer.sft.SFTConfig,
trainer.reward.RewardConfig, trainer.ppo.PPOConfig). The web process must not
import torch, so the services keep a copy of the defaults and describe the
fields a user may set; tests check the copies agree with the dataclasses.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from app.services.validation import as_id


@dataclass(frozen=True)
class Setting:
    """One field a user may set: a number in [low, high], a flag, or one of `choices`.
    `optional` numbers accept a blank value, stored as None."""

    name: str
    kind: type  # int | float | bool | str
    low: float = 0.0
    high: float = 0.0
    choices: tuple[str, ...] = ()
    optional: bool = False
    label: str = ""
    help: str = ""

    @property
    def title(self) -> str:
        return self.label or self.name.replace("_", " ").capitalize()


def _number(setting: Setting, raw: Any, default: Any) -> tuple[Any, str | None]:
    if raw is None or (isinstance(raw, str) and raw.strip() == ""):
        return (None, None) if setting.optional else (default, None)
    if isinstance(raw, bool):
        return None, "must be a number"
    try:
        value = float(raw.strip() if isinstance(raw, str) else raw)
    except (TypeError, ValueError):
        return None, "must be a whole number" if setting.kind is int else "must be a number"
    if not math.isfinite(value) or (setting.kind is int and not value.is_integer()):
        return None, "must be a whole number" if setting.kind is int else "must be a finite number"
    if not setting.low <= value <= setting.high:
        return None, f"must be {setting.low:g}..{setting.high:g}"
    return (int(value) if setting.kind is int else value), None


def as_flag(raw: Any) -> bool:
    """A checkbox or JSON flag: "on", "true", "1", "yes" or a true value."""
    if isinstance(raw, str):
        return raw.strip().lower() in ("1", "true", "on", "yes")
    return bool(raw)


def clean_config(values: Mapping[str, Any], defaults: Mapping[str, Any], settings: Sequence[Setting],
                 errors: dict[str, str], *, flags_from_form: bool = False) -> dict[str, Any]:
    """The defaults overlaid with the checked values of `settings`; a message per bad
    field goes into `errors`. A form leaves an unticked checkbox out, so with
    flags_from_form a missing flag is False (an API caller's missing flag keeps its default)."""
    config = dict(defaults)
    for setting in settings:
        present = setting.name in values
        if setting.kind is bool:
            if present or flags_from_form:
                config[setting.name] = as_flag(values.get(setting.name, False))
            continue
        if not present:
            continue
        raw = values[setting.name]
        if setting.kind is str:
            value = str(raw if raw is not None else "").strip() or defaults[setting.name]
            if setting.choices and value not in setting.choices:
                errors[setting.name] = f"one of {', '.join(setting.choices)}"
            config[setting.name] = value
            continue
        value, error = _number(setting, raw, defaults[setting.name])
        if error:
            errors[setting.name] = error
        config[setting.name] = value
    return config


def form_values(config: Mapping[str, Any], settings: Sequence[Setting]) -> dict[str, Any]:
    """What a form shows for `config`: strings for numbers (blank for None), booleans for flags."""
    shown: dict[str, Any] = {}
    for setting in settings:
        value = config.get(setting.name)
        if setting.kind is bool:
            shown[setting.name] = bool(value)
        else:
            shown[setting.name] = "" if value is None else str(value)
    return shown


def parse_ids(errors: dict[str, str], field: str, raw: Any, what: str) -> list[int]:
    """Distinct positive ids from a list (or one value); a message in errors[field] otherwise."""
    items = raw if isinstance(raw, list | tuple) else ([] if raw in (None, "") else [raw])
    ids: list[int] = []
    for item in items:
        value = as_id(item)
        if value is None:
            errors[field] = f"unknown {what} {str(item)[:20]!r}"
            return []
        ids.append(value)
    return sorted(set(ids))


def submitted_settings(form: Mapping[str, Any], settings: Sequence[Setting]) -> dict[str, Any]:
    """The settings' values from a submitted form, as the form shows them back on an error."""
    return {s.name: bool(form.get(s.name)) if s.kind is bool else str(form.get(s.name, "")) for s in settings}

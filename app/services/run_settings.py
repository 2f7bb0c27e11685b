"""Checking the settings of a training run as typed on a form or sent to the API.

The settings are the trainer's config dataclasses (trainer/configs.py, no torch):
the fields made with `setting(...)` are the ones a user may set, and their
metadata (label, help, range, choices) gives the forms, the API's listing and
the pydantic validation below. Every other field keeps its default.
"""

import dataclasses
import math
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache, cached_property
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, TypeAdapter, ValidationError

from app.services.errors import Invalid
from app.services.validation import as_id


def as_flag(raw: Any) -> bool:
    """A checkbox or JSON flag: "on", "true", "1", "yes" or a true value."""
    if isinstance(raw, str):
        return raw.strip().lower() in ("1", "true", "on", "yes")
    return bool(raw)


@dataclass(frozen=True)
class Setting:
    """One field a user may set: a number in [low, high], a flag, or one of `choices`.
    `optional` numbers accept a blank value, stored as None."""

    name: str
    kind: type  # int | float | bool | str
    default: Any
    low: float = 0.0
    high: float = 0.0
    choices: tuple[str, ...] = ()
    optional: bool = False
    label: str = ""
    help: str = ""

    @property
    def title(self) -> str:
        return self.label or self.name.replace("_", " ").capitalize()

    @cached_property
    def adapter(self) -> TypeAdapter:
        """The pydantic check of one submitted value (blank values are handled before it)."""
        if self.kind is bool:
            return TypeAdapter(Annotated[bool, BeforeValidator(as_flag)])
        if self.kind is str:
            return TypeAdapter(Annotated[Literal[self.choices], BeforeValidator(lambda raw: str(raw).strip())])
        number = Annotated[self.kind, BeforeValidator(self._number), Field(ge=self.low, le=self.high,
                                                                            allow_inf_nan=False)]
        return TypeAdapter(number | None if self.optional else number)

    def _number(self, raw: Any) -> Any:
        # A form sends text ("2.0" is a whole number, as JSON's 2.0); a JSON true is not a number.
        if isinstance(raw, bool):
            raise ValueError("must be a number")
        if isinstance(raw, str):
            try:
                raw = float(raw.strip())
            except ValueError:
                raise ValueError(self._not_a_number) from None
        if isinstance(raw, float) and not math.isfinite(raw):  # before the range check names the range
            raise ValueError("must be a whole number" if self.kind is int else "must be a finite number")
        return raw

    @property
    def _not_a_number(self) -> str:
        return "must be a whole number" if self.kind is int else "must be a number"

    def message(self, error: ValidationError) -> str:
        """What is wrong with the value, in the words the forms show beside the field."""
        first = error.errors()[0]
        kind = first["type"]
        if kind == "value_error":
            return str(first["ctx"]["error"])
        if kind in ("greater_than_equal", "less_than_equal"):
            return f"must be {self.low:g}..{self.high:g}"
        if kind == "literal_error":
            return f"one of {', '.join(self.choices)}"
        return self._not_a_number


@cache
def settings_of(config: type) -> tuple[Setting, ...]:
    """The fields of a trainer config (trainer/configs.py) a user may set, in the dataclass's order."""
    settings = []
    for f in dataclasses.fields(config):
        if "choices" not in f.metadata:  # a plain default, not a `setting(...)`
            continue
        kind, optional = f.type, False
        if isinstance(kind, types.UnionType):  # float | None
            kind, optional = next(t for t in kind.__args__ if t is not type(None)), True
        meta = f.metadata
        settings.append(Setting(f.name, kind, f.default, low=meta["ge"] or 0.0, high=meta["le"] or 0.0,
                                choices=meta["choices"], optional=optional, label=meta["label"], help=meta["help"]))
    return tuple(settings)


def defaults_of(config: type) -> dict[str, Any]:
    """Every field of a trainer config with its default: the base of a job's stored config."""
    return {f.name: f.default for f in dataclasses.fields(config)}


def clean_config(values: Mapping[str, Any], config: type, errors: dict[str, str], *,
                 flags_from_form: bool = False) -> dict[str, Any]:
    """The config's defaults overlaid with the checked values of its settings; a message
    per bad field goes into `errors` (a bad field's value is None). A form leaves an
    unticked checkbox out, so with flags_from_form a missing flag is False (an API
    caller's missing flag keeps its default). Keys that are no setting are ignored
    here: reject_unknown refuses them."""
    cleaned = defaults_of(config)
    for setting in settings_of(config):
        if setting.name not in values:
            if setting.kind is bool and flags_from_form:
                cleaned[setting.name] = False
            continue
        raw = values[setting.name]
        if setting.kind is not bool and (raw is None or (isinstance(raw, str) and not raw.strip())):
            if setting.optional:
                cleaned[setting.name] = None
            continue  # blank: the default
        try:
            cleaned[setting.name] = setting.adapter.validate_python(raw)
        except ValidationError as exc:
            errors[setting.name] = setting.message(exc)
            cleaned[setting.name] = None
    return cleaned


def reject_unknown(values: Mapping[str, Any], config: type) -> None:
    """Raise Invalid naming each key of `values` that is no setting of the config, so that
    a misspelt setting sent to the API is an error, not silently dropped."""
    known = {s.name for s in settings_of(config)}
    if unknown := sorted(set(values) - known):
        raise Invalid(f"Unknown setting '{unknown[0]}'; the settings are: {', '.join(sorted(known))}.",
                      errors={f"config.{name}": "unknown setting" for name in unknown})


def form_values(settings: Sequence[Setting]) -> dict[str, Any]:
    """What a form shows first: the defaults, as strings for numbers (blank for None)."""
    return {s.name: bool(s.default) if s.kind is bool else "" if s.default is None else str(s.default)
            for s in settings}


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

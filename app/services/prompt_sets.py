"""Prompt sets: creation and settings, counts, the status life cycle, and
queueing generation when a set starts or gets new prompts.

A set moves draft -> active (start) <-> paused (pause/resume), and any of those
-> archived. Labelers only get tasks from active sets; generation is queued
when a ranking set starts, resumes, or takes new prompts while active.
"""

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import case, exists, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.enums import JobKind, JobStatus, ModelKind, PromptSetKind, PromptSetStatus, Split
from app.db.models import Job, Model, Prompt, PromptSet, Response, Task
from app.services.errors import Conflict, Invalid, NotFound
from app.services.validation import text_problem

# The settings an admin chooses, with the table's own defaults (one source).
SETTING_FIELDS = (
    "k", "temperature", "top_p", "max_new_tokens", "seed", "overlap",
    "train_ratio", "validation_ratio", "rl_ratio",
)
DEFAULTS: dict[str, Any] = {
    name: PromptSet.__table__.c[name].default.arg for name in SETTING_FIELDS
} | {"kind": PromptSetKind.ranking, "instructions": "", "top_k": None}

GENERATOR_KINDS = (ModelKind.sft, ModelKind.policy)
MAX_BEST_OF_N = 32  # samples per prompt of a best-of-N round (the table's best_of_n_range check)
MAX_NAME_CHARS = 200
MAX_INSTRUCTIONS_CHARS = 50_000
MAX_OVERLAP = 100
MAX_SEED = 2**31 - 1  # the column is a 32-bit integer
MAX_TEMPERATURE = 5.0
RATIO_TOLERANCE = 1e-6  # the same tolerance as the table's split_ratios check
SPLITS = (Split.train, Split.validation, Split.rl)

ACTIVE_JOB_STATUSES = (JobStatus.queued, JobStatus.running)

# action: (statuses it may start from, status it leads to)
TRANSITIONS: dict[str, tuple[tuple[PromptSetStatus, ...], PromptSetStatus]] = {
    "start": ((PromptSetStatus.draft,), PromptSetStatus.active),
    "pause": ((PromptSetStatus.active,), PromptSetStatus.paused),
    "resume": ((PromptSetStatus.paused,), PromptSetStatus.active),
    "archive": (
        (PromptSetStatus.draft, PromptSetStatus.active, PromptSetStatus.paused),
        PromptSetStatus.archived,
    ),
}


# ---- prompt identity and split -------------------------------------------------

def canonical_messages(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """Only role and content, with Windows/old-Mac line ends made '\\n', so the same
    prompt saved by another editor is the same prompt."""
    return [
        {"role": m["role"], "content": m["content"].replace("\r\n", "\n").replace("\r", "\n")}
        for m in messages
    ]


def prompt_hash(messages: Sequence[Mapping[str, str]]) -> str:
    """SHA-256 of the canonical JSON of the messages: duplicates and splits derive from it."""
    canonical = json.dumps(canonical_messages(messages), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def split_for(text_hash: str, *, train_ratio: float, validation_ratio: float, rl_ratio: float) -> Split:
    """The split of a prompt: its hash read as a number in [0, 1) against the
    cumulative ratios. The same text always lands in the same split, so a
    re-import never moves a prompt (and never leaks validation into training)."""
    u = int(text_hash[:16], 16) / 2**64
    cumulative = 0.0
    ratios = [(Split.train, train_ratio), (Split.validation, validation_ratio), (Split.rl, rl_ratio)]
    for split, ratio in ratios:
        cumulative += ratio
        if ratio > 0 and u < cumulative:
            return split
    # Ratios summing to 1 - epsilon leave a sliver at the top: the last non-empty split takes it.
    return next(split for split, ratio in reversed(ratios) if ratio > 0)


# ---- settings validation ------------------------------------------------------

_REFUSED = object()


def _number_input(errors: dict[str, str], name: str, raw: Any, wrong: str) -> Any:
    """The raw value (stripped when text), or _REFUSED with the error noted: a JSON
    true/false is no number (`wrong`), a blank is missing."""
    if isinstance(raw, bool):
        errors[name] = wrong
        return _REFUSED
    if isinstance(raw, str):
        raw = raw.strip()
        if not raw:
            errors[name] = "required"
            return _REFUSED
    return raw


def _as_int(errors: dict[str, str], name: str, raw: Any, lo: int, hi: int) -> int | None:
    raw = _number_input(errors, name, raw, "must be a whole number")
    if raw is _REFUSED:
        return None
    try:
        value = int(raw) if not isinstance(raw, float) or raw.is_integer() else None
    except (TypeError, ValueError):
        value = None
    if value is None:
        errors[name] = "must be a whole number"
    elif not lo <= value <= hi:
        errors[name] = f"must be {lo}..{hi}"
    else:
        return value
    return None


def _as_float(errors: dict[str, str], name: str, raw: Any) -> float | None:
    raw = _number_input(errors, name, raw, "must be a number")
    if raw is _REFUSED:
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        errors[name] = "must be a number"
        return None
    if not math.isfinite(value):
        errors[name] = "must be a finite number"
        return None
    return value


def _clean_settings(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Check the numeric settings; returns (clean values, errors by field)."""
    errors: dict[str, str] = {}
    clean: dict[str, Any] = {}
    if "k" in values:
        clean["k"] = _as_int(errors, "k", values["k"], 2, 9)
    if "max_new_tokens" in values:
        clean["max_new_tokens"] = _as_int(errors, "max_new_tokens", values["max_new_tokens"], 1, 4096)
    if "seed" in values:
        clean["seed"] = _as_int(errors, "seed", values["seed"], 0, MAX_SEED)
    if "overlap" in values:
        clean["overlap"] = _as_int(errors, "overlap", values["overlap"], 1, MAX_OVERLAP)
    if "temperature" in values:
        t = clean["temperature"] = _as_float(errors, "temperature", values["temperature"])
        if t is not None and not 0 < t <= MAX_TEMPERATURE:
            errors["temperature"] = f"must be greater than 0 and at most {MAX_TEMPERATURE:g}"
    if "top_p" in values:
        p = clean["top_p"] = _as_float(errors, "top_p", values["top_p"])
        if p is not None and not 0 < p <= 1:
            errors["top_p"] = "must be greater than 0 and at most 1"
    ratio_names = ("train_ratio", "validation_ratio", "rl_ratio")
    if any(n in values for n in ratio_names):
        for n in ratio_names:
            r = clean[n] = _as_float(errors, n, values.get(n, ""))
            if r is not None and not 0 <= r <= 1:
                errors[n] = "must be between 0 and 1"
        ratios = [clean[n] for n in ratio_names]
        if not any(n in errors for n in ratio_names):
            total = sum(ratios)
            if abs(total - 1) >= RATIO_TOLERANCE:
                errors["ratios"] = f"train + validation + rl must add up to 1 (they add up to {total:g})"
    return clean, errors


def _clean_top_k(errors: dict[str, str], raw: Any, k: int | None) -> int | None:
    """Partial rankings: blank/None = rank every response, else 1 <= top_k < K."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    top_k = _as_int(errors, "top_k", raw, 1, 8)
    if top_k is not None and k is not None and top_k >= k:
        errors["top_k"] = f"must be less than K ({k}), or blank to rank every response"
        return None
    return top_k


def _clean_name(errors: dict[str, str], name: Any) -> str:
    name = (name or "").strip() if isinstance(name, str) else ""
    if not name:
        errors["name"] = "required"
    elif len(name) > MAX_NAME_CHARS:
        errors["name"] = f"at most {MAX_NAME_CHARS} characters"
    elif text_problem(name):
        errors["name"] = text_problem(name)
    return name


def _clean_instructions(errors: dict[str, str], instructions: Any) -> str:
    if not isinstance(instructions, str):
        errors["instructions"] = "must be text"
        return ""
    if len(instructions) > MAX_INSTRUCTIONS_CHARS:
        errors["instructions"] = f"at most {MAX_INSTRUCTIONS_CHARS:,} characters"
    elif text_problem(instructions):
        errors["instructions"] = text_problem(instructions)
    return instructions.replace("\r\n", "\n")


def list_generator_models(session: Session) -> Sequence[Model]:
    """Models that can generate responses (SFT and policy checkpoints), defaults first."""
    return session.scalars(
        select(Model)
        .where(Model.kind.in_(GENERATOR_KINDS))
        .order_by(Model.is_default.desc(), Model.kind, Model.created_at.desc(), Model.id.desc())
    ).all()


def default_generator_model(session: Session) -> Model | None:
    """The default SFT model, else the default policy, else None."""
    return session.scalar(
        select(Model)
        .where(Model.kind.in_(GENERATOR_KINDS), Model.is_default)
        .order_by(case((Model.kind == ModelKind.sft, 0), else_=1))
        .limit(1)
    )


def _clean_generator(errors: dict[str, str], session: Session, raw: Any) -> int | None:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        default = default_generator_model(session)
        return default.id if default else None
    model_id = _as_int(errors, "generator_model_id", raw, 1, 2**31 - 1)
    if model_id is None:
        return None
    model = session.get(Model, model_id)
    if model is None or model.kind not in GENERATOR_KINDS:
        errors["generator_model_id"] = "choose an SFT or policy model from the list"
        return None
    return model.id


def clean_best_of_n(errors: dict[str, str], session: Session, *, kind: PromptSetKind, k: int | None,
                    n: Any, reward_model_id: Any) -> tuple[int | None, int | None]:
    """A ranking round's generator mode: (N, reward model id) for best-of-N rounds (the K
    responses with the highest reward of N samples per prompt), (None, None) for plain
    rounds (N blank). The reward model defaults to the default one. Errors go under
    best_of_n and best_of_n_reward_model_id."""
    if n is None or (isinstance(n, str) and not n.strip()):
        return None, None
    if kind != PromptSetKind.ranking:
        errors["best_of_n"] = "best-of-N rounds are for ranking sets"
        return None, None
    clean_n = _as_int(errors, "best_of_n", n, 2, MAX_BEST_OF_N)
    if clean_n is not None and k is not None and clean_n <= k:
        errors["best_of_n"] = f"must be more than K ({k}) and at most {MAX_BEST_OF_N}: the round shows the best K of N"
        clean_n = None
    from app.services.models import choose_model, default_reward_model  # models imports this module

    model = choose_model(errors, session, "best_of_n_reward_model_id", reward_model_id, (ModelKind.reward,),
                         default_reward_model(session), "a reward model")
    return clean_n, model.id if model else None


def _clean_kind(errors: dict[str, str], raw: Any) -> PromptSetKind:
    try:
        return PromptSetKind(raw)
    except ValueError:
        choices = ", ".join(k.value for k in PromptSetKind)
        errors["kind"] = f"must be one of {choices}"
        return PromptSetKind.ranking


def _check_name_free(session: Session, name: str, *, exclude_id: int | None = None) -> None:
    query = select(PromptSet.id).where(func.lower(PromptSet.name) == name.lower())
    if exclude_id is not None:
        query = query.where(PromptSet.id != exclude_id)
    if name and session.scalar(query.limit(1)) is not None:
        raise Conflict(f"A prompt set named '{name}' already exists.", errors={"name": "already taken"})


# ---- use cases ----------------------------------------------------------------

def create_prompt_set(
    session: Session,
    *,
    name: str,
    instructions: str = "",
    generator_model_id: int | str | None = None,
    k: int | str = DEFAULTS["k"],
    temperature: float | str = DEFAULTS["temperature"],
    top_p: float | str = DEFAULTS["top_p"],
    max_new_tokens: int | str = DEFAULTS["max_new_tokens"],
    seed: int | str = DEFAULTS["seed"],
    overlap: int | str = DEFAULTS["overlap"],
    train_ratio: float | str = DEFAULTS["train_ratio"],
    validation_ratio: float | str = DEFAULTS["validation_ratio"],
    rl_ratio: float | str = DEFAULTS["rl_ratio"],
    kind: PromptSetKind | str = PromptSetKind.ranking,
    pairwise: bool | str = False,
    model_ids: Any = None,
    source_set_ids: Any = None,
    top_k: int | str | None = None,
    best_of_n: int | str | None = None,
    best_of_n_reward_model_id: int | str | None = None,
    created_by_id: int | None = None,
) -> PromptSet:
    """Create a draft set. Values may be strings from a form. Raises Invalid with a
    message per field ({"k": "must be 2..9"}), Conflict if the name is taken.
    No generator given: the default SFT (else policy) model, if one is registered.
    `pairwise`: a ranking set with K = 2 labeled on the A/B page. An evaluation set
    (app/services/evaluation.py) takes `model_ids` (two or more) and may take the
    validation prompts of ranking sets (`source_set_ids`); it is always pairwise,
    K = 2, and every prompt of it is in the validation split. `best_of_n` (blank: off)
    and `best_of_n_reward_model_id`: see clean_best_of_n."""
    errors: dict[str, str] = {}
    name = _clean_name(errors, name)
    instructions = _clean_instructions(errors, instructions)
    kind = _clean_kind(errors, kind)
    settings = {
        "k": k, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
        "seed": seed, "overlap": overlap, "train_ratio": train_ratio,
        "validation_ratio": validation_ratio, "rl_ratio": rl_ratio,
    }
    evaluated: list[int] = []
    sources: list[int] = []
    if kind == PromptSetKind.evaluation:
        from app.services import evaluation  # it reads results through export; load it only here

        evaluated = evaluation.clean_models(errors, session, model_ids)
        sources = evaluation.clean_sources(errors, session, source_set_ids)
        settings |= {"k": 2, "train_ratio": 0.0, "validation_ratio": 1.0, "rl_ratio": 0.0}
        pairwise = True
        model_id = None
    else:
        model_id = _clean_generator(errors, session, generator_model_id)
        pairwise = _as_flag(pairwise)
    clean, setting_errors = _clean_settings(settings)
    errors |= setting_errors
    if pairwise and clean.get("k") not in (None, 2):
        errors["pairwise"] = "the A/B page compares two responses: set K to 2"
    clean_top_k = _clean_top_k(errors, top_k, clean.get("k"))
    n, reward_id = clean_best_of_n(errors, session, kind=kind, k=clean.get("k"), n=best_of_n,
                                   reward_model_id=best_of_n_reward_model_id)
    if errors:
        raise Invalid(_summary(errors), errors=errors)
    _check_name_free(session, name)
    prompt_set = PromptSet(
        name=name, instructions=instructions, kind=kind, generator_model_id=model_id, pairwise=pairwise,
        created_by_id=created_by_id, status=PromptSetStatus.draft, top_k=clean_top_k,
        best_of_n=n, best_of_n_reward_model_id=reward_id, **clean,
    )
    session.add(prompt_set)
    if kind == PromptSetKind.evaluation:
        try:
            session.flush()
        except IntegrityError:
            session.rollback()
            raise Conflict(f"A prompt set named '{name}' already exists.", errors={"name": "already taken"}) from None
        evaluation.add_models(session, prompt_set, evaluated)
        evaluation.copy_validation_prompts(session, prompt_set, sources)
    _commit_name(session, name)
    return prompt_set


def _as_flag(raw: Any) -> bool:
    """A checkbox or JSON boolean: "on", "true", "1", True."""
    if isinstance(raw, str):
        return raw.strip().lower() in ("on", "true", "1", "yes")
    return bool(raw)


def _commit_name(session: Session, name: str) -> None:
    """Commit; a set of the same name created at the same moment is a Conflict, not a 500."""
    try:
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        if "name" not in str(exc.orig):
            raise
        raise Conflict(f"A prompt set named '{name}' already exists.", errors={"name": "already taken"}) from None


def update_prompt_set(session: Session, *, prompt_set: PromptSet, **values: Any) -> PromptSet:
    """Change name, instructions, generator or settings (only the keys given).
    Split ratios are fixed once the set has prompts: changing them would move
    prompts between splits. top_k may change at any time (each annotation keeps
    the top_k it was made under). Raises Invalid per field, Conflict for a taken
    name or an archived set."""
    allowed = {"name", "instructions", "generator_model_id", "pairwise", "top_k", "best_of_n",
               "best_of_n_reward_model_id", *SETTING_FIELDS}
    unknown = set(values) - allowed
    if unknown:
        raise Invalid(f"Unknown settings: {', '.join(sorted(unknown))}.",
                      errors={u: "unknown setting" for u in sorted(unknown)})
    if prompt_set.status == PromptSetStatus.archived:
        raise Conflict("An archived prompt set cannot be changed.")
    errors: dict[str, str] = {}
    changes: dict[str, Any] = {}
    if "name" in values:
        changes["name"] = _clean_name(errors, values["name"])
    if "instructions" in values:
        changes["instructions"] = _clean_instructions(errors, values["instructions"])
    if "generator_model_id" in values:
        changes["generator_model_id"] = _clean_generator(errors, session, values["generator_model_id"])
    settings = {n: values[n] for n in SETTING_FIELDS if n in values}
    ratio_names = ("train_ratio", "validation_ratio", "rl_ratio")
    if any(n in settings for n in ratio_names):
        # Ratios are checked together: fill the missing ones from the set.
        settings = {n: getattr(prompt_set, n) for n in ratio_names} | settings
    clean, setting_errors = _clean_settings(settings)
    errors |= setting_errors
    if "pairwise" in values:
        changes["pairwise"] = _as_flag(values["pairwise"])
        if prompt_set.kind == PromptSetKind.evaluation and not changes["pairwise"]:
            errors["pairwise"] = "an evaluation set is always labeled on the A/B page"
        elif prompt_set.kind == PromptSetKind.demonstration and changes["pairwise"]:
            errors["pairwise"] = "a demonstration set has no responses to compare"
    pairwise_after = changes.get("pairwise", prompt_set.pairwise)
    if pairwise_after and clean.get("k", prompt_set.k) != 2 and "k" not in errors:
        errors["k" if "k" in clean else "pairwise"] = "the A/B page compares two responses: K must be 2"
    if prompt_set.kind == PromptSetKind.evaluation:
        changes.pop("generator_model_id", None)  # its models are prompt_set_models
        if any(n in clean and clean[n] != getattr(prompt_set, n) for n in ("k", *ratio_names)):
            errors["settings"] = "an evaluation set's K and splits are fixed"
    if "top_k" in values or ("k" in clean and prompt_set.top_k is not None):
        # Checked against the new K when both change, and again when only K does.
        new_k = clean.get("k", prompt_set.k)
        changes["top_k"] = _clean_top_k(errors, values.get("top_k", prompt_set.top_k), new_k)
    if "best_of_n" in values or "best_of_n_reward_model_id" in values or (
            "k" in clean and prompt_set.best_of_n is not None):
        # The mode is checked against the new K, and again when only K changes.
        changes["best_of_n"], changes["best_of_n_reward_model_id"] = clean_best_of_n(
            errors, session, kind=prompt_set.kind, k=clean.get("k", prompt_set.k),
            n=values.get("best_of_n", prompt_set.best_of_n),
            reward_model_id=values.get("best_of_n_reward_model_id", prompt_set.best_of_n_reward_model_id))
    if not errors and any(n in clean and clean[n] != getattr(prompt_set, n) for n in ratio_names):
        if count_prompts(session, prompt_set.id):
            errors["ratios"] = "fixed once prompts are imported (it would move prompts between splits)"
    if errors:
        raise Invalid(_summary(errors), errors=errors)
    if "name" in changes:
        _check_name_free(session, changes["name"], exclude_id=prompt_set.id)
    for key, value in (changes | clean).items():
        setattr(prompt_set, key, value)
    _commit_name(session, prompt_set.name)
    return prompt_set


def _summary(errors: dict[str, str]) -> str:
    fields = ", ".join(errors)
    return f"Please correct the highlighted fields: {fields}."


def get_prompt_set(session: Session, prompt_set_id: int) -> PromptSet:
    """The set with this id; raises NotFound."""
    prompt_set = session.get(PromptSet, prompt_set_id)
    if prompt_set is None:
        raise NotFound(f"No prompt set with id {prompt_set_id}.")
    return prompt_set


def count_prompts(session: Session, prompt_set_id: int) -> int:
    return session.scalar(select(func.count()).where(Prompt.prompt_set_id == prompt_set_id)) or 0


@dataclass
class PromptSetCounts:
    """What a set holds, for its current generation round."""

    prompts: int = 0
    responses: int = 0
    tasks: int = 0
    # Tasks labelers can still take (fewer labels than the set's overlap).
    tasks_ready: int = 0
    # Tasks labeled by as many labelers as the overlap asks.
    tasks_labeled: int = 0
    prompts_per_split: dict[str, int] = field(default_factory=lambda: {s.value: 0 for s in SPLITS})
    tasks_per_split: dict[str, int] = field(default_factory=lambda: {s.value: 0 for s in SPLITS})


def counts_for(session: Session, prompt_set_ids: Sequence[int]) -> dict[int, PromptSetCounts]:
    """Counts of several sets in three grouped queries."""
    out = {i: PromptSetCounts() for i in prompt_set_ids}
    if not out:
        return out
    ids = list(out)
    for set_id, split, n in session.execute(
        select(Prompt.prompt_set_id, Prompt.split, func.count())
        .where(Prompt.prompt_set_id.in_(ids))
        .group_by(Prompt.prompt_set_id, Prompt.split)
    ):
        out[set_id].prompts += n
        out[set_id].prompts_per_split[Split(split).value] = n
    for set_id, n in session.execute(
        select(Prompt.prompt_set_id, func.count(Response.id))
        .join(Response, Response.prompt_id == Prompt.id)
        .join(PromptSet, PromptSet.id == Prompt.prompt_set_id)
        .where(Prompt.prompt_set_id.in_(ids), Response.round == PromptSet.round)
        .group_by(Prompt.prompt_set_id)
    ):
        out[set_id].responses = n
    labeled = Task.num_labels >= PromptSet.overlap
    for set_id, split, total, done in session.execute(
        select(Task.prompt_set_id, Prompt.split, func.count(), func.count().filter(labeled))
        .join(PromptSet, PromptSet.id == Task.prompt_set_id)
        .join(Prompt, Prompt.id == Task.prompt_id)
        .where(Task.prompt_set_id.in_(ids), Task.round == PromptSet.round)
        .group_by(Task.prompt_set_id, Prompt.split)
    ):
        c = out[set_id]
        c.tasks += total
        c.tasks_labeled += done
        c.tasks_ready += total - done
        c.tasks_per_split[Split(split).value] = total
    return out


def counts(session: Session, prompt_set: PromptSet) -> PromptSetCounts:
    return counts_for(session, [prompt_set.id])[prompt_set.id]


@dataclass(frozen=True)
class BestOfNFigures:
    """A best-of-N round so far: its tasks, the mean reward of the responses shown and of all N."""

    tasks: int
    shown_reward: float | None
    mean_reward: float | None


def best_of_n_figures(session: Session, prompt_set: PromptSet) -> BestOfNFigures:
    """From the tasks' records (tasks.selection) of the set's current round."""
    row = session.execute(text("""
        SELECT count(DISTINCT t.id), avg(c.reward) FILTER (WHERE tr.response_id IS NOT NULL), avg(c.reward)
        FROM tasks t
        CROSS JOIN LATERAL jsonb_to_recordset(t.selection -> 'candidates') AS c(response_id int, reward float)
        LEFT JOIN task_responses tr ON tr.task_id = t.id AND tr.response_id = c.response_id
        WHERE t.prompt_set_id = :set_id AND t.round = :round AND t.selection ->> 'mode' = 'best_of_n'
    """), {"set_id": prompt_set.id, "round": prompt_set.round}).one()
    return BestOfNFigures(row[0], row[1], row[2])


@dataclass
class PromptSetSummary:
    prompt_set: PromptSet
    counts: PromptSetCounts
    generation_job: Job | None


def list_prompt_sets(session: Session, *, include_archived: bool = True) -> list[PromptSetSummary]:
    """Sets newest first (archived last), with their counts and latest generation job."""
    query = select(PromptSet).order_by(
        (PromptSet.status == PromptSetStatus.archived), PromptSet.created_at.desc(), PromptSet.id.desc()
    )
    if not include_archived:
        query = query.where(PromptSet.status != PromptSetStatus.archived)
    sets = session.scalars(query).all()
    all_counts = counts_for(session, [s.id for s in sets])
    jobs = latest_generation_jobs(session, [s.id for s in sets])
    return [PromptSetSummary(s, all_counts[s.id], jobs.get(s.id)) for s in sets]


def latest_generation_jobs(session: Session, prompt_set_ids: Sequence[int]) -> dict[int, Job]:
    if not prompt_set_ids:
        return {}
    latest = (
        select(func.max(Job.id))
        .where(Job.kind == JobKind.generate, Job.prompt_set_id.in_(list(prompt_set_ids)))
        .group_by(Job.prompt_set_id)
    )
    return {j.prompt_set_id: j for j in session.scalars(select(Job).where(Job.id.in_(latest)))}


def latest_generation_job(session: Session, prompt_set: PromptSet) -> Job | None:
    """The set's most recent generate job, whatever its status."""
    return latest_generation_jobs(session, [prompt_set.id]).get(prompt_set.id)


def active_generation_job(session: Session, prompt_set_id: int) -> Job | None:
    return session.scalar(
        select(Job)
        .where(Job.kind == JobKind.generate, Job.prompt_set_id == prompt_set_id,
               Job.status.in_(ACTIVE_JOB_STATUSES))
        .order_by(Job.id.desc())
        .limit(1)
    )


def prompts_awaiting_generation(session: Session, prompt_set: PromptSet) -> int:
    """Prompts of the set with no task in its current round yet."""
    has_task = exists().where(Task.prompt_id == Prompt.id, Task.round == prompt_set.round)
    return session.scalar(
        select(func.count()).where(Prompt.prompt_set_id == prompt_set.id, ~has_task)
    ) or 0


def queue_generation_if_needed(session: Session, *, prompt_set: PromptSet, created_by_id: int | None) -> Job | None:
    """Queue a generate job when an active ranking or evaluation set has prompts without tasks
    and none is queued or running yet. Does not commit. The set's row is locked
    first, so two imports at once queue one job, not two."""
    if prompt_set.status != PromptSetStatus.active or prompt_set.kind == PromptSetKind.demonstration:
        return None
    from app.services.jobs import enqueue_job  # jobs imports the queue; load it only when needed

    session.execute(select(PromptSet.id).where(PromptSet.id == prompt_set.id).with_for_update())
    if active_generation_job(session, prompt_set.id) is not None:
        return None
    if not prompts_awaiting_generation(session, prompt_set):
        return None
    return enqueue_job(
        session, kind=JobKind.generate, params={"prompt_set_id": prompt_set.id},
        created_by_id=created_by_id, prompt_set_id=prompt_set.id, commit=False,
    )


def _transition(session: Session, prompt_set: PromptSet, action: str) -> None:
    """Lock the set's row, check the action is allowed from its status, and move it."""
    sources, target = TRANSITIONS[action]
    # Lock the row: two admins pressing buttons at once see each other's change.
    session.refresh(prompt_set, with_for_update=True)
    if prompt_set.status not in sources:
        allowed = " or ".join(s.value for s in sources)
        raise Conflict(
            f"Cannot {action} the prompt set '{prompt_set.name}': it is {prompt_set.status.value},"
            f" and only {allowed} sets can be {action.removesuffix('e')}ed."
        )
    prompt_set.status = target


def start_prompt_set(session: Session, *, prompt_set: PromptSet, user_id: int | None) -> Job | None:
    """Make a draft set active and queue generation of its responses. Raises
    Conflict unless the set is a draft with prompts. Returns the queued job
    (None for demonstration sets, which need no generated responses)."""
    if prompt_set.status == PromptSetStatus.draft and not count_prompts(session, prompt_set.id):
        raise Conflict("Import prompts before starting the set: it has none yet.")
    _transition(session, prompt_set, "start")
    if prompt_set.generator_model_id is None and prompt_set.kind != PromptSetKind.evaluation:
        default = default_generator_model(session)
        prompt_set.generator_model_id = default.id if default else None
    job = queue_generation_if_needed(session, prompt_set=prompt_set, created_by_id=user_id)
    session.commit()
    return job


def pause_prompt_set(session: Session, *, prompt_set: PromptSet) -> None:
    """Active -> paused: labelers get no new tasks from it, and its generation job
    stops at its next batch (trainer/generate.py); resume queues the rest. Raises
    Conflict unless the set is active."""
    _transition(session, prompt_set, "pause")
    session.commit()


def resume_prompt_set(session: Session, *, prompt_set: PromptSet, user_id: int | None) -> Job | None:
    """Paused -> active; queues generation for prompts imported while paused."""
    _transition(session, prompt_set, "resume")
    job = queue_generation_if_needed(session, prompt_set=prompt_set, created_by_id=user_id)
    session.commit()
    return job


def archive_prompt_set(session: Session, *, prompt_set: PromptSet) -> None:
    """Any set that is not archived yet -> archived: hidden from labelers, takes no
    new prompts, and its queued or running generation is cancelled; its data stays
    for export and training. Raises Conflict if archived already."""
    _transition(session, prompt_set, "archive")
    job = active_generation_job(session, prompt_set.id)
    session.commit()
    if job is not None:
        from app.services.jobs import request_cancel

        try:
            request_cancel(session, job_id=job.id)
        except Conflict:
            pass  # it finished in the meantime

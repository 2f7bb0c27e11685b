"""Evaluation sets: blind A/B comparisons of two or more models, and their results.

An evaluation set is a prompt set of kind `evaluation` that names the models it
compares (prompt_set_models, in the order chosen). Its prompts are imported (the
ordinary import path) or copied from the validation split of ranking sets, so no
policy was trained on them; every prompt of an evaluation set is in its
validation split. The generate job (trainer/generate.py) samples one response per
(prompt, model) with the set's sampling settings and the same seed per prompt for
every model, stored with sample_index = the model's position.

Pairs: each prompt gets one task comparing one pair of models. With n models
there are n(n-1)/2 pairs, and the prompts in id order take them round robin
(prompt r gets pair r mod P), so every pair gets the same number of prompts, to
one. Sides: the j-th prompt of a pair shows its first model as A or B by a
seeded coin per block of two prompts (j // 2), the two prompts of a block taking
opposite sides: random per task, balanced to one per pair. The side is stored
as the task's response order (task_responses.position 0 = A).

Labeling is the ranking sets' own (leases, overlap, gold, exclusion, agreement:
app/services/assignment.py, annotations.py, gold.py, agreement.py, labelers.py);
a vote is stored as votes + ratings (ranks) + comparisons (see annotations.py).

Results: per pair of models, wins, losses, ties (a tie or both bad, counted
half) and the win rate with a 95% Wilson interval (app/services/ratings.py);
the same per labeler; the labelers' agreement on shared tasks; mean response
length per model. Only the data that counts (export.included_annotations_query:
not excluded, not gold) enters them.

Automatic figures (engineers start an `eval_figures` job, trainer/eval_figures_job.py):
a reward model's score of every response, and each policy's KL from its reference
on its responses. Read beside the votes: per pair of models, the reward model's win
rate on the same tasks (ties half) and its agreement with the human votes that
chose a side; per policy, the KL estimate.
"""

import hashlib
import itertools
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from app import queue
from app.db.enums import JobKind, JobStatus, ModelKind, PromptSetKind, Split, VoteOutcome
from app.db.models import (
    Annotation,
    Job,
    Model,
    Prompt,
    PromptSet,
    PromptSetModel,
    Response,
    Task,
    TaskResponse,
    User,
    Vote,
)
from app.services import models as registry
from app.services.agreement import compute_set_agreement
from app.services.errors import Conflict, Invalid, NotFound, raise_for_fields
from app.services.export import included_annotations_query
from app.services.jobs import enqueue_job
from app.services.ratings import WinRate, win_rate
from app.services.validation import small_int
from trainer.configs import EvalFiguresConfig

# Causal LMs of the registry: what can answer a prompt.
EVALUABLE_KINDS = (ModelKind.sft, ModelKind.policy)
MIN_MODELS = 2
MAX_MODELS = 9  # prompt_set_models.position 0..8 (and sample_index per model)


# ---- choosing models and prompts ---------------------------------------------------

def evaluable_models(session: Session) -> list[Model]:
    """Models an evaluation may compare (SFT and policies), defaults first, newest next."""
    return list(session.scalars(
        select(Model).where(Model.kind.in_(EVALUABLE_KINDS))
        .order_by(Model.is_default.desc(), Model.kind, Model.created_at.desc(), Model.id.desc())
    ))


def _ids(raw: Any) -> list[Any]:
    if raw is None or raw == "":
        return []
    if isinstance(raw, (str, int)):
        return [raw]
    return list(raw)


def _distinct_ids(errors: dict[str, str], field: str, raw: Any, noun: str) -> list[int] | None:
    """The ids in `raw` without repeats, in the order given; None, with the error under `field`,
    when a value is not an id."""
    ids: list[int] = []
    for value in _ids(raw):
        id_ = small_int(value)
        if id_ is None:
            errors[field] = f"{value!r} is not a {noun} id"
            return None
        if id_ not in ids:
            ids.append(id_)
    return ids


def clean_models(errors: dict[str, str], session: Session, raw: Any) -> list[int]:
    """Two to nine distinct SFT or policy models, in the order given."""
    ids = _distinct_ids(errors, "model_ids", raw, "model")
    if ids is None:
        return []
    if len(ids) < MIN_MODELS:
        errors["model_ids"] = f"choose at least {MIN_MODELS} different models"
        return []
    if len(ids) > MAX_MODELS:
        errors["model_ids"] = f"choose at most {MAX_MODELS} models"
        return []
    found = {m.id: m for m in session.scalars(select(Model).where(Model.id.in_(ids)))}
    wrong = [i for i in ids if i not in found or found[i].kind not in EVALUABLE_KINDS]
    if wrong:
        errors["model_ids"] = f"model {wrong[0]} is not an SFT or policy model of the registry"
        return []
    return ids


def clean_sources(errors: dict[str, str], session: Session, raw: Any) -> list[int]:
    """Ranking sets whose validation prompts the evaluation takes (may be none)."""
    ids = _distinct_ids(errors, "source_set_ids", raw, "prompt set")
    if not ids:
        return []
    found = {s.id: s for s in session.scalars(select(PromptSet).where(PromptSet.id.in_(ids)))}
    wrong = [i for i in ids if i not in found or found[i].kind != PromptSetKind.ranking]
    if wrong:
        errors["source_set_ids"] = f"prompt set {wrong[0]} is not a ranking set"
        return []
    return ids


def add_models(session: Session, prompt_set: PromptSet, model_ids: Sequence[int]) -> None:
    """The set's models in the order chosen. Does not commit."""
    session.add_all(PromptSetModel(prompt_set_id=prompt_set.id, model_id=model_id, position=position)
                    for position, model_id in enumerate(model_ids))


def copy_validation_prompts(session: Session, prompt_set: PromptSet, source_set_ids: Sequence[int]) -> int:
    """Copy the validation prompts of ranking sets into the evaluation set (a prompt in
    several sources once). Returns how many were added. Does not commit."""
    from app.services.prompt_import import insert_new_prompts, prompt_row

    if not source_set_ids:
        return 0
    rows = [
        prompt_row(prompt_set, messages=list(p.messages), text_hash=p.text_hash, external_id=p.external_id,
                   meta={"source_prompt_set_id": p.prompt_set_id, "source_prompt_id": p.id})
        for p in session.scalars(
            select(Prompt).where(Prompt.prompt_set_id.in_(list(source_set_ids)), Prompt.split == Split.validation)
            .order_by(Prompt.id)
        )
    ]
    if not rows:
        return 0
    return len(insert_new_prompts(session, rows))


def set_models(session: Session, prompt_set_id: int) -> list[Model]:
    """The evaluation set's models in position order."""
    return list(session.scalars(
        select(Model).join(PromptSetModel, PromptSetModel.model_id == Model.id)
        .where(PromptSetModel.prompt_set_id == prompt_set_id).order_by(PromptSetModel.position)
    ))


def get_evaluation(session: Session, prompt_set_id: int) -> PromptSet:
    """The evaluation set with this id; NotFound for any other id (or kind)."""
    prompt_set = session.get(PromptSet, prompt_set_id)
    if prompt_set is None or prompt_set.kind != PromptSetKind.evaluation:
        raise NotFound(f"No evaluation with id {prompt_set_id}.")
    return prompt_set


def list_evaluations(session: Session) -> list[PromptSet]:
    return list(session.scalars(
        select(PromptSet).where(PromptSet.kind == PromptSetKind.evaluation)
        .order_by(PromptSet.created_at.desc(), PromptSet.id.desc())
    ))


def count_validation_prompts(session: Session, source_set_ids: Sequence[int]) -> int:
    if not source_set_ids:
        return 0
    return session.scalar(select(func.count()).where(
        Prompt.prompt_set_id.in_(list(source_set_ids)), Prompt.split == Split.validation)) or 0


def create_evaluation(session: Session, *, name: Any, model_ids: Any, source_set_ids: Any = None,
                      prompts: str | None = None, prompts_format: str | None = None, instructions: Any = "",
                      created_by_id: int | None = None, **settings: Any) -> PromptSet:
    """Create an evaluation set, take its prompts (pasted or uploaded text through the
    prompt import, and/or the validation prompts of ranking sets) and start it, which
    queues the generation of every model's responses. All or nothing: a refusal
    leaves no set behind. `settings`: temperature, top_p, max_new_tokens, seed,
    overlap. Raises Invalid per field (name, model_ids, source_set_ids, prompts, ...),
    Conflict for a taken name."""
    from app.services import prompt_import, prompt_sets

    errors: dict[str, str] = {}
    sources = clean_sources(errors, session, source_set_ids)
    text = prompts if isinstance(prompts, str) else ""
    if text.strip():
        try:
            prompt_import.parse_prompts(text, format=None if prompts_format in (None, "", "auto") else prompts_format)
        except Invalid as exc:
            errors["prompts"] = exc.message.removeprefix("Nothing was imported: ")
    elif not sources:
        errors["prompts"] = "paste prompts, or choose ranking sets whose validation prompts to use"
    if sources and not text.strip() and not count_validation_prompts(session, sources):
        errors["source_set_ids"] = "these ranking sets have no validation prompts yet"
    unknown = set(settings) - {"temperature", "top_p", "max_new_tokens", "seed", "overlap"}
    if unknown:
        errors |= {u: "unknown setting" for u in sorted(unknown)}
    try:
        prompt_set = prompt_sets.create_prompt_set(
            session, name=name, instructions=instructions, kind=PromptSetKind.evaluation, model_ids=model_ids,
            source_set_ids=sources, created_by_id=created_by_id,
            **{k: v for k, v in settings.items() if k not in unknown})
    except Invalid as exc:
        errors = dict(exc.errors) | errors if isinstance(exc.errors, dict) else errors
        raise Invalid(f"Please correct the highlighted fields: {', '.join(errors)}.", errors=errors) from None
    if errors:
        session.delete(prompt_set)
        session.commit()
        raise Invalid(f"Please correct the highlighted fields: {', '.join(errors)}.", errors=errors)
    try:
        if text.strip():
            prompt_import.import_prompts(session, prompt_set=prompt_set, data=text,
                                         format=None if prompts_format in (None, "", "auto") else prompts_format,
                                         user_id=created_by_id)
        prompt_sets.start_prompt_set(session, prompt_set=prompt_set, user_id=created_by_id)
    except (Invalid, Conflict) as exc:
        session.rollback()
        session.delete(session.get(PromptSet, prompt_set.id))
        session.commit()
        raise Invalid(exc.message, errors={"prompts": exc.message}) from None
    return prompt_set


# ---- scheduling (pure) -----------------------------------------------------------

def model_pairs(n_models: int) -> list[tuple[int, int]]:
    """Every pair of model positions (i < j), in the round-robin order prompts take them."""
    return list(itertools.combinations(range(n_models), 2))


def _coin(*parts: Any) -> bool:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big")).random() < 0.5


def pair_for(rank: int, n_models: int, seed: int) -> tuple[int, int]:
    """(position shown as A, position shown as B) of the prompt that is the set's
    `rank`-th in id order (see the module docstring)."""
    pairs = model_pairs(n_models)
    index, occurrence = rank % len(pairs), rank // len(pairs)
    first, second = pairs[index]
    # A block of two occurrences: one shows `first` as A, the other as B; a seeded coin says which.
    first_is_a = (occurrence % 2 == 0) == _coin(seed, "sides", index, occurrence // 2)
    return (first, second) if first_is_a else (second, first)


# ---- results ------------------------------------------------------------------------

@dataclass
class PairResult:
    """Votes on one pair of models, from the first model's side (X against Y)."""

    model_x: int
    model_y: int
    wins: int = 0  # X preferred
    losses: int = 0  # Y preferred
    ties: int = 0
    both_bad: int = 0
    x_shown_as_a: int = 0  # of the votes, how many showed X on side A

    @property
    def votes(self) -> int:
        return self.wins + self.losses + self.ties + self.both_bad

    @property
    def record(self) -> WinRate:
        """X's win rate, ties and both-bad counting half, with its 95% Wilson interval."""
        return win_rate(self.wins, self.losses, self.ties + self.both_bad)

    @property
    def win_rate(self) -> float | None:
        return self.record.rate

    @property
    def interval(self) -> tuple[float, float] | None:
        """95% Wilson interval of the win rate; None without votes."""
        return (self.record.low, self.record.high) if self.votes else None

    def as_dict(self, names: dict[int, str]) -> dict[str, Any]:
        low_high = self.interval
        return {
            "model_x_id": self.model_x, "model_x": names.get(self.model_x, ""),
            "model_y_id": self.model_y, "model_y": names.get(self.model_y, ""),
            "votes": self.votes, "wins": self.wins, "losses": self.losses, "ties": self.ties,
            "both_bad": self.both_bad, "win_rate": self.win_rate,
            "interval_low": low_high[0] if low_high else None, "interval_high": low_high[1] if low_high else None,
            "x_shown_as_a": self.x_shown_as_a,
        }


@dataclass
class ModelLength:
    model_id: int
    name: str
    responses: int
    mean_tokens: float | None
    mean_chars: float | None


@dataclass
class LabelerPairs:
    user_id: int
    username: str
    pairs: list[PairResult]
    consensus_agreement: float | None = None


@dataclass
class EvaluationResults:
    prompt_set: PromptSet
    models: list[Model]
    pairs: list[PairResult]
    labelers: list[LabelerPairs]
    lengths: list[ModelLength]
    votes: int
    pairwise_agreement: float | None  # labelers agreeing on shared tasks' winners
    agreement_pairs: int
    tie_rate: float | None
    names: dict[int, str] = field(default_factory=dict)
    automatic: "AutomaticFigures | None" = None  # from the latest finished eval_figures job


def vote_rows_query(prompt_set_ids: Sequence[int], **filters: Any):
    """SELECT of the counted votes (see included_annotations_query) with the models on
    both sides, the labeler and both response lengths, in annotation order: the one
    source of vote figures (results here, the export, the leaderboard)."""
    ra, rb = aliased(Response), aliased(Response)
    included = included_annotations_query(prompt_set_ids, **filters)
    return (
        select(
            Vote.annotation_id, Vote.task_id, Task.prompt_set_id, Task.prompt_id, Annotation.user_id,
            Vote.response_a_id, Vote.response_b_id,
            ra.model_id.label("model_a_id"), rb.model_id.label("model_b_id"), Vote.outcome, Vote.strength,
            ra.num_tokens.label("tokens_a"), rb.num_tokens.label("tokens_b"),
            func.length(ra.text).label("chars_a"), func.length(rb.text).label("chars_b"), Annotation.created_at,
        )
        .join(Annotation, Annotation.id == Vote.annotation_id)
        .join(Task, Task.id == Vote.task_id)
        .join(ra, ra.id == Vote.response_a_id)
        .join(rb, rb.id == Vote.response_b_id)
        .where(Vote.annotation_id.in_(included))
        .order_by(Vote.annotation_id)
    )


def tally(rows: Iterable[Any], order: dict[int, int]) -> dict[tuple[int, int], PairResult]:
    """Votes (rows with model_a_id, model_b_id, outcome) per pair of models, each pair
    seen from the model that comes first in `order` ({model_id: position})."""
    out: dict[tuple[int, int], PairResult] = {}
    for row in rows:
        a, b = row.model_a_id, row.model_b_id
        if a is None or b is None or a == b:
            continue
        x_is_a = order.get(a, a) <= order.get(b, b)
        x, y = (a, b) if x_is_a else (b, a)
        result = out.setdefault((x, y), PairResult(model_x=x, model_y=y))
        result.x_shown_as_a += x_is_a
        outcome = VoteOutcome(row.outcome)
        if outcome == VoteOutcome.tie:
            result.ties += 1
        elif outcome == VoteOutcome.both_bad:
            result.both_bad += 1
        elif (outcome == VoteOutcome.a) == x_is_a:
            result.wins += 1
        else:
            result.losses += 1
    return out


def mean_lengths(session: Session, prompt_set: PromptSet, models: Sequence[Model]) -> list[ModelLength]:
    """Mean length of each model's responses in the set (every response, voted on or not)."""
    stats = {
        model_id: (n, tokens, chars)
        for model_id, n, tokens, chars in session.execute(
            select(Response.model_id, func.count(), func.avg(Response.num_tokens), func.avg(func.length(Response.text)))
            .join(Prompt, Prompt.id == Response.prompt_id)
            .where(Prompt.prompt_set_id == prompt_set.id, Response.round == prompt_set.round)
            .group_by(Response.model_id)
        )
    }
    out = []
    for m in models:
        n, tokens, chars = stats.get(m.id, (0, None, None))
        out.append(ModelLength(m.id, m.name, n, float(tokens) if tokens is not None else None,
                               float(chars) if chars is not None else None))
    return out


def results(session: Session, *, prompt_set_id: int) -> EvaluationResults:
    """Every figure of the results page of one evaluation set. Raises NotFound."""
    prompt_set = get_evaluation(session, prompt_set_id)
    models = set_models(session, prompt_set.id)
    order = {m.id: i for i, m in enumerate(models)}
    rows = session.execute(vote_rows_query([prompt_set.id])).all()
    overall = tally(rows, order)
    pairs = [overall.get((models[i].id, models[j].id), PairResult(models[i].id, models[j].id))
             for i, j in model_pairs(len(models))]
    agreement = compute_set_agreement(session, prompt_set_id=prompt_set.id)
    consensus = {f.user_id: f.consensus_agreement for f in agreement.labelers}
    names = dict(session.execute(select(User.id, User.username).where(
        User.id.in_({row.user_id for row in rows}))).all())
    by_user: dict[int, list[Any]] = {}
    for row in rows:
        by_user.setdefault(row.user_id, []).append(row)
    labelers = [
        LabelerPairs(user_id=uid, username=names.get(uid, str(uid)),
                     pairs=sorted(tally(user_rows, order).values(),
                                  key=lambda p: (order.get(p.model_x, 0), order.get(p.model_y, 0))),
                     consensus_agreement=consensus.get(uid))
        for uid, user_rows in sorted(by_user.items(), key=lambda kv: names.get(kv[0], ""))
    ]
    return EvaluationResults(
        prompt_set=prompt_set, models=models, pairs=pairs, labelers=labelers,
        lengths=mean_lengths(session, prompt_set, models), votes=len(rows),
        pairwise_agreement=agreement.pairwise_agreement, agreement_pairs=agreement.pairwise_pairs,
        tie_rate=agreement.tie_rate, names={m.id: m.name for m in models},
        automatic=automatic_figures(session, prompt_set, models, rows),
    )


def results_dict(res: EvaluationResults) -> dict[str, Any]:
    """The results as the JSON API returns them."""
    return {
        "prompt_set_id": res.prompt_set.id, "name": res.prompt_set.name, "status": res.prompt_set.status.value,
        "votes": res.votes,
        "models": [{"id": m.id, "name": m.name, "kind": m.kind.value, "position": i} for i, m in enumerate(res.models)],
        "pairs": [p.as_dict(res.names) for p in res.pairs],
        "labelers": [
            {"labeler_id": lab.user_id, "labeler": lab.username, "consensus_agreement": lab.consensus_agreement,
             "pairs": [p.as_dict(res.names) for p in lab.pairs]}
            for lab in res.labelers
        ],
        "agreement": {"pairwise_agreement": res.pairwise_agreement, "pairs": res.agreement_pairs,
                      "tie_rate": res.tie_rate},
        "lengths": [{"model_id": m.model_id, "model": m.name, "responses": m.responses,
                     "mean_tokens": m.mean_tokens, "mean_chars": m.mean_chars} for m in res.lengths],
        "automatic": res.automatic.as_dict(res.names) if res.automatic else None,
    }


# ---- automatic figures ----------------------------------------------------------------

def reference_of(session: Session, model: Model) -> Model | None:
    """A policy's reference: the model its run was held to (config reference_model_id), else
    its parent. None for other kinds."""
    if model.kind != ModelKind.policy:
        return None
    raw = (model.config or {}).get("reference_model_id")
    reference = session.get(Model, raw) if isinstance(raw, int) else None
    return reference or model.parent


def set_responses(session: Session, prompt_set: PromptSet) -> list[Any]:
    """Every response of the set's current round: response_id, model_id, messages, text, finish_reason."""
    return list(session.execute(
        select(Response.id.label("response_id"), Response.model_id, Prompt.messages, Response.text,
               Response.finish_reason)
        .join(Prompt, Prompt.id == Response.prompt_id)
        .where(Prompt.prompt_set_id == prompt_set.id, Response.round == prompt_set.round)
        .order_by(Response.id)
    ).all())


def figures_jobs(session: Session, prompt_set_id: int) -> tuple[Job | None, Job | None]:
    """(the latest eval_figures job of the set, the latest one that succeeded)."""
    query = (select(Job).where(Job.kind == JobKind.eval_figures, Job.prompt_set_id == prompt_set_id)
             .order_by(Job.id.desc()).limit(1))
    return (session.scalar(query), session.scalar(query.where(Job.status == JobStatus.succeeded)))


def start_figures_job(session: Session, *, user_id: int | None, prompt_set_id: int, reward_model_id: Any = None,
                      queue_name: str = queue.GPU_QUEUE) -> Job:
    """Queue an eval_figures job for the evaluation set with the reward model (the default
    reward model when none is given). Raises NotFound for the set, Invalid naming
    reward_model_id or prompt_set_id, Conflict while one is queued or running. Commits."""
    prompt_set = get_evaluation(session, prompt_set_id)
    errors: dict[str, str] = {}
    reward = registry.choose_model(errors, session, "reward_model_id", reward_model_id, (ModelKind.reward,),
                                   registry.default_reward_model(session), "a reward model")
    if not session.scalar(select(func.count(Response.id)).join(Prompt, Prompt.id == Response.prompt_id)
                          .where(Prompt.prompt_set_id == prompt_set.id, Response.round == prompt_set.round)):
        errors["prompt_set_id"] = "the evaluation has no responses yet: wait for its generation job"
    raise_for_fields(errors)
    assert reward is not None
    latest, _ = figures_jobs(session, prompt_set.id)
    if latest is not None and latest.status in (JobStatus.queued, JobStatus.running):
        raise Conflict(f"Job #{latest.id} is already computing this evaluation's figures.")
    params = {"prompt_set_id": prompt_set.id, "reward_model_id": reward.id,
              "config": asdict(EvalFiguresConfig())}
    return enqueue_job(session, kind=JobKind.eval_figures, params=params, created_by_id=user_id,
                       prompt_set_id=prompt_set.id, queue=queue_name)


@dataclass
class RewardPair:
    """The reward model's judgement of one pair of models, from the first model's side (X against Y)."""

    model_x: int
    model_y: int
    tasks: int = 0  # tasks of the pair whose two responses were scored
    x_score: float = 0.0  # tasks where the reward model prefers X, ties half
    votes: int = 0  # human votes choosing a side, on scored responses
    agreeing: float = 0.0  # of those, where the reward model prefers the same side (its ties half)

    @property
    def win_rate(self) -> float | None:
        return self.x_score / self.tasks if self.tasks else None

    @property
    def agreement(self) -> float | None:
        return self.agreeing / self.votes if self.votes else None

    def as_dict(self, names: dict[int, str]) -> dict[str, Any]:
        return {"model_x_id": self.model_x, "model_x": names.get(self.model_x, ""),
                "model_y_id": self.model_y, "model_y": names.get(self.model_y, ""),
                "tasks": self.tasks, "rm_win_rate": self.win_rate, "votes": self.votes,
                "agreement": self.agreement}


@dataclass
class AutomaticFigures:
    job: Job  # the eval_figures job they come from
    reward_model_id: int
    reward_model: str
    pairs: list[RewardPair]
    kl: dict[int, dict[str, Any]]  # policy id -> {"kl", "kl_stderr", "responses", "reference_id", "reference"}

    def as_dict(self, names: dict[int, str]) -> dict[str, Any]:
        return {"job_id": self.job.id, "computed_at": self.job.finished_at,
                "reward_model_id": self.reward_model_id, "reward_model": self.reward_model,
                "pairs": [p.as_dict(names) for p in self.pairs], "kl": list(self.kl.values())}


def _prefers(first: float, second: float) -> float:
    """1 when the first reward is higher, 0 when lower, 1/2 when equal."""
    return 1.0 if first > second else 0.0 if first < second else 0.5


def automatic_figures(session: Session, prompt_set: PromptSet, models: Sequence[Model],
                      vote_rows: Iterable[Any]) -> AutomaticFigures | None:
    """The reward model's win rate per pair of models on the set's tasks (gold left out),
    its agreement with the counted votes (vote_rows) that chose a side, and each
    policy's KL, from the latest succeeded eval_figures job; None without one."""
    _, job = figures_jobs(session, prompt_set.id)
    if job is None:
        return None
    rewards = {int(k): float(v) for k, v in (job.result.get("rewards") or {}).items()}
    order = {m.id: i for i, m in enumerate(models)}
    pairs = {(models[i].id, models[j].id): RewardPair(models[i].id, models[j].id)
             for i, j in model_pairs(len(models))}

    def pair_of(a: int | None, b: int | None) -> tuple[RewardPair, bool] | None:
        """The pair of models a and b, and whether a is its X."""
        if a not in order or b not in order or a == b:
            return None
        x_is_a = order[a] < order[b]
        return pairs[(a, b) if x_is_a else (b, a)], x_is_a

    sides: dict[int, list[tuple[int, int | None]]] = {}
    for task_id, response_id, model_id in session.execute(
            select(TaskResponse.task_id, Response.id, Response.model_id)
            .join(Task, Task.id == TaskResponse.task_id).join(Response, Response.id == TaskResponse.response_id)
            .where(Task.prompt_set_id == prompt_set.id, Task.round == prompt_set.round, Task.is_gold.is_(False))
            .order_by(TaskResponse.task_id, TaskResponse.position)):
        sides.setdefault(task_id, []).append((response_id, model_id))
    for (ra, a), (rb, b) in (s for s in sides.values() if len(s) == 2):
        found = pair_of(a, b)
        if found is None or ra not in rewards or rb not in rewards:
            continue
        pair, x_is_a = found
        pair.tasks += 1
        pair.x_score += _prefers(rewards[ra], rewards[rb]) if x_is_a else _prefers(rewards[rb], rewards[ra])
    for row in vote_rows:
        outcome = VoteOutcome(row.outcome)
        found = pair_of(row.model_a_id, row.model_b_id)
        if found is None or outcome not in (VoteOutcome.a, VoteOutcome.b):
            continue
        if row.response_a_id not in rewards or row.response_b_id not in rewards:
            continue
        chosen, other = ((row.response_a_id, row.response_b_id) if outcome == VoteOutcome.a
                         else (row.response_b_id, row.response_a_id))
        found[0].votes += 1
        found[0].agreeing += _prefers(rewards[chosen], rewards[other])
    return AutomaticFigures(
        job=job, reward_model_id=int(job.result.get("reward_model_id", 0)),
        reward_model=str(job.result.get("reward_model", "")), pairs=list(pairs.values()),
        kl={int(k["model_id"]): k for k in job.result.get("kl") or []})

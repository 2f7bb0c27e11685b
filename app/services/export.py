"""Exports of labeled data, and the one rule of which annotations count.

`included_annotations_query` is the single definition of "data we train on and
export": annotations that are not excluded, of non-gold tasks (gold tasks are
tests of the labelers; every labeler answers them, so they would outweigh
ordinary prompts), narrowed by the caller's filters. The reward-model job reads
`included_comparisons_query` / `iter_ranked_groups`; the download and the CLI
read `iter_export`. All of them stream from a server-side cursor (yield_per),
so a set of 100k comparisons never sits in memory.

Formats:
- comparisons, `plain`: one JSON line per comparison, {"prompt": str,
  "chosen": str, "rejected": str, ...}; the prompt is the user's text when the
  conversation is one user turn, else a "Role: content" transcript ending in
  "Assistant:". This and the next are the preference formats TRL's reward and
  DPO trainers read.
- comparisons, `conversational`: {"prompt": [messages], "chosen": [{"role":
  "assistant", "content": ...}], "rejected": [...], ...}.
  Both carry provenance columns (comparison_id, labeler_id, split, ...) that
  TRL ignores. The rank difference is named rank_margin, not "margin": TRL's
  reward trainer would read a "margin" column as a loss margin.
- annotations, `jsonl`: one line per annotation (gold ones included, marked)
  with its ratings: likert, rank, flags and text of every response, its top_k
  (a partial ranking: the unranked responses have rank top_k + 1, tied last)
  and its all_bad flag and reason (no ranks, ratings may be null, and no
  comparisons).
- annotations, `csv`: one row per rating, the annotation's columns repeated.
  A text cell that a spreadsheet would run as a formula (it starts with =, +,
  -, @, a tab or a carriage return) gets a leading ' (OWASP's CSV-injection
  rule): comments and responses are written by labelers and models.
- votes, `votes`: one JSON line per vote of a pairwise set (evaluation sets and
  ranking sets on the A/B page): {"prompt": str, "response_a": str,
  "response_b": str, "model_a": name, "model_b": name, "outcome": a | b | tie |
  both_bad, "winner": the winning model's name or "" , "strength": slightly |
  clearly | much | "", "margin": int, ...}; gold tasks left out, as for
  comparisons. Empty strings rather than nulls, so `datasets` infers one type
  per column.

Reviewed tasks (app/services/review) are marked in every export: `review` is the
task's current review ("accepted", "corrected:training", "corrected:gold" or
null) and `review_id` its id. A task corrected for training contributes the
correction instead of its labelers' annotations to the comparisons export and
to the reward model's data: its pairs come with comparison_id and annotation_id
null, labeler_id the reviewer's id and rating_margin null (a correction has no
ratings). The annotations export keeps every labeler's annotation, marked.

What was filtered is stated in a sidecar document (`export_meta`): the
filters, what is always left out, labelers dropped by the agreement filter,
the row count, the time and the format.
"""

import csv
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Integer, Select, String, and_, case, cast, false, func, literal, null, or_, select, true, union_all,
)
from sqlalchemy.orm import Session, aliased

from app.db.base import utcnow
from app.db.enums import Split, UserKind, VoteOutcome, VoteStrength
from app.db.models import (
    Annotation,
    AnnotationSource,
    Comparison,
    Model,
    Prompt,
    PromptSet,
    Rating,
    Response,
    Task,
    TaskResponse,
    TaskReview,
    User,
    Vote,
)
from app.services.agreement import compute_set_agreement
from app.services.ai_labelers import ai_author
from app.services.errors import Invalid, NotFound
from app.services.review import current_reviews, training_corrections
from app.services.validation import as_id

KINDS = ("comparisons", "annotations", "votes")
FORMATS: dict[str, tuple[str, ...]] = {
    "comparisons": ("plain", "conversational"),
    "annotations": ("jsonl", "csv"),
    "votes": ("votes",),
}
# The kind a format belongs to, so a download link can name the format alone.
FORMAT_KIND = {fmt: kind for kind, fmts in FORMATS.items() for fmt in fmts}
YIELD_PER = 1000  # rows fetched from the server-side cursor at a time
CHUNK_BYTES = 64 * 1024  # bytes handed to the response at a time
ALWAYS_LEFT_OUT = [
    "excluded annotations (kept in the database, left out of every export and of training data);"
    " this includes those of quarantined labelers",
]
CORRECTED_RULE = ("annotations of tasks corrected for training by a reviewer: the correction's pairs stand in"
                  " for them (review = corrected:training)")
# A spreadsheet runs a cell that starts with one of these as a formula (OWASP, "CSV Injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
GOLD_RULE = "annotations of gold tasks (labeler tests; see the annotations export)"

COMPARISON_COLUMNS = [
    "prompt", "chosen", "rejected", "comparison_id", "annotation_id", "task_id", "prompt_id",
    "prompt_set_id", "split", "labeler_id", "ai", "source", "rank_margin", "rating_margin", "created_at", "review",
    "review_id",
]
ANNOTATION_JSONL_COLUMNS = [
    "annotation_id", "task_id", "prompt_set_id", "prompt_id", "round", "split", "is_gold", "labeler_id",
    "labeler", "ai", "source", "time_spent_s", "prompt_flags", "comment", "top_k", "all_bad", "all_bad_reason",
    "created_at", "updated_at", "review", "review_id", "prompt", "ratings",
]
VOTE_COLUMNS = [
    "prompt", "response_a", "response_b", "model_a", "model_b", "outcome", "winner", "strength", "margin",
    "annotation_id", "task_id", "prompt_id", "prompt_set_id", "labeler_id", "model_a_id", "model_b_id",
    "tokens_a", "tokens_b", "created_at",
]
ANNOTATION_CSV_COLUMNS = [
    "annotation_id", "task_id", "prompt_set_id", "prompt_id", "round", "split", "is_gold", "labeler_id",
    "labeler", "ai", "source", "time_spent_s", "prompt_flags", "comment", "top_k", "all_bad", "all_bad_reason",
    "created_at", "updated_at", "review", "review_id", "prompt", "response_id", "position", "likert", "rank",
    "response_flags", "response_text",
]


def kind_of(fmt: str) -> str:
    """comparisons for plain/conversational, annotations for jsonl/csv; raises Invalid."""
    if fmt not in FORMAT_KIND:
        raise Invalid(f"Unknown export format '{fmt}'; choose one of {', '.join(FORMAT_KIND)}.",
                      errors={"format": f"choose one of {', '.join(FORMAT_KIND)}"})
    return FORMAT_KIND[fmt]


# ---- filters --------------------------------------------------------------------

@dataclass(frozen=True)
class ExportFilters:
    """What to export. Bounds on the annotation's creation time: from inclusive, before exclusive."""

    prompt_set_ids: tuple[int, ...]
    split: Split | None = None
    user_ids: tuple[int, ...] | None = None  # labelers included; None = all
    min_agreement: float | None = None  # leave-one-out consensus agreement, 0..1
    created_from: datetime | None = None
    created_before: datetime | None = None


def _parse_moment(raw: str, *, end: bool) -> datetime:
    """A day (YYYY-MM-DD: the whole day, UTC) or an ISO time (naive = UTC)."""
    raw = raw.strip()
    try:
        day = date.fromisoformat(raw)
    except ValueError:
        moment = datetime.fromisoformat(raw)
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    start = datetime.combine(day, time(0), tzinfo=UTC)
    return start + timedelta(days=1) if end else start


def _ids(raw: Iterable[Any] | str | None) -> list[str]:
    if raw is None:
        return []
    items = [raw] if isinstance(raw, (str, int)) else list(raw)
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


def parse_filters(*, prompt_set_ids: Iterable[int] | int, split: str | None = None,
                  labelers: Iterable[Any] | str | None = None, min_agreement: Any = None,
                  date_from: str | date | None = None, date_to: str | date | None = None) -> ExportFilters:
    """Filters from form, query or CLI values (strings allowed; empty = no filter).
    date_to names the last day included (or an exclusive time). Raises Invalid per field."""
    errors: dict[str, str] = {}
    ids = (prompt_set_ids,) if isinstance(prompt_set_ids, int) else tuple(prompt_set_ids)
    clean_split = None
    if split not in (None, ""):
        try:
            clean_split = Split(split)
        except ValueError:
            errors["split"] = f"'{split}' is not a split; choose one of {', '.join(s.value for s in Split)}"
    user_ids = None
    raw_ids = _ids(labelers)
    if raw_ids:
        bad = [r for r in raw_ids if as_id(r) is None]
        if bad:
            errors["labelers"] = f"not labeler ids: {', '.join(r[:20] for r in bad)}"
        else:
            user_ids = tuple(sorted({as_id(r) for r in raw_ids}))
    agreement = None
    if min_agreement not in (None, ""):
        try:
            agreement = float(min_agreement)
        except (TypeError, ValueError):
            errors["min_agreement"] = f"'{min_agreement}' is not a number; give a share between 0 and 1"
        else:
            if not 0 <= agreement <= 1:
                errors["min_agreement"] = "must be between 0 and 1"
    bounds: dict[str, datetime | None] = {"date_from": None, "date_to": None}
    for name, raw in (("date_from", date_from), ("date_to", date_to)):
        if raw in (None, ""):
            continue
        try:
            if isinstance(raw, datetime):
                bounds[name] = raw if raw.tzinfo else raw.replace(tzinfo=UTC)
            else:
                bounds[name] = _parse_moment(raw.isoformat() if isinstance(raw, date) else str(raw),
                                             end=name == "date_to")
        except ValueError:
            errors[name] = f"'{raw}' is not a date; write YYYY-MM-DD"
    if bounds["date_from"] and bounds["date_to"] and bounds["date_from"] >= bounds["date_to"]:
        errors["date_to"] = "must not be before date_from"
    if errors:
        detail = "; ".join(f"{k}: {v}" for k, v in errors.items())
        raise Invalid(f"The export filters are not valid ({detail}).", errors=errors)
    return ExportFilters(prompt_set_ids=ids, split=clean_split, user_ids=user_ids, min_agreement=agreement,
                         created_from=bounds["date_from"], created_before=bounds["date_to"])


# ---- the one rule ---------------------------------------------------------------

def included_annotations_query(
    prompt_set_ids: Sequence[int],
    *,
    split: Split | str | None = None,
    user_ids: Sequence[int] | None = None,
    set_user_pairs: Sequence[tuple[int, int]] | None = None,
    created_from: datetime | None = None,
    created_before: datetime | None = None,
    include_gold: bool = False,
    without_corrected: bool = False,
    ranked_only: bool = False,
    include_imported: bool = True,
    include_ai: bool = True,
) -> Select:
    """SELECT annotations.id of the data that counts: never excluded, never gold
    (unless include_gold), of the given sets, narrowed by split, labelers,
    (set, labeler) pairs and creation time; without those of tasks corrected for
    training when without_corrected (training data: the corrections stand in);
    ranked_only leaves out "all bad" annotations (they rank nothing). Imported
    annotations (of a source, not a labeler) count unless include_imported is
    false; a labeler filter leaves them out. AI labelers' annotations
    (app/services/ai_labelers) count unless include_ai is false."""
    query = (
        select(Annotation.id)
        .join(Task, Task.id == Annotation.task_id)
        .join(Prompt, Prompt.id == Task.prompt_id)
        .where(Task.prompt_set_id.in_(list(prompt_set_ids)), Annotation.excluded.is_(False))
    )
    if not include_gold:
        query = query.where(Task.is_gold.is_(False))
    if ranked_only:
        query = query.where(Annotation.all_bad.is_(False))
    if not include_imported:
        query = query.where(Annotation.source_id.is_(None))
    if not include_ai:
        query = query.where(~ai_author())
    if split is not None:
        query = query.where(Prompt.split == Split(split))
    if user_ids is not None:
        query = query.where(Annotation.user_id.in_(list(user_ids)))
    if set_user_pairs is not None:
        query = query.where(or_(false(), *(
            and_(Task.prompt_set_id == s, Annotation.user_id == u) for s, u in set_user_pairs
        )))
    if created_from is not None:
        query = query.where(Annotation.created_at >= created_from)
    if created_before is not None:
        query = query.where(Annotation.created_at < created_before)
    if without_corrected:
        query = query.where(Task.id.not_in(select(training_corrections().c.task_id)))
    return query


def included_corrections_query(
    prompt_set_ids: Sequence[int],
    *,
    split: Split | str | None = None,
    user_ids: Sequence[int] | None = None,
    set_user_pairs: Sequence[tuple[int, int]] | None = None,
    created_from: datetime | None = None,
    created_before: datetime | None = None,
) -> Select:
    """SELECT task_reviews.id of the corrections that stand in for their task's annotations
    in training data: the current review of a non-gold task of the given sets, of the
    split, made in the time range. When the caller narrows by labelers, a correction
    counts only on a task one of those labelers annotated (excluded or not: a
    correction of a quarantined labeler's task is the reviewer's work)."""
    corrections = training_corrections()
    query = (
        select(corrections.c.id)
        .join(Task, Task.id == corrections.c.task_id)
        .join(Prompt, Prompt.id == Task.prompt_id)
        .where(Task.prompt_set_id.in_(list(prompt_set_ids)), Task.is_gold.is_(False))
    )
    if split is not None:
        query = query.where(Prompt.split == Split(split))
    labeler = select(Annotation.id).where(Annotation.task_id == Task.id)
    if user_ids is not None:
        query = query.where(labeler.where(Annotation.user_id.in_(list(user_ids))).exists())
    if set_user_pairs is not None:
        query = query.where(labeler.where(or_(false(), *(
            and_(Task.prompt_set_id == s, Annotation.user_id == u) for s, u in set_user_pairs
        ))).exists())
    if created_from is not None:
        query = query.where(corrections.c.created_at >= created_from)
    if created_before is not None:
        query = query.where(corrections.c.created_at < created_before)
    return query


def _review_label():
    """SQL: a task's current review as the exports mark it ("accepted", "corrected:training"...)."""
    current = current_reviews().subquery("review")
    decision, use = cast(current.c.decision, String), cast(current.c.use, String)
    return current, case((current.c.use.is_(None), decision), else_=decision + literal(":") + use)


def included_comparisons_query(prompt_set_ids: Sequence[int], split: Split | str | None = None,
                               user_ids: Sequence[int] | None = None, **filters: Any) -> Select:
    """The comparisons training may use (see included_annotations_query), with the
    prompt messages and both texts, in a stable order. Stream it with
    session.execute(query, execution_options={"yield_per": N})."""
    chosen, rejected = aliased(Response), aliased(Response)
    included = included_annotations_query(prompt_set_ids, split=split, user_ids=user_ids, without_corrected=True,
                                          **filters)
    current, review = _review_label()
    labelers = (
        select(
            Comparison.id.label("comparison_id"), Comparison.annotation_id, Comparison.task_id,
            Task.prompt_id, Task.prompt_set_id, Prompt.split, Annotation.user_id.label("labeler_id"),
            ai_author().label("ai"), AnnotationSource.name.label("source"), Prompt.messages,
            Comparison.chosen_response_id,
            chosen.text.label("chosen"),
            Comparison.rejected_response_id, rejected.text.label("rejected"),
            Comparison.rank_margin, Comparison.rating_margin, Annotation.created_at,
            review.label("review"), current.c.id.label("review_id"),
        )
        .join(Annotation, Annotation.id == Comparison.annotation_id)
        .join(Task, Task.id == Comparison.task_id)
        .join(Prompt, Prompt.id == Task.prompt_id)
        .join(chosen, chosen.id == Comparison.chosen_response_id)
        .join(rejected, rejected.id == Comparison.rejected_response_id)
        .outerjoin(current, current.c.task_id == Task.id)
        .outerjoin(AnnotationSource, AnnotationSource.id == Annotation.source_id)
        .where(Comparison.annotation_id.in_(included))
    )
    # A correction's pairs: every two responses it ranks apart, the better one chosen.
    better = func.jsonb_each_text(TaskReview.ranking).table_valued("key", "value").lateral("better")
    worse = func.jsonb_each_text(TaskReview.ranking).table_valued("key", "value").lateral("worse")
    corrections = included_corrections_query(prompt_set_ids, split=split, user_ids=user_ids, **filters)
    corrected = (
        select(
            cast(null(), Integer).label("comparison_id"), cast(null(), Integer).label("annotation_id"),
            TaskReview.task_id, Task.prompt_id, Task.prompt_set_id, Prompt.split,
            TaskReview.reviewer_id.label("labeler_id"), literal(False).label("ai"), cast(null(), String).label("source"),
            Prompt.messages,
            cast(better.c.key, Integer).label("chosen_response_id"), chosen.text.label("chosen"),
            cast(worse.c.key, Integer).label("rejected_response_id"), rejected.text.label("rejected"),
            (cast(worse.c.value, Integer) - cast(better.c.value, Integer)).label("rank_margin"),
            cast(null(), Integer).label("rating_margin"), TaskReview.created_at,
            literal("corrected:training").label("review"), TaskReview.id.label("review_id"),
        )
        .select_from(TaskReview)
        .join(Task, Task.id == TaskReview.task_id)
        .join(Prompt, Prompt.id == Task.prompt_id)
        .join(better, true())
        .join(worse, cast(better.c.value, Integer) < cast(worse.c.value, Integer))
        .join(chosen, chosen.id == cast(better.c.key, Integer))
        .join(rejected, rejected.id == cast(worse.c.key, Integer))
        .where(TaskReview.id.in_(corrections))
    )
    rows = union_all(labelers, corrected).subquery("rows")
    return select(rows).order_by(rows.c.comparison_id.nulls_last(), rows.c.review_id, rows.c.chosen_response_id,
                                 rows.c.rejected_response_id)


def _ratings_query(included: Select) -> Select:
    """Rating-level rows of the given annotations, grouped by annotation, in display order."""
    current, review = _review_label()
    return (
        select(
            Annotation.id.label("annotation_id"), Annotation.task_id, Task.prompt_set_id, Task.prompt_id,
            Task.round, Prompt.split, Task.is_gold, Annotation.user_id.label("labeler_id"),
            User.username.label("labeler"), (User.kind == UserKind.ai).label("ai"),
            AnnotationSource.name.label("source"), Annotation.time_spent_s,
            Annotation.prompt_flags, Annotation.comment, Annotation.top_k, Annotation.all_bad,
            Annotation.all_bad_reason, Annotation.created_at, Annotation.updated_at, Prompt.messages,
            Prompt.text.label("prompt_text"),
            Rating.response_id, TaskResponse.position, Rating.likert, Rating.rank, Rating.flags,
            Response.text.label("response_text"), review.label("review"), current.c.id.label("review_id"),
        )
        .select_from(Rating)
        .join(Annotation, Annotation.id == Rating.annotation_id)
        .outerjoin(User, User.id == Annotation.user_id)
        .outerjoin(AnnotationSource, AnnotationSource.id == Annotation.source_id)
        .join(Task, Task.id == Annotation.task_id)
        .join(Prompt, Prompt.id == Task.prompt_id)
        .join(TaskResponse, and_(TaskResponse.task_id == Rating.task_id,
                                 TaskResponse.response_id == Rating.response_id))
        .join(Response, Response.id == Rating.response_id)
        .outerjoin(current, current.c.task_id == Task.id)
        .where(Annotation.id.in_(included))
        .order_by(Annotation.id, TaskResponse.position)
    )


@dataclass(frozen=True)
class RankedAnnotation:
    """One included annotation as the reward model trains on it: all K responses together.
    A reviewer's correction standing in for a task's annotations has review_id set and
    annotation_id None. A partial ranking's unranked responses have rank top_k + 1 (tied last): the
    trainer's pairs (strictly better rank wins) are then exactly its comparisons."""

    annotation_id: int | None
    prompt_id: int
    split: Split
    messages: list[dict[str, str]]
    responses: list[str]
    ranks: list[int]
    review_id: int | None = None
    top_k: int | None = None
    all_bad: bool = False  # never in the ranked data ("all bad" ranks nothing); for ranking_agreement
    source: str | None = None  # an imported source's name; None for a labeler
    ai: bool = False  # an AI labeler's (app/services/ai_labelers)


def _corrections_ranked_query(corrections: Select) -> Select:
    """Response-level rows of the given corrections, grouped by correction, in display order."""
    return (
        select(TaskReview.id.label("annotation_id"), Task.prompt_id, Prompt.split, Prompt.messages,
               TaskReview.ranking, TaskResponse.response_id, Response.text.label("response_text"))
        .select_from(TaskReview)
        .join(Task, Task.id == TaskReview.task_id)
        .join(Prompt, Prompt.id == Task.prompt_id)
        .join(TaskResponse, TaskResponse.task_id == Task.id)
        .join(Response, Response.id == TaskResponse.response_id)
        .where(TaskReview.id.in_(corrections))
        .order_by(TaskReview.id, TaskResponse.position)
    )


def iter_ranked_annotations(session: Session, prompt_set_ids: Sequence[int], split: Split | str | None = None,
                            user_ids: Sequence[int] | None = None, include_imported: bool = True,
                            include_ai: bool = True, **filters: Any) -> Iterator[RankedAnnotation]:
    """The training data: the included annotations (see included_annotations_query; "all
    bad" ones rank nothing and are left out) in id order, except those of tasks corrected
    for training, then those corrections."""
    included = included_annotations_query(prompt_set_ids, split=split, user_ids=user_ids, without_corrected=True,
                                          ranked_only=True, include_imported=include_imported,
                                          include_ai=include_ai, **filters)
    for rows in _grouped(session, _ratings_query(included)):
        head = rows[0]
        yield RankedAnnotation(head.annotation_id, head.prompt_id, Split(head.split), list(head.messages),
                               [r.response_text for r in rows], [r.rank for r in rows], top_k=head.top_k,
                               source=head.source, ai=bool(head.ai))
    corrections = included_corrections_query(prompt_set_ids, split=split, user_ids=user_ids, **filters)
    for rows in _grouped(session, _corrections_ranked_query(corrections)):
        head = rows[0]
        yield RankedAnnotation(None, head.prompt_id, Split(head.split), list(head.messages),
                               [r.response_text for r in rows], [int(head.ranking[str(r.response_id)]) for r in rows],
                               review_id=head.annotation_id)


def iter_ranked_groups(session: Session, prompt_set_ids: Sequence[int], split: Split | str | None = None,
                       user_ids: Sequence[int] | None = None,
                       **filters: Any) -> Iterator[tuple[list[dict[str, str]], list[str], list[int]]]:
    """(messages, K response texts, their ranks) per included annotation, streamed."""
    for item in iter_ranked_annotations(session, prompt_set_ids, split, user_ids, **filters):
        yield item.messages, item.responses, item.ranks


def stream_rows(session: Session, query: Select) -> Iterator[Any]:
    """The query's rows from a server-side cursor, YIELD_PER at a time."""
    result = session.execute(query, execution_options={"yield_per": YIELD_PER})
    try:
        yield from result
    finally:
        result.close()


def _grouped(session: Session, query: Select) -> Iterator[list[Any]]:
    """Consecutive rows of one annotation together (the query orders by annotation)."""
    group: list[Any] = []
    for row in stream_rows(session, query):
        if group and row.annotation_id != group[0].annotation_id:
            yield group
            group = []
        group.append(row)
    if group:
        yield group


# ---- plans, rows and files ------------------------------------------------------

@dataclass
class ExportPlan:
    """A validated export: kind, format, filters, and the labelers they leave in."""

    kind: str
    fmt: str
    filters: ExportFilters
    prompt_sets: list[dict[str, Any]]
    # (set, labeler) pairs kept by the agreement filter; None when no agreement filter.
    set_user_pairs: list[tuple[int, int]] | None = None
    dropped_by_agreement: list[dict[str, Any]] = field(default_factory=list)

    @property
    def filename(self) -> str:
        sets = "-".join(str(s["id"]) for s in self.prompt_sets)
        ext = "csv" if self.fmt == "csv" else "jsonl"
        if self.kind == self.fmt:
            return f"set-{sets}-{self.kind}.{ext}"
        return f"set-{sets}-{self.kind}-{self.fmt}.{ext}"

    @property
    def media_type(self) -> str:
        return "text/csv; charset=utf-8" if self.fmt == "csv" else "application/x-ndjson"

    @property
    def columns(self) -> list[str]:
        if self.kind == "votes":
            return VOTE_COLUMNS
        if self.kind == "comparisons":
            return COMPARISON_COLUMNS
        return ANNOTATION_CSV_COLUMNS if self.fmt == "csv" else ANNOTATION_JSONL_COLUMNS

    def included(self) -> Select:
        f = self.filters
        return included_annotations_query(
            f.prompt_set_ids, split=f.split, user_ids=f.user_ids, set_user_pairs=self.set_user_pairs,
            created_from=f.created_from, created_before=f.created_before,
            include_gold=self.kind == "annotations",
        )

    def query(self) -> Select:
        if self.kind == "votes":
            return _votes_query(self.included())
        if self.kind == "comparisons":
            f = self.filters
            return included_comparisons_query(
                f.prompt_set_ids, f.split, f.user_ids, set_user_pairs=self.set_user_pairs,
                created_from=f.created_from, created_before=f.created_before,
            )
        return _ratings_query(self.included())


def plan_export(session: Session, *, kind: str, fmt: str, filters: ExportFilters) -> ExportPlan:
    """Check kind, format and sets, and apply the agreement filter (labelers whose
    consensus agreement on a set is unknown or under the minimum are dropped from
    that set). Raises Invalid, NotFound."""
    if kind not in KINDS:
        raise Invalid(f"Unknown export '{kind}'; choose comparisons, annotations or votes.",
                      errors={"kind": "unknown"})
    if fmt not in FORMATS[kind]:
        choices = " or ".join(FORMATS[kind])
        raise Invalid(f"{kind.capitalize()} export in '{fmt}' is not offered; choose {choices}.",
                      errors={"format": f"choose {choices}"})
    if not filters.prompt_set_ids:
        raise Invalid("Choose at least one prompt set to export.", errors={"prompt_set": "required"})
    prompt_sets = []
    for set_id in filters.prompt_set_ids:
        prompt_set = session.get(PromptSet, set_id)
        if prompt_set is None:
            raise NotFound(f"No prompt set with id {set_id}.")
        prompt_sets.append({"id": prompt_set.id, "name": prompt_set.name})
    plan = ExportPlan(kind=kind, fmt=fmt, filters=filters, prompt_sets=prompt_sets)
    if filters.min_agreement is not None:
        plan.set_user_pairs = []
        for set_id in filters.prompt_set_ids:
            for f in compute_set_agreement(session, prompt_set_id=set_id).labelers:
                if f.consensus_agreement is not None and f.consensus_agreement >= filters.min_agreement:
                    plan.set_user_pairs.append((set_id, f.user_id))
                elif filters.user_ids is None or f.user_id in filters.user_ids:
                    plan.dropped_by_agreement.append({
                        "prompt_set_id": set_id, "labeler_id": f.user_id, "labeler": f.username,
                        "consensus_agreement": f.consensus_agreement,
                    })
    return plan


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def render_prompt(messages: Sequence[dict[str, str]]) -> str:
    """The plain-text prompt: a lone user turn as is, else a role-labelled transcript
    that ends where the assistant's answer begins."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join(turns + ["Assistant:"])


def _comparison_row(row: Any, fmt: str) -> dict[str, Any]:
    if fmt == "plain":
        prompt: Any = render_prompt(row.messages)
        chosen: Any = row.chosen
        rejected: Any = row.rejected
    else:
        prompt = [{"role": m["role"], "content": m["content"]} for m in row.messages]
        chosen = [{"role": "assistant", "content": row.chosen}]
        rejected = [{"role": "assistant", "content": row.rejected}]
    return {
        "prompt": prompt, "chosen": chosen, "rejected": rejected,
        "comparison_id": row.comparison_id, "annotation_id": row.annotation_id, "task_id": row.task_id,
        "prompt_id": row.prompt_id, "prompt_set_id": row.prompt_set_id, "split": Split(row.split).value,
        "labeler_id": row.labeler_id, "ai": bool(row.ai), "source": row.source,
        "rank_margin": row.rank_margin, "rating_margin": row.rating_margin,
        "created_at": _iso(row.created_at), "review": row.review, "review_id": row.review_id,
    }


def _votes_query(included: Select) -> Select:
    """The votes of the given annotations with prompt, both responses and their models."""
    ra, rb = aliased(Response), aliased(Response)
    ma, mb = aliased(Model), aliased(Model)
    return (
        select(
            Vote.annotation_id, Vote.task_id, Task.prompt_id, Task.prompt_set_id,
            Annotation.user_id.label("labeler_id"), Prompt.messages, Vote.outcome, Vote.strength,
            ra.text.label("response_a"), rb.text.label("response_b"), ra.num_tokens.label("tokens_a"),
            rb.num_tokens.label("tokens_b"), ra.model_id.label("model_a_id"), rb.model_id.label("model_b_id"),
            ma.name.label("model_a"), mb.name.label("model_b"), Annotation.created_at,
        )
        .join(Annotation, Annotation.id == Vote.annotation_id)
        .join(Task, Task.id == Vote.task_id)
        .join(Prompt, Prompt.id == Task.prompt_id)
        .join(ra, ra.id == Vote.response_a_id)
        .join(rb, rb.id == Vote.response_b_id)
        .outerjoin(ma, ma.id == ra.model_id)
        .outerjoin(mb, mb.id == rb.model_id)
        .where(Vote.annotation_id.in_(included))
        .order_by(Vote.annotation_id)
    )


def _vote_row(row: Any) -> dict[str, Any]:
    from app.services.annotations import STRENGTH_MARGIN  # annotations imports this module

    outcome = VoteOutcome(row.outcome)
    strength = VoteStrength(row.strength) if row.strength else None
    winner = {VoteOutcome.a: row.model_a, VoteOutcome.b: row.model_b}.get(outcome)
    return {
        "prompt": render_prompt(row.messages), "response_a": row.response_a, "response_b": row.response_b,
        "model_a": row.model_a or "", "model_b": row.model_b or "", "outcome": outcome.value,
        "winner": winner or "", "strength": strength.value if strength else "",
        "margin": STRENGTH_MARGIN[strength] if winner is not None else 0,
        "annotation_id": row.annotation_id, "task_id": row.task_id, "prompt_id": row.prompt_id,
        "prompt_set_id": row.prompt_set_id, "labeler_id": row.labeler_id,
        "model_a_id": row.model_a_id if row.model_a_id is not None else -1,
        "model_b_id": row.model_b_id if row.model_b_id is not None else -1,
        "tokens_a": row.tokens_a, "tokens_b": row.tokens_b, "created_at": _iso(row.created_at),
    }


def _annotation_head(row: Any) -> dict[str, Any]:
    return {
        "annotation_id": row.annotation_id, "task_id": row.task_id, "prompt_set_id": row.prompt_set_id,
        "prompt_id": row.prompt_id, "round": row.round, "split": Split(row.split).value,
        "is_gold": row.is_gold, "labeler_id": row.labeler_id, "labeler": row.labeler, "ai": bool(row.ai),
        "source": row.source,
        "time_spent_s": row.time_spent_s, "prompt_flags": row.prompt_flags, "comment": row.comment,
        "top_k": row.top_k, "all_bad": row.all_bad, "all_bad_reason": row.all_bad_reason,
        "created_at": _iso(row.created_at), "updated_at": _iso(row.updated_at),
        "review": row.review, "review_id": row.review_id,
    }


def iter_rows(session: Session, plan: ExportPlan) -> Iterator[dict[str, Any]]:
    """The export's rows as dicts, streamed from the database."""
    if plan.kind == "votes":
        for row in stream_rows(session, plan.query()):
            yield _vote_row(row)
    elif plan.kind == "comparisons":
        for row in stream_rows(session, plan.query()):
            yield _comparison_row(row, plan.fmt)
    elif plan.fmt == "jsonl":
        for rows in _grouped(session, plan.query()):
            yield _annotation_head(rows[0]) | {
                "prompt": rows[0].messages,
                "ratings": [
                    {"response_id": r.response_id, "position": r.position, "likert": r.likert, "rank": r.rank,
                     "flags": r.flags, "text": r.response_text}
                    for r in rows
                ],
            }
    else:
        for r in stream_rows(session, plan.query()):
            yield _annotation_head(r) | {
                "prompt_flags": json.dumps(r.prompt_flags, ensure_ascii=False), "prompt": r.prompt_text,
                "response_id": r.response_id, "position": r.position, "likert": r.likert, "rank": r.rank,
                "response_flags": json.dumps(r.flags, ensure_ascii=False), "response_text": r.response_text,
            }


def csv_safe(value: Any) -> Any:
    """The value as a CSV cell a spreadsheet shows as text: a string that would start a
    formula gets a leading '; other values are unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def iter_export(session: Session, plan: ExportPlan, *, chunk_bytes: int = CHUNK_BYTES,
                counter: list[int] | None = None) -> Iterator[bytes]:
    """The export file as byte chunks of about chunk_bytes. counter[0] (if given)
    counts the rows written."""
    buffer = io.StringIO()
    writer = None
    if plan.fmt == "csv":
        writer = csv.DictWriter(buffer, fieldnames=plan.columns, lineterminator="\n")
        writer.writeheader()
    for row in iter_rows(session, plan):
        if writer is not None:
            writer.writerow({key: csv_safe(value) for key, value in row.items()})
        else:
            buffer.write(json.dumps(row, ensure_ascii=False))
            buffer.write("\n")
        if counter is not None:
            counter[0] += 1
        if buffer.tell() >= chunk_bytes:
            yield buffer.getvalue().encode("utf-8")
            buffer.seek(0)
            buffer.truncate()
    if buffer.tell():
        yield buffer.getvalue().encode("utf-8")


def count_rows(session: Session, plan: ExportPlan) -> int:
    """How many rows (lines after a CSV header) the export has."""
    if plan.kind == "annotations" and plan.fmt == "jsonl":
        query = plan.included()
    else:
        query = plan.query().order_by(None)
    return session.scalar(select(func.count()).select_from(query.subquery())) or 0


def export_meta(session: Session, plan: ExportPlan, *, rows: int | None = None,
                generated_at: datetime | None = None) -> dict[str, Any]:
    """The sidecar document: what was exported, how, with which filters, how many rows."""
    f = plan.filters
    left_out = list(ALWAYS_LEFT_OUT)
    if plan.kind == "comparisons":
        left_out += [GOLD_RULE, CORRECTED_RULE]
    elif plan.kind == "votes":
        left_out.append(GOLD_RULE)
    return {
        "kind": plan.kind,
        "format": plan.fmt,
        "file": plan.filename,
        "rows": count_rows(session, plan) if rows is None else rows,
        "row_unit": {"comparisons": "comparison", "annotations": "annotation" if plan.fmt == "jsonl" else "rating",
                     "votes": "vote"}[plan.kind],
        "columns": plan.columns,
        "generated_at": _iso(generated_at or utcnow()),
        "prompt_sets": plan.prompt_sets,
        "filters": {
            "split": f.split.value if f.split else None,
            "labelers": list(f.user_ids) if f.user_ids is not None else "all",
            "min_agreement": f.min_agreement,
            "created_from": _iso(f.created_from),
            "created_before": _iso(f.created_before),
        },
        "always_left_out": left_out,
        "dropped_by_min_agreement": plan.dropped_by_agreement,
        "notes": {
            "min_agreement": "leave-one-out consensus agreement per labeler and set (see the quality page); "
                             "labelers with no agreement figure are dropped when a minimum is set",
            "dates": "annotation creation time, UTC; created_from inclusive, created_before exclusive",
            "review": "the task's current review: accepted, corrected:training (its comparisons are the"
                      " reviewer's correction: comparison_id and annotation_id null, labeler_id the reviewer),"
                      " corrected:gold, or null when not reviewed",
        },
    }


def write_export(session: Session, plan: ExportPlan, out: Path) -> dict[str, Any]:
    """Write the export to `out` and its sidecar to `out`.meta.json, each through a
    temporary file renamed at the end, so a failure leaves no half-written file."""
    out = Path(out)
    meta_path = out.with_name(out.name + ".meta.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    generated_at = utcnow()
    counter = [0]
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    meta_tmp = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as fh:
            for chunk in iter_export(session, plan, counter=counter):
                fh.write(chunk)
        meta = export_meta(session, plan, rows=counter[0], generated_at=generated_at)
        meta["file"] = out.name
        meta_tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(out)
        meta_tmp.replace(meta_path)
    finally:
        tmp.unlink(missing_ok=True)
        meta_tmp.unlink(missing_ok=True)
    return meta

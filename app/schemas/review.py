"""Schemas of review and correction and of labeler trust for the JSON API.

Types only: the rules (a ranking of every response, the trust rules' ranges) are
checked once, in app.services.review and app.services.trust, so the API and the
pages answer with the same messages.
"""

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from app.db.enums import CorrectionUse, ReviewDecision
from app.db.models import TaskReview
from app.schemas.common import Text
from app.services import review, trust


class ReviewIn(BaseModel):
    decision: ReviewDecision
    ranking: dict[str, Any] | None = Field(
        default=None, description="For a correction: {response_id: rank 1..K} for every response of the task"
                                  " (1 = best, ties allowed).")
    use: CorrectionUse | None = Field(
        default=None, description="For a correction: training (replaces the task's annotations in training"
                                  " data and the comparisons export) or gold (the task becomes gold).")
    note: Text = Field(default="", max_length=review.MAX_NOTE)


class ReviewOut(BaseModel):
    id: int
    task_id: int
    reviewer_id: int
    decision: ReviewDecision
    ranking: dict[str, int] | None
    use: CorrectionUse | None
    note: str
    created_at: datetime


def review_out(row: TaskReview) -> ReviewOut:
    return ReviewOut(id=row.id, task_id=row.task_id, reviewer_id=row.reviewer_id, decision=row.decision,
                     ranking=row.ranking, use=row.use, note=row.note, created_at=row.created_at)


class QueueItemOut(BaseModel):
    task_id: int
    prompt: str
    labels: int = Field(description="Annotations that count (not excluded).")
    disagreement: float | None = Field(description="Share of compared response pairs on which two labelers"
                                                   " disagree; null with fewer than two labelers.")
    compared: int
    is_gold: bool
    review: ReviewOut | None


def queue_item_out(item: review.QueueItem) -> QueueItemOut:
    return QueueItemOut(task_id=item.task_id, prompt=item.prompt_text, labels=item.labels,
                        disagreement=item.disagreement, compared=item.compared, is_gold=item.is_gold,
                        review=review_out(item.review) if item.review else None)


def _rule_field(f) -> tuple[Any, Any]:
    if f.type is bool:
        return bool | None, Field(default=None, description=f.metadata["help"])
    kind = int if f.type is int else float
    return kind | None, Field(default=None, ge=f.metadata["min"], le=f.metadata["max"],
                              description=f.metadata["help"])


# The body of PUT .../trust-rules, derived from trust.TrustRules: a rule left out gets its default.
TrustRulesIn = create_model("TrustRulesIn", __config__=ConfigDict(extra="forbid"),
                            **{f.name: _rule_field(f) for f in trust.RULE_FIELDS})


class ReasonOut(BaseModel):
    rule: str
    text: str
    value: float
    limit: float


class TrustRowOut(BaseModel):
    user_id: int
    username: str
    annotations: int
    median_time_s: float | None
    fast_share: float | None
    time_ratio: float | None
    consensus_agreement: float | None
    consensus_pairs: int
    gold_accuracy: float | None
    gold_tasks: int
    rating_histogram: list[int]
    top_rating_share: float | None
    rating_entropy_bits: float | None
    flagged: bool
    reasons: list[ReasonOut]
    quarantined: bool
    quarantined_at: datetime | None
    quarantined_by: str | None
    quarantine_reasons: list[ReasonOut]
    quarantined_annotations: int
    released_at: datetime | None


def trust_row_out(row: trust.TrustRow) -> TrustRowOut:
    return TrustRowOut(
        user_id=row.user_id, username=row.username, annotations=row.annotations, median_time_s=row.median_time_s,
        fast_share=row.fast_share, time_ratio=row.time_ratio, consensus_agreement=row.consensus_agreement,
        consensus_pairs=row.consensus_pairs, gold_accuracy=row.gold_accuracy, gold_tasks=row.gold_tasks,
        rating_histogram=row.rating_histogram, top_rating_share=row.top_rating_share,
        rating_entropy_bits=row.rating_entropy_bits, flagged=row.flagged,
        reasons=[ReasonOut(**vars(r)) for r in row.reasons], quarantined=row.quarantined,
        quarantined_at=row.quarantined_at, quarantined_by=row.quarantined_by,
        quarantine_reasons=[ReasonOut(**r) for r in row.quarantine_reasons],
        quarantined_annotations=row.quarantined_annotations, released_at=row.released_at,
    )


class TrustOut(BaseModel):
    rules: dict[str, Any]
    set_median_time_s: float | None
    labelers: list[TrustRowOut]


ShowQueue = Literal["open", "reviewed", "all"]

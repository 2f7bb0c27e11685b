"""Submitting, editing and listing a labeler's annotations, and the rankings ->
comparisons expansion the reward model trains on.

A submission rates every response of the task (Likert 1-7), ranks them best
(1) to worst (K) with ties allowed (ranks need not be distinct), and may flag
responses and the prompt. In one transaction it stores the annotation, one
rating row per response and one comparison per pair with different ranks
(chosen = the better rank; tied pairs give none, so K responses fully ranked
give K(K-1)/2), marks the lease submitted and counts the label on the task.

A pairwise set (every evaluation set, and ranking sets with K = 2 that choose it)
is labeled on the A/B page instead: the labeler votes A better, B better, tie or
both bad, with an optional strength. The vote is stored as given (votes), as
ranks without ratings (1/2, or 1/1 for a tie or both bad), so agreement, gold
and reward training read it exactly as a ranking, and as one comparison
(winner, loser, margin from the strength) when there is a winner.

Partial rankings: a set with `top_k` asks for the best top_k responses only. The
labeler ranks exactly top_k of them (ranks 1..top_k, ties allowed) and leaves the
others unranked; those are stored with rank top_k + 1, tied last, and the
annotation records its top_k. So the one expansion rule below gives each ranked
response a win over every unranked one and no pair among the unranked: K = 4,
top_k = 2 gives 1 + 2 x 2 = 5 pairs. Ratings are still required for every response.

"All bad": the labeler says every response is unacceptable, with a reason
(required, at most MAX_ALL_BAD_REASON characters). Such an annotation has no
ranking (ranks are null, none may be sent), its ratings are optional, and it
expands into no comparison; the flag and the reason are stored on the annotation,
exported and counted on the quality page.

A form carries a one-time idempotency key: a double click or a retry with the
same key finds the stored annotation and returns it instead of storing twice.

AI labelers (app/services/ai_labelers) submit through submit_unleased: the same
checks and rows, no lease, not counted on the task. On a set with pre-annotation
a labeler's submission records whether the AI's ranking was pre-filled
(prefill_arm: a fixed half of the tasks) and whether the labeler changed it.
"""

import hashlib
import itertools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, text
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.orm.attributes import set_committed_value

from app.db.enums import AssignmentStatus, VoteOutcome, VoteStrength
from app.db.models import (
    Annotation,
    Comparison,
    Vote,
    Prompt,
    PromptSet,
    Rating,
    Task,
    TaskResponse,
    User,
    labeler_set_name,
)
from app.services import trust
from app.services.assignment import check_lease, load_task, lock_for_submit
from app.services.errors import Conflict, Invalid, NotFound
from app.services.validation import small_int, text_problem

# The labeling metadata of InstructGPT (Ouyang et al. 2022, appendix B): (key, label).
RESPONSE_FLAGS: tuple[tuple[str, str], ...] = (
    ("fails_instruction", "Fails to follow the instruction"),
    ("hallucination", "Hallucination / makes up facts"),
    ("inappropriate_for_assistant", "Inappropriate for a customer assistant"),
    ("harmful_advice", "Harmful advice"),
    ("sexual_content", "Sexual content"),
    ("violent_content", "Violent content"),
    ("denigrates_protected_class", "Denigrates a protected class"),
    ("personal_information", "Contains personal information"),
    ("moral_judgment", "Expresses a moral judgment or opinion when not asked"),
)
PROMPT_FLAGS: tuple[tuple[str, str], ...] = (
    ("unclear", "Unclear"),
    ("harmful", "Harmful"),
    ("not_a_request", "Not a real request"),
)
RESPONSE_FLAG_KEYS = frozenset(key for key, _ in RESPONSE_FLAGS)
PROMPT_FLAG_KEYS = frozenset(key for key, _ in PROMPT_FLAGS)
# The rating given to every response by judges that give none (imported data, AI labelers): "okay".
NEUTRAL_LIKERT = 4
LIKERT_LABELS = {1: "very bad", 2: "bad", 3: "poor", 4: "okay", 5: "good", 6: "very good", 7: "excellent"}

# A labeler may change a submission for this long after making it.
EDIT_WINDOW = timedelta(hours=24)
# Time spent is clamped to this: a tab left open overnight is not 14 hours of work.
MAX_TIME_SPENT_S = 2 * 3600.0
MAX_COMMENT = 5000
MAX_ALL_BAD_REASON = Annotation.__table__.c.all_bad_reason.type.length  # 500, the column's length
IDEMPOTENCY_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
LETTERS = "ABCDEFGHI"

# The A/B page's choices, with their keyboard keys (static/js/label.js).
VOTE_CHOICES: tuple[tuple[str, str, str], ...] = (
    (VoteOutcome.a.value, "A is better", "1"),
    (VoteOutcome.b.value, "B is better", "2"),
    (VoteOutcome.tie.value, "Tie", "3"),
    (VoteOutcome.both_bad.value, "Both bad", "4"),
)
STRENGTHS: tuple[tuple[str, str], ...] = (
    (VoteStrength.slightly.value, "slightly better"),
    (VoteStrength.clearly.value, "clearly better"),
    (VoteStrength.much.value, "much better"),
)
# A vote's comparison margin (comparisons.rating_margin): a preference of unstated
# strength counts as the smallest.
STRENGTH_MARGIN: dict[VoteStrength | None, int] = {
    None: 1, VoteStrength.slightly: 1, VoteStrength.clearly: 2, VoteStrength.much: 3,
}


def letter(position: int) -> str:
    """A, B, C... for display positions 0, 1, 2..."""
    return LETTERS[position]


# ---- pure rules -------------------------------------------------------------------

@dataclass(frozen=True)
class Pair:
    chosen: int
    rejected: int
    rank_margin: int  # rank of rejected - rank of chosen, > 0
    rating_margin: int  # likert of chosen - likert of rejected (may be <= 0)


def expand_comparisons(ratings: Mapping[int, int], ranks: Mapping[int, int], *,
                       all_bad: bool = False) -> list[Pair]:
    """Every pair of responses with different ranks, better rank first; ties give none.
    The one place rankings become comparisons. A partial ranking comes with its unranked
    responses at rank top_k + 1 (tied last): each ranked one beats each of them, and
    they give no pair among themselves. An "all bad" annotation gives none."""
    if all_bad:
        return []
    ids = sorted(ranks, key=lambda rid: (ranks[rid], rid))
    return [
        Pair(a, b, ranks[b] - ranks[a], ratings[a] - ratings[b])
        for a, b in itertools.combinations(ids, 2)
        if ranks[a] < ranks[b]
    ]


def ranking_contradictions(ratings: Mapping[int, int], ranks: Mapping[int, int]) -> list[tuple[int, int]]:
    """Pairs (x, y) where x is rated strictly higher than y but ranked strictly below it
    (the same rule as the contradiction rate of app/services/agreement)."""
    return [
        (x, y)
        for x, y in itertools.permutations(sorted(ranks), 2)
        if ratings.get(x) is not None and ratings.get(y) is not None
        and ratings[x] > ratings[y] and ranks[x] > ranks[y]
    ]


def contradiction_warnings(task: Task, ratings: Mapping[int, int], ranks: Mapping[int, int]) -> list[str]:
    """The soft warnings shown (client and server side) when the ranking contradicts the ratings."""
    letters = {item.response_id: letter(item.position) for item in task.items}
    return [
        f"{letters[x]} is rated higher than {letters[y]} ({ratings[x]} vs {ratings[y]}) "
        f"but ranked below it ({ranks[x]} vs {ranks[y]})."
        for x, y in ranking_contradictions(ratings, ranks)
    ]


def clamp_time_spent(seconds: Any) -> float:
    """Seconds spent, clamped to 0..MAX_TIME_SPENT_S; anything unreadable counts as 0."""
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        return 0.0
    if value != value:  # NaN
        return 0.0
    return round(min(max(value, 0.0), MAX_TIME_SPENT_S), 3)


# ---- validation ---------------------------------------------------------------------

def _by_response(raw: Mapping[Any, Any] | None, response_ids: set[int], name: str,
                 errors: dict[str, str]) -> dict[int, Any]:
    out: dict[int, Any] = {}
    for key, value in (raw or {}).items():
        rid = small_int(key)
        if rid not in response_ids:
            errors[name] = f"response {key} is not part of this task"
            continue
        out[rid] = value
    return out


@dataclass
class CleanSubmission:
    ratings: dict[int, int | None]  # None: a vote's (it ranks without rating); "all bad" may leave some out
    ranks: dict[int, int]  # every response (unranked ones of a partial ranking: top_k + 1); none if all bad
    flags: dict[int, list[str]]
    prompt_flags: list[str]
    comment: str
    vote: VoteOutcome | None = None
    strength: VoteStrength | None = None
    # (response at A, response at B) of a vote
    sides: tuple[int, int] | None = None
    top_k: int | None = None  # a partial ranking of the best top_k
    all_bad: bool = False
    all_bad_reason: str | None = None


def _clean_flags(items: list[TaskResponse], raw_flags: Mapping[int, Any], clean: CleanSubmission,
                 errors: dict[str, str]) -> None:
    for item in items:
        rid, name = item.response_id, letter(item.position)
        chosen = raw_flags.get(rid) or []
        chosen = [chosen] if isinstance(chosen, str) else list(chosen)
        unknown = [f for f in chosen if f not in RESPONSE_FLAG_KEYS]
        if unknown:
            errors[f"flags-{rid}"] = f"unknown flag {unknown[0]!r} on {name}"
        clean.flags[rid] = sorted(set(chosen) & RESPONSE_FLAG_KEYS, key=_flag_order)


def _clean_prompt_flags_and_comment(prompt_flags: Iterable[str] | None, comment: str | None,
                                    clean: CleanSubmission, errors: dict[str, str]) -> None:
    given = [prompt_flags] if isinstance(prompt_flags, str) else list(prompt_flags or [])
    unknown = [f for f in given if f not in PROMPT_FLAG_KEYS]
    if unknown:
        errors["prompt_flags"] = f"unknown prompt flag {unknown[0]!r}"
    clean.prompt_flags = [key for key, _ in PROMPT_FLAGS if key in given]
    clean.comment = (comment or "").strip()
    if len(clean.comment) > MAX_COMMENT:
        errors["comment"] = f"at most {MAX_COMMENT} characters ({len(clean.comment)} given)"
    elif text_problem(clean.comment):
        errors["comment"] = text_problem(clean.comment)


def clean_vote(task: Task, *, vote: Any, strength: Any, flags: Mapping[Any, Iterable[str]] | None,
               prompt_flags: Iterable[str] | None, comment: str | None) -> CleanSubmission:
    """Check a vote on a pairwise task (A = position 0, B = position 1). Raises Invalid
    with one message per field: vote, strength, flags-<response_id>, prompt_flags, comment."""
    items = sorted(task.items, key=lambda item: item.position)
    if len(items) != 2:
        raise Conflict(f"Task {task.id} has {len(items)} responses; a vote compares two.")
    a, b = items[0].response_id, items[1].response_id
    errors: dict[str, str] = {}
    raw_flags = _by_response(flags, {a, b}, "flags", errors)
    clean = CleanSubmission(ratings={a: None, b: None}, ranks={}, flags={}, prompt_flags=[], comment="",
                            sides=(a, b))
    choices = ", ".join(v for v, _, _ in VOTE_CHOICES)
    raw_vote = vote.strip() if isinstance(vote, str) else vote
    if raw_vote in (None, ""):
        errors["vote"] = f"choose one of {choices}"
    elif raw_vote not in VoteOutcome.__members__.values():
        errors["vote"] = f"unknown vote {raw_vote!r}; choose one of {choices}"
    else:
        clean.vote = VoteOutcome(raw_vote)
    raw_strength = strength.strip() if isinstance(strength, str) else strength
    if raw_strength not in (None, ""):
        if raw_strength not in VoteStrength.__members__.values():
            errors["strength"] = f"unknown strength {raw_strength!r}; choose one of " + \
                ", ".join(v for v, _ in STRENGTHS)
        elif clean.vote in (VoteOutcome.tie, VoteOutcome.both_bad):
            errors["strength"] = "a tie or 'both bad' has no strength; leave it empty"
        else:
            clean.strength = VoteStrength(raw_strength)
    if clean.vote is not None:
        clean.ranks = {VoteOutcome.a: {a: 1, b: 2}, VoteOutcome.b: {a: 2, b: 1}}.get(clean.vote, {a: 1, b: 1})
    _clean_flags(items, raw_flags, clean, errors)
    _clean_prompt_flags_and_comment(prompt_flags, comment, clean, errors)
    if errors:
        detail = "choose A better, B better, tie or both bad" if "vote" in errors else "some fields are wrong"
        raise Invalid(f"Please fix the marked fields ({detail}).", errors=errors)
    return clean


def is_checked(value: Any) -> bool:
    """A checkbox or JSON flag: true, "true", "on", "1", "yes" (anything else is false)."""
    if isinstance(value, bool):
        return value
    return str(value or "").strip().lower() in ("true", "on", "1", "yes")


def _clean_all_bad_reason(reason: Any, errors: dict[str, str]) -> str | None:
    text = reason.strip() if isinstance(reason, str) else ""
    if not text:
        errors["all_bad_reason"] = "say why every response is unacceptable"
    elif len(text) > MAX_ALL_BAD_REASON:
        errors["all_bad_reason"] = f"at most {MAX_ALL_BAD_REASON} characters ({len(text)} given)"
    elif text_problem(text):
        errors["all_bad_reason"] = text_problem(text)
    else:
        return text
    return None


def _clean_rank(clean: CleanSubmission, rid: int, name: str, value: Any, k: int, top_k: int | None,
                errors: dict[str, str]) -> None:
    rank = small_int(value)
    blank = value is None or value == ""
    if top_k is None:
        if blank:
            errors[f"rank-{rid}"] = f"put {name} in a rank slot (1 = best, {k} = worst)"
        elif rank is None or not 1 <= rank <= k:
            errors[f"rank-{rid}"] = f"the rank of {name} must be a whole number from 1 to {k}"
        else:
            clean.ranks[rid] = rank
    elif blank:
        clean.ranks[rid] = top_k + 1  # not ranked: tied last
    elif rank is None or not 1 <= rank <= top_k:
        errors[f"rank-{rid}"] = (f"only the best {top_k} are ranked in this set: give {name} a rank "
                                 f"from 1 to {top_k}, or leave it unranked (tied last)")
    else:
        clean.ranks[rid] = rank


def clean_submission(task: Task, *, ratings: Mapping[Any, Any] | None, ranks: Mapping[Any, Any] | None,
                     flags: Mapping[Any, Iterable[str]] | None, prompt_flags: Iterable[str] | None,
                     comment: str | None, all_bad: Any = False, all_bad_reason: Any = None) -> CleanSubmission:
    """Check a submission against the task and its set's top_k. Raises Invalid with one
    message per field: rating-<response_id>, rank-<response_id>, ranks, flags-<response_id>,
    prompt_flags, comment, all_bad_reason."""
    items = sorted(task.items, key=lambda item: item.position)
    k = len(items)
    response_ids = {item.response_id for item in items}
    errors: dict[str, str] = {}
    raw_ratings = _by_response(ratings, response_ids, "ratings", errors)
    raw_ranks = _by_response(ranks, response_ids, "ranks", errors)
    raw_flags = _by_response(flags, response_ids, "flags", errors)
    clean = CleanSubmission(ratings={}, ranks={}, flags={}, prompt_flags=[], comment="",
                            all_bad=is_checked(all_bad))
    if clean.all_bad:
        clean.all_bad_reason = _clean_all_bad_reason(all_bad_reason, errors)
        if any(value not in (None, "") for value in raw_ranks.values()):
            errors["ranks"] = "an \"all bad\" submission has no ranking: leave every response unranked"
    else:
        clean.top_k = task.prompt_set.top_k
    for item in items:
        rid, name = item.response_id, letter(item.position)
        value = raw_ratings.get(rid)
        likert = small_int(value)
        if value is None or value == "":
            if not clean.all_bad:  # "all bad" needs no rating
                errors[f"rating-{rid}"] = f"rate {name} from 1 (very bad) to 7 (excellent)"
        elif likert is None or not 1 <= likert <= 7:
            errors[f"rating-{rid}"] = f"the rating of {name} must be a whole number from 1 to 7"
        else:
            clean.ratings[rid] = likert
        if not clean.all_bad:
            _clean_rank(clean, rid, name, raw_ranks.get(rid), k, clean.top_k, errors)
    _clean_flags(items, raw_flags, clean, errors)
    _clean_prompt_flags_and_comment(prompt_flags, comment, clean, errors)
    if clean.top_k is not None and not any(key.startswith("rank-") for key in errors):
        ranked = sum(1 for rank in clean.ranks.values() if rank <= clean.top_k)
        if ranked != clean.top_k:
            errors["ranks"] = (f"rank exactly {clean.top_k} responses, the best ones ({ranked} ranked); "
                               f"the others stay unranked, tied last")
    if errors:
        missing = sum(1 for key in errors if key.startswith(("rating-", "rank-")))
        detail = f"{missing} rating{'s' if missing != 1 else ''} or rank{'s' if missing != 1 else ''} missing or wrong" \
            if missing else "some fields are wrong"
        raise Invalid(f"Please fix the marked fields ({detail}).", errors=errors)
    return clean


_FLAG_ORDER = {key: i for i, (key, _) in enumerate(RESPONSE_FLAGS)}


def _flag_order(key: str) -> int:
    return _FLAG_ORDER[key]


def _check_key(key: str | None) -> str:
    key = (key or "").strip()
    if not IDEMPOTENCY_KEY_RE.match(key):
        raise Invalid(
            "The form lacks its one-time key; reload the page and try again.",
            errors={"idempotency_key": "8-64 letters, digits, _ or -"},
        )
    return key


def vote_pairs(clean: CleanSubmission) -> list[Pair]:
    """A vote's comparison: the winner over the loser, margin from the strength; none for
    a tie or both bad."""
    a, b = clean.sides
    if clean.vote == VoteOutcome.a:
        return [Pair(a, b, 1, STRENGTH_MARGIN[clean.strength])]
    if clean.vote == VoteOutcome.b:
        return [Pair(b, a, 1, STRENGTH_MARGIN[clean.strength])]
    return []


def _store(session: Session, annotation: Annotation, task: Task, clean: CleanSubmission, *,
           add: bool = True) -> None:
    """The annotation's ratings, comparisons and vote, as ORM rows (added to the session
    unless `add` is false: a new submission is written by _WRITE_SUBMISSION instead)."""
    ratings = [Rating(task_id=task.id, response_id=item.response_id, likert=clean.ratings.get(item.response_id),
                      rank=clean.ranks.get(item.response_id), flags=clean.flags.get(item.response_id, []))
               for item in sorted(task.items, key=lambda item: item.position)]
    pairs = vote_pairs(clean) if clean.vote else expand_comparisons(clean.ratings, clean.ranks, all_bad=clean.all_bad)
    comparisons = [Comparison(task_id=task.id, chosen_response_id=pair.chosen, rejected_response_id=pair.rejected,
                              rank_margin=pair.rank_margin, rating_margin=pair.rating_margin)
                   for pair in pairs]
    vote = None
    if clean.vote:
        vote = Vote(task_id=task.id, response_a_id=clean.sides[0], response_b_id=clean.sides[1],
                    outcome=clean.vote, strength=clean.strength)
    if add:
        annotation.ratings.extend(ratings)
        annotation.comparisons.extend(comparisons)
        annotation.vote = vote
    else:
        set_committed_value(annotation, "ratings", ratings)
        set_committed_value(annotation, "comparisons", comparisons)
        set_committed_value(annotation, "vote", vote)


# A new submission in one round trip: the annotation, its ratings, comparisons and vote (rows
# of JSON arrays), the lease marked submitted and the label counted on the task. The
# ORM's unit of work did the same in five statements and was the largest CPU cost of
# a submit (see README, "Performance of the labeling loop"). Returns the annotation's
# id and the task's new label count.
# The same statement counts the submission on the labeler's trust row of the set and
# reads their quarantine: a quarantined labeler's annotation is stored excluded and
# marked quarantined (app/services/trust), at no extra round trip.
_WRITE_SUBMISSION = text("""
WITH trust AS (
    INSERT INTO labeler_trust (prompt_set_id, user_id, submitted)
    SELECT t.prompt_set_id, :user_id, 1 FROM tasks t WHERE t.id = :task_id
    ON CONFLICT (prompt_set_id, user_id) DO UPDATE SET submitted = labeler_trust.submitted + 1
    RETURNING submitted, quarantined
), annotation AS (
    INSERT INTO annotations (task_id, user_id, time_spent_s, prompt_flags, comment, idempotency_key,
                             excluded, quarantined, top_k, all_bad, all_bad_reason, prefill_shown,
                             prefill_changed, prefill_user_id, created_at, updated_at)
    SELECT :task_id, :user_id, :time_spent_s, CAST(:prompt_flags AS jsonb), :comment, :key,
           trust.quarantined, trust.quarantined, :top_k, :all_bad, :all_bad_reason, :prefill_shown,
           :prefill_changed, :prefill_user_id, :now, :now
    FROM trust
    RETURNING id, quarantined
), ratings AS (
    INSERT INTO ratings (annotation_id, task_id, response_id, likert, rank, flags)
    SELECT annotation.id, :task_id, r.response_id, r.likert, r.rank, r.flags
    FROM annotation, jsonb_to_recordset(CAST(:ratings AS jsonb))
        AS r(response_id integer, likert integer, rank integer, flags jsonb)
), comparisons AS (
    INSERT INTO comparisons (annotation_id, task_id, chosen_response_id, rejected_response_id,
                             rank_margin, rating_margin, created_at)
    SELECT annotation.id, :task_id, c.chosen, c.rejected, c.rank_margin, c.rating_margin, :now
    FROM annotation, jsonb_to_recordset(CAST(:comparisons AS jsonb))
        AS c(chosen integer, rejected integer, rank_margin integer, rating_margin integer)
), votes AS (
    INSERT INTO votes (annotation_id, task_id, response_a_id, response_b_id, outcome, strength)
    SELECT annotation.id, :task_id, v.a, v.b, v.outcome, v.strength
    FROM annotation, jsonb_to_recordset(CAST(:votes AS jsonb)) AS v(a integer, b integer, outcome text, strength text)
), submitted AS (
    UPDATE assignments SET status = 'submitted', finished_at = :now WHERE id = :assignment_id
)
UPDATE tasks SET num_labels = num_labels + 1 FROM annotation, trust WHERE tasks.id = :task_id
RETURNING annotation.id, tasks.num_labels, annotation.quarantined, trust.submitted
""")


# ---- use cases ------------------------------------------------------------------------

@dataclass
class Submission:
    # The stored annotation with its ratings and comparisons; a new one is written in
    # one statement, so it is a copy outside the session (its id is the stored row's).
    annotation: Annotation
    created: bool  # False when a retry found the stored annotation
    warnings: list[str] = field(default_factory=list)


def clean_any(task: Task, *, ratings: Any, ranks: Any, vote: Any, strength: Any, flags: Any,
              prompt_flags: Any, comment: Any, all_bad: Any = False, all_bad_reason: Any = None) -> CleanSubmission:
    """A vote on a pairwise set's task, ratings and ranks on any other (see the module docstring)."""
    if task.prompt_set.pairwise:
        return clean_vote(task, vote=vote, strength=strength, flags=flags, prompt_flags=prompt_flags, comment=comment)
    return clean_submission(task, ratings=ratings, ranks=ranks, flags=flags, prompt_flags=prompt_flags,
                            comment=comment, all_bad=all_bad, all_bad_reason=all_bad_reason)


def _stored_warnings(task: Task, annotation: Annotation) -> list[str]:
    ratings = {r.response_id: r.likert for r in annotation.ratings if r.likert is not None}
    ranks = {r.response_id: r.rank for r in annotation.ratings if r.rank is not None}
    return contradiction_warnings(task, ratings, ranks)


def submit_annotation(
    session: Session, *, user: User, task_id: int, ratings: Mapping[Any, Any] | None,
    ranks: Mapping[Any, Any] | None, flags: Mapping[Any, Iterable[str]] | None = None,
    prompt_flags: Iterable[str] | None = None, comment: str | None = "", time_spent_s: Any = None,
    idempotency_key: str | None, now: datetime | None = None, vote: Any = None, strength: Any = None,
    all_bad: Any = False, all_bad_reason: Any = None, prefill_offered: bool = False,
) -> Submission:
    """Store the labeler's annotation of a task they hold a live lease on, with its
    ratings and comparisons, in one transaction. A retry with the same key returns
    the stored annotation. Everything is checked with the task row locked and by the
    database's clock (`now` replaces it in tests), access before the form: Raises
    NotFound, Conflict, NotAllowed (see check_lease), then Invalid (per field).
    A task of a pairwise set takes `vote` and `strength` instead of ratings and ranks."""
    # The task and lease rows are the locks: a concurrent submit of the same labeler
    # waits here, then finds the annotation its twin stored; a labeler leasing the
    # task waits too, so the lease checked below cannot go to them meanwhile.
    given_key = (idempotency_key or "").strip()
    hold = lock_for_submit(session, user=user, task_id=task_id, idempotency_key=given_key, now=now)
    task = hold.task
    if hold.stored_annotation_id is not None:
        stored = session.scalar(
            select(Annotation).where(Annotation.id == hold.stored_annotation_id)
            .options(selectinload(Annotation.ratings))
            .execution_options(populate_existing=True)
        )
        if stored.user_id != user.id or stored.task_id != task_id:
            raise Conflict("This form was already used for another submission; reload the page.")
        session.commit()
        return Submission(annotation=stored, created=False, warnings=_stored_warnings(task, stored))
    check_lease(hold)
    key = _check_key(idempotency_key)
    now = hold.now
    clean = clean_any(task, ratings=ratings, ranks=ranks, vote=vote, strength=strength, flags=flags,
                      prompt_flags=prompt_flags, comment=comment, all_bad=all_bad, all_bad_reason=all_bad_reason)
    # The pre-annotation study counts submissions from the labeling page, which offers the pre-fill
    # (prefill_offered); the API never shows it, so its submissions are no evidence either way.
    shown, changed = prefill_outcome(session, task, clean) if prefill_offered else (None, None)
    prefill_user_id = task.prompt_set.pre_annotator_id if shown is not None else None
    annotation = Annotation(
        task_id=task_id, user_id=user.id, time_spent_s=clamp_time_spent(time_spent_s),
        prompt_flags=clean.prompt_flags, comment=clean.comment, idempotency_key=key,
        excluded=False, top_k=clean.top_k, all_bad=clean.all_bad, all_bad_reason=clean.all_bad_reason,
        prefill_shown=shown, prefill_changed=changed, prefill_user_id=prefill_user_id, created_at=now, updated_at=now,
    )
    _store(session, annotation, task, clean, add=False)
    annotation.id, num_labels, quarantined, submitted = session.execute(_WRITE_SUBMISSION, {
        "task_id": task_id, "user_id": user.id, "time_spent_s": annotation.time_spent_s,
        "prompt_flags": json.dumps(annotation.prompt_flags), "comment": annotation.comment, "key": key,
        "now": now, "assignment_id": hold.assignment.id, "top_k": clean.top_k, "all_bad": clean.all_bad,
        "all_bad_reason": clean.all_bad_reason, "prefill_shown": shown, "prefill_changed": changed,
        "prefill_user_id": prefill_user_id,
        "ratings": json.dumps([{"response_id": r.response_id, "likert": r.likert, "rank": r.rank, "flags": r.flags}
                               for r in annotation.ratings]),
        "comparisons": json.dumps([{"chosen": c.chosen_response_id, "rejected": c.rejected_response_id,
                                    "rank_margin": c.rank_margin, "rating_margin": c.rating_margin}
                                   for c in annotation.comparisons]),
        "votes": json.dumps([{"a": v.response_a_id, "b": v.response_b_id, "outcome": v.outcome.value,
                              "strength": v.strength.value if v.strength else None}
                             for v in [annotation.vote] if v is not None]),
    }).one()
    set_committed_value(task, "num_labels", num_labels)
    set_committed_value(hold.assignment, "status", AssignmentStatus.submitted)
    set_committed_value(hold.assignment, "finished_at", now)
    annotation.excluded = annotation.quarantined = quarantined
    session.commit()
    # Every few submissions on a set, the set's trust rules look at the labeler again
    # (a few statements, off the common path; see app/services/trust).
    if trust.check_due(submitted):
        trust.check_labeler(session, prompt_set_id=task.prompt_set_id, user_id=user.id)
    return Submission(annotation=annotation, created=True,
                      warnings=contradiction_warnings(task, clean.ratings, clean.ranks))


def submit_unleased(session: Session, *, user: User, task: Task, ranks: Mapping[int, int],
                    now: datetime) -> Annotation:
    """Store an AI labeler's ranking of a task (an ai_label job writes it): the same checks
    and rows as a labeler's submission (clean_any, _store), with no lease, and not counted
    on the task (tasks.num_labels is the human overlap). Ratings are neutral (the judge
    gives none). A pairwise set's task gets the vote the ranking means; a partial
    ranking set's, the best top_k of the ranking (its order ties broken by position).
    Replaces the labeler's earlier annotation of the task. Does not commit. Raises Invalid."""
    ordered = sorted(task.items, key=lambda item: item.position)
    given, vote = dict(ranks), None
    if task.prompt_set.pairwise:
        a, b = (item.response_id for item in ordered)
        vote = VoteOutcome.a if given[a] < given[b] else VoteOutcome.b if given[b] < given[a] else VoteOutcome.tie
    elif task.prompt_set.top_k is not None:
        best = sorted(given, key=lambda rid: given[rid])[:task.prompt_set.top_k]
        given = {rid: rank for rid, rank in given.items() if rid in best}
    clean = clean_any(task, ratings={item.response_id: NEUTRAL_LIKERT for item in ordered}, ranks=given, vote=vote,
                      strength=None, flags=None, prompt_flags=None, comment="")
    session.execute(delete(Annotation).where(Annotation.task_id == task.id, Annotation.user_id == user.id))
    annotation = Annotation(task_id=task.id, user_id=user.id, time_spent_s=0.0, prompt_flags=[], comment="",
                            excluded=False, top_k=clean.top_k, created_at=now, updated_at=now)
    _store(session, annotation, task, clean)
    session.add(annotation)
    return annotation


def prefill_outcome(session: Session, task: Task, clean: CleanSubmission) -> tuple[bool | None, bool | None]:
    """(prefill shown, changed) to record with a labeler's submission on a set with pre-annotation:
    (None, None) when the set has none or its AI labeler has not ranked the task; else whether
    the task is in the shown half (prefill_arm) and, if so, whether the submitted ranking differs
    from the AI's."""
    ai_ranks = prefill_ranks(session, task)
    if ai_ranks is None:
        return None, None
    if not prefill_arm(task.id):
        return False, None
    return True, clean.all_bad or dict(clean.ranks) != ai_ranks


def prefill_arm(task_id: int) -> bool:
    """Whether a task of a pre-annotated set shows the AI's ranking: a fixed half of the
    tasks, by a hash of the task id (the other half measures labelers without it)."""
    return hashlib.sha256(f"prefill:{task_id}".encode()).digest()[0] % 2 == 0


def prefill_ranks(session: Session, task: Task) -> dict[int, int] | None:
    """The set's pre-annotator's ranks of the task {response_id: rank}, or None (no
    pre-annotation on the set, or the AI labeler has not ranked the task)."""
    ai_id = task.prompt_set.pre_annotator_id
    if ai_id is None:
        return None
    rows = session.execute(
        select(Rating.response_id, Rating.rank).join(Annotation, Annotation.id == Rating.annotation_id)
        .where(Annotation.task_id == task.id, Annotation.user_id == ai_id, Rating.rank.is_not(None))
    ).all()
    return {rid: rank for rid, rank in rows} or None


def prefill_values(session: Session, task: Task) -> dict[str, Any] | None:
    """Form values pre-filling the AI's ranking (or vote) on the labeling page, on the
    shown half of a pre-annotated set's tasks; None otherwise. Ratings stay for the labeler."""
    ranks = prefill_ranks(session, task) if prefill_arm(task.id) else None
    if ranks is None:
        return None
    top_k = task.prompt_set.top_k
    shown = {rid: str(rank) for rid, rank in ranks.items() if top_k is None or rank <= top_k}
    values: dict[str, Any] = {"ranks": shown}
    if task.prompt_set.pairwise:
        a, b = (item.response_id for item in sorted(task.items, key=lambda item: item.position))
        values["vote"] = "a" if ranks[a] < ranks[b] else "b" if ranks[b] < ranks[a] else "tie"
    return values


def edit_deadline(annotation: Annotation) -> datetime:
    return annotation.created_at + EDIT_WINDOW


def can_edit(annotation: Annotation, now: datetime) -> bool:
    return now < edit_deadline(annotation)


def get_own_annotation(session: Session, *, user: User, annotation_id: int) -> Annotation:
    """The labeler's own annotation with its ratings; raises NotFound (also for others' annotations)."""
    annotation = session.scalar(
        select(Annotation)
        .where(Annotation.id == annotation_id, Annotation.user_id == user.id)
        .options(selectinload(Annotation.ratings), selectinload(Annotation.vote))
    )
    if annotation is None:
        raise NotFound(f"You have no annotation {annotation_id}.")
    return annotation


def edit_annotation(
    session: Session, *, user: User, annotation_id: int, ratings: Mapping[Any, Any] | None,
    ranks: Mapping[Any, Any] | None, flags: Mapping[Any, Iterable[str]] | None = None,
    prompt_flags: Iterable[str] | None = None, comment: str | None = "", now: datetime,
    vote: Any = None, strength: Any = None,
    all_bad: Any = False, all_bad_reason: Any = None,
) -> Submission:
    """Replace the ratings, flags and comparisons of the labeler's own annotation while
    the edit window (EDIT_WINDOW after submitting) is open. Raises NotFound, Conflict, Invalid."""
    annotation = session.scalar(
        select(Annotation)
        .where(Annotation.id == annotation_id, Annotation.user_id == user.id)
        .with_for_update()
        .options(selectinload(Annotation.ratings), selectinload(Annotation.comparisons),
                 selectinload(Annotation.vote))
        .execution_options(populate_existing=True)
    )
    if annotation is None:
        raise NotFound(f"You have no annotation {annotation_id}.")
    if not can_edit(annotation, now):
        raise Conflict(
            f"This submission can no longer be changed: edits are possible for "
            f"{int(EDIT_WINDOW.total_seconds() // 3600)} hours after submitting."
        )
    task = load_task(session, annotation.task_id)
    clean = clean_any(task, ratings=ratings, ranks=ranks, vote=vote, strength=strength, flags=flags,
                      prompt_flags=prompt_flags, comment=comment, all_bad=all_bad, all_bad_reason=all_bad_reason)
    annotation.ratings.clear()
    annotation.comparisons.clear()
    annotation.vote = None
    session.flush()  # the old rows go before the new ones take their unique keys
    _store(session, annotation, task, clean)
    annotation.prompt_flags = clean.prompt_flags
    annotation.comment = clean.comment
    annotation.top_k, annotation.all_bad, annotation.all_bad_reason = clean.top_k, clean.all_bad, clean.all_bad_reason
    annotation.updated_at = now
    session.commit()
    return Submission(annotation=annotation, created=False,
                      warnings=contradiction_warnings(task, clean.ratings, clean.ranks))


def submission_values(annotation: Annotation) -> dict[str, Any]:
    """A stored annotation as form values (for the edit form): unrated and unranked
    responses (tied last in a partial ranking) are blank."""
    def ranked(rank: int | None) -> bool:
        return rank is not None and (annotation.top_k is None or rank <= annotation.top_k)

    vote = annotation.vote
    return {
        "vote": vote.outcome.value if vote else "",
        "strength": vote.strength.value if vote and vote.strength else "",
        "ratings": {r.response_id: str(r.likert) for r in annotation.ratings if r.likert is not None},
        "ranks": {r.response_id: str(r.rank) for r in annotation.ratings if ranked(r.rank)},
        "flags": {r.response_id: list(r.flags) for r in annotation.ratings},
        "prompt_flags": list(annotation.prompt_flags),
        "comment": annotation.comment,
        "all_bad": annotation.all_bad,
        "all_bad_reason": annotation.all_bad_reason or "",
    }


# ---- counts and history ------------------------------------------------------------

@dataclass
class LabelerCounts:
    today: int  # since midnight UTC
    total: int


def labeler_counts(session: Session, *, user: User, now: datetime) -> LabelerCounts:
    """How many tasks the labeler submitted today (UTC) and in total."""
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    today, total = session.execute(
        select(func.count().filter(Annotation.created_at >= midnight), func.count())
        .where(Annotation.user_id == user.id)
    ).one()
    return LabelerCounts(today=today, total=total)


@dataclass
class HistoryRating:
    letter: str
    likert: int | None  # None: a vote's, or not rated ("all bad")
    rank: int | None  # None: not ranked ("all bad")
    flags: list[str]


@dataclass
class HistoryItem:
    annotation: Annotation
    prompt_set_name: str
    prompt_text: str
    ratings: list[HistoryRating]  # in display order A, B, C...
    comparisons: int
    editable: bool
    edit_until: datetime


def history(session: Session, *, user: User, now: datetime, limit: int = 50, offset: int = 0) -> list[HistoryItem]:
    """The labeler's submissions, newest first."""
    comparison_count = (
        select(func.count(Comparison.id)).where(Comparison.annotation_id == Annotation.id)
        .correlate(Annotation).scalar_subquery()
    )
    rows = session.execute(
        select(Annotation, PromptSet.id, PromptSet.name, PromptSet.kind, Prompt.text, comparison_count)
        .join(Task, Task.id == Annotation.task_id)
        .join(PromptSet, PromptSet.id == Task.prompt_set_id)
        .join(Prompt, Prompt.id == Task.prompt_id)
        .where(Annotation.user_id == user.id)
        .order_by(Annotation.created_at.desc(), Annotation.id.desc())
        .limit(limit).offset(offset)
    ).all()
    ids = [row[0].id for row in rows]
    by_annotation: dict[int, list[HistoryRating]] = {i: [] for i in ids}
    for rating, position in session.execute(
        select(Rating, TaskResponse.position)
        .join(TaskResponse, (TaskResponse.task_id == Rating.task_id) & (TaskResponse.response_id == Rating.response_id))
        .where(Rating.annotation_id.in_(ids))
        .order_by(Rating.annotation_id, TaskResponse.position)
    ):
        by_annotation[rating.annotation_id].append(
            HistoryRating(letter=letter(position), likert=rating.likert, rank=rating.rank, flags=list(rating.flags))
        )
    return [
        HistoryItem(
            annotation=annotation, prompt_set_name=labeler_set_name(set_id, set_name, kind), prompt_text=text,
            ratings=by_annotation[annotation.id], comparisons=n,
            editable=can_edit(annotation, now), edit_until=edit_deadline(annotation),
        )
        for annotation, set_id, set_name, kind, text, n in rows
    ]

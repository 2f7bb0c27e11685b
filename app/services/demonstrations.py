"""Demonstrations: labelers write the response they want for a prompt; admins
review them; accepted ones are the SFT training data (step 1 of the recipe).

Leases. A demonstration row is created when a labeler is given a prompt: it is
a draft whose `expires_at` is the lease (Settings.lease_s). The rules are those
of ranking tasks (app/services/assignment):
- a labeler holds at most one lease; asking again (a reload) gives the same
  prompt back, draft text included, until the lease expires;
- a prompt's holders are its submitted and accepted demonstrations plus its
  drafts with an unexpired lease; it never gets more than the set's overlap,
  and never the same labeler twice (the row is unique per prompt and labeler);
- a rejected demonstration no longer holds its prompt (it goes to another
  labeler), a skipped one never did;
- an expired draft keeps its text: its labeler gets it back first if the
  prompt still has room (autosave renews the lease while they write);
- prompts with demonstrations already come first (finish the overlap), then
  the oldest; only active demonstration sets the labeler is allowed on.
Concurrency: the prompt row is locked (FOR UPDATE SKIP LOCKED) and its holders
counted again before a lease is written; every path that adds a holder or
renews a lease locks the prompt first and then reads the database's clock (see
"Clock" in app/services/assignment). A per-labeler advisory lock serialises one
labeler's requests, so they always lock in the same order.

Reading: a labeler reads a demonstration only through `labeler_demonstration`
(their own); a submit also re-checks that its set is active and open to them.

Submitting is idempotent: the row is unique per (prompt, labeler), and a
submit of a demonstration already submitted (a double click, a retry) returns
it unchanged.

Review: accept, reject with a reason, or edit (the admin's text replaces the
labeler's and the demonstration is accepted). Only accepted demonstrations
reach training (`accepted_demonstrations`) and the export.

Import: JSONL, one demonstration per line, all or nothing with line-numbered
problems (the checks of app/services/prompt_import):
    {"prompt": "Write a haiku about rain.", "response": "Soft rain on the roof..."}
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello!"}]}
`completion` is accepted for `response` (TRL's prompt-completion format), and
`id` and `metadata` as in prompt imports. The prompts are added to the set
(or found there) and the demonstrations stored as the importer's, accepted.

Export: accepted demonstrations in the SFT formats TRL reads: `messages`
({"messages": [..., {"role": "assistant", ...}]}) or `prompt_completion`
({"prompt": [...], "completion": [{"role": "assistant", ...}]}), one JSON line each.
"""

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, func, or_, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from app.db.enums import DemonstrationStatus, PromptSetKind, PromptSetStatus, Role, Split
from app.db.models import Demonstration, Prompt, PromptSet, PromptSetLabeler, Response, User
from app.services.annotations import PROMPT_FLAG_KEYS, PROMPT_FLAGS, clamp_time_spent
from app.services.assignment import clean_skip_reason, lease_clock
from app.services.errors import Conflict, Invalid, NotAllowed, NotFound
from app.services.export import stream_rows
from app.services.labelers import is_allowed
from app.services.prompt_import import (
    LIMITS,
    ImportLimits,
    _check_length,
    _check_text,
    _external_id,
    _fail,
    _json_type,
    _messages,
    _metadata,
    _Problems,
    decode,
)
from app.services.prompt_sets import canonical_messages, get_prompt_set, prompt_hash, split_for
from app.services.validation import JsonProblem, check_text, load_json

# Namespace of the per-labeler advisory lock (ranking leases use 7_301).
_LEASE_LOCK_NS = 7_302
_MAX_ATTEMPTS = 50
MAX_TEXT_CHARS = 20_000
MAX_REASON_CHARS = 2_000
SKIP_REASONS = (
    "I cannot write a good answer on this topic",
    "The prompt is unclear",
    "The prompt is harmful or inappropriate",
    "Other",
)
EXPORT_FORMATS = ("messages", "prompt_completion")
HOLDING = (DemonstrationStatus.submitted, DemonstrationStatus.accepted)
DONE = (DemonstrationStatus.submitted, DemonstrationStatus.accepted, DemonstrationStatus.rejected)


# ---- leases -------------------------------------------------------------------------

def _holds(now: datetime):
    """SQL: the demonstration holds its prompt (submitted, accepted, or a draft still leased)."""
    return or_(
        Demonstration.status.in_(HOLDING),
        and_(Demonstration.status == DemonstrationStatus.draft, Demonstration.expires_at > now),
    )


def _eligible_sets(user_id: int):
    """SQL: the set is an active demonstration set open to the labeler."""
    listed_any = exists().where(PromptSetLabeler.prompt_set_id == PromptSet.id)
    listed_me = exists().where(PromptSetLabeler.prompt_set_id == PromptSet.id, PromptSetLabeler.user_id == user_id)
    return and_(
        PromptSet.status == PromptSetStatus.active,
        PromptSet.kind == PromptSetKind.demonstration,
        or_(~listed_any, listed_me),
    )


def load_demonstration(session: Session, demonstration_id: int) -> Demonstration:
    """The demonstration with its prompt and set, unchecked (admins' review; a labeler
    reads through `labeler_demonstration`). Raises NotFound."""
    demo = session.get(Demonstration, demonstration_id, populate_existing=True)
    if demo is None:
        raise NotFound(f"There is no demonstration {demonstration_id}.")
    return demo


def current_demonstration(session: Session, *, user: User, now: datetime) -> Demonstration | None:
    """The labeler's draft under an unexpired lease, on a set they may still write for."""
    return session.scalar(
        select(Demonstration)
        .join(Prompt, Prompt.id == Demonstration.prompt_id)
        .join(PromptSet, PromptSet.id == Prompt.prompt_set_id)
        .where(
            Demonstration.user_id == user.id,
            Demonstration.status == DemonstrationStatus.draft,
            Demonstration.expires_at > now,
            _eligible_sets(user.id),
        )
        .order_by(Demonstration.updated_at, Demonstration.id)
        .limit(1)
    )


def _holder_count(session: Session, prompt_id: int, now: datetime, *, except_id: int | None = None) -> int:
    query = select(func.count(Demonstration.id)).where(Demonstration.prompt_id == prompt_id, _holds(now))
    if except_id is not None:
        query = query.where(Demonstration.id != except_id)
    return session.scalar(query) or 0


def _pick(session: Session, *, user_id: int, now: datetime, exclude: set[int], skip_locked: bool) -> int | None:
    """Lock and return the id of the best prompt for the labeler, or None."""
    # Every prompt the labeler has a row on is out, except their own expired drafts.
    mine_done = select(Demonstration.prompt_id).where(
        Demonstration.user_id == user_id,
        or_(Demonstration.status != DemonstrationStatus.draft, Demonstration.expires_at > now),
    )
    own_draft = exists().where(
        Demonstration.prompt_id == Prompt.id, Demonstration.user_id == user_id,
        Demonstration.status == DemonstrationStatus.draft,
    )
    holders = (
        select(func.count(Demonstration.id))
        .where(Demonstration.prompt_id == Prompt.id, _holds(now))
        .correlate(Prompt)
        .scalar_subquery()
    )
    query = (
        select(Prompt.id)
        .join(PromptSet, PromptSet.id == Prompt.prompt_set_id)
        .where(_eligible_sets(user_id), Prompt.id.not_in(mine_done), holders < PromptSet.overlap)
        .order_by(own_draft.desc(), holders.desc(), Prompt.created_at, Prompt.id)
        .limit(1)
        .with_for_update(of=Prompt, skip_locked=skip_locked)
    )
    if exclude:
        query = query.where(Prompt.id.not_in(exclude))
    return session.scalar(query)


def _overlap_of(session: Session, prompt_id: int) -> int:
    return session.scalar(
        select(PromptSet.overlap).join(Prompt, Prompt.prompt_set_id == PromptSet.id).where(Prompt.id == prompt_id)
    )


def _lock_writer(session: Session, user_id: int) -> None:
    session.execute(text("SELECT pg_advisory_xact_lock(CAST(:ns AS integer), CAST(:uid AS integer))"),
                    {"ns": _LEASE_LOCK_NS, "uid": user_id})


def lease_next_demonstration(session: Session, *, user: User, lease_s: int,
                             now: datetime | None = None) -> Demonstration | None:
    """The labeler's current draft, or a new lease on the best prompt they may write
    for; None when nothing is left for them. Times are the database clock's unless
    `now` is given. Commits."""
    if lease_s <= 0:
        raise Invalid("The lease must last at least one second.", errors={"lease_s": "must be positive"})
    user_id = user.id
    _lock_writer(session, user_id)
    start = lease_clock(session, now)
    demo = current_demonstration(session, user=user, now=start)
    if demo is not None:
        session.commit()
        return demo
    tried: set[int] = set()
    for _ in range(_MAX_ATTEMPTS):
        # A savepoint per attempt: rolling it back releases the lock on a prompt found full.
        attempt = session.begin_nested()
        prompt_id = _pick(session, user_id=user_id, now=start, exclude=tried, skip_locked=True)
        if prompt_id is None:
            # Every candidate is being leased by someone right now: wait for one.
            prompt_id = _pick(session, user_id=user_id, now=start, exclude=tried, skip_locked=False)
        if prompt_id is None:
            attempt.rollback()
            break
        now_locked = lease_clock(session, now)  # read under the prompt's row lock
        if _holder_count(session, prompt_id, now_locked) >= _overlap_of(session, prompt_id):
            attempt.rollback()
            tried.add(prompt_id)
            continue
        demo = session.scalar(
            select(Demonstration).where(Demonstration.prompt_id == prompt_id, Demonstration.user_id == user_id)
        )
        if demo is None:
            demo = Demonstration(prompt_id=prompt_id, user_id=user_id, status=DemonstrationStatus.draft,
                                 text="", created_at=now_locked)
            session.add(demo)
        assert demo.status == DemonstrationStatus.draft  # _pick only offers the labeler's own drafts again
        demo.expires_at = now_locked + timedelta(seconds=lease_s)
        demo.updated_at = now_locked
        attempt.commit()
        session.commit()
        return demo
    session.commit()
    return None


def labeler_demonstration(session: Session, *, user: User, demonstration_id: int,
                          lock: bool = False) -> Demonstration:
    """The labeler's own demonstration, the only way a labeler reads one; a draft only
    while its set is active and open to them (`lock`: taken for a change, after the
    labeler's advisory lock). Raises NotFound, or NotAllowed (another labeler's, or
    a draft of a set closed to them)."""
    if lock:
        _lock_writer(session, user.id)
    demo = session.get(Demonstration, demonstration_id, with_for_update=lock, populate_existing=True)
    if demo is None:
        raise NotFound(f"There is no demonstration {demonstration_id}; open Write to get a prompt.")
    if demo.user_id != user.id:
        raise NotAllowed(f"Demonstration {demonstration_id} is not yours; open Write to get a prompt.")
    if demo.status == DemonstrationStatus.draft:
        _check_open(session, demo, user)
    return demo


def _own(session: Session, *, user: User, demonstration_id: int) -> Demonstration:
    return labeler_demonstration(session, user=user, demonstration_id=demonstration_id, lock=True)


def _lock_prompt(session: Session, demo: Demonstration, now: datetime | None) -> datetime:
    """Lock the demonstration's prompt row, as leasing does, and read the clock after it:
    a lease another labeler was granted meanwhile is then seen, and so is its time."""
    session.execute(select(Prompt.id).where(Prompt.id == demo.prompt_id).with_for_update())
    return lease_clock(session, now)


def _renew(session: Session, demo: Demonstration, *, now: datetime, lease_s: int) -> bool:
    """Extend the draft's lease (its prompt locked by _lock_prompt, `now` read after);
    an expired one only while its prompt still has room. Returns whether the
    labeler holds the prompt now."""
    if demo.expires_at is None or demo.expires_at <= now:
        if _holder_count(session, demo.prompt_id, now, except_id=demo.id) >= _overlap_of(session, demo.prompt_id):
            return False
    demo.expires_at = now + timedelta(seconds=lease_s)
    return True


def _check_open(session: Session, demo: Demonstration, user: User) -> None:
    """Raise NotAllowed unless the demonstration's set is an active demonstration set
    open to the labeler (the set's name is left out of the message)."""
    prompt_set = session.get(PromptSet, demo.prompt.prompt_set_id, populate_existing=True)
    if prompt_set.status != PromptSetStatus.active or prompt_set.kind != PromptSetKind.demonstration:
        raise NotAllowed(f"This prompt's set is {prompt_set.status.value}: its prompts cannot be written now."
                         " Open Write for another prompt.")
    if not is_allowed(session, prompt_set_id=prompt_set.id, user_id=user.id):
        raise NotAllowed("You are no longer among the writers of this prompt's set. Open Write for another prompt.")


def _clean_text(value: Any, *, field_name: str = "text", required: bool) -> str:
    if not isinstance(value, str):
        raise Invalid("The text must be a string.", errors={field_name: "must be text"})
    value = check_text(value.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", ""), field_name)
    if len(value) > MAX_TEXT_CHARS:
        raise Invalid(f"The text is {len(value):,} characters long; the limit is {MAX_TEXT_CHARS:,}.",
                      errors={field_name: f"at most {MAX_TEXT_CHARS:,} characters"})
    if required and not value.strip():
        raise Invalid("Write a response before submitting.", errors={field_name: "write your response"})
    return value


def _clean_flags(flags: Iterable[str] | str | None) -> list[str]:
    given = [flags] if isinstance(flags, str) else list(flags or [])
    unknown = [f for f in given if f not in PROMPT_FLAG_KEYS]
    if unknown:
        raise Invalid(f"Unknown prompt flag {unknown[0]!r}.", errors={"prompt_flags": f"unknown flag {unknown[0]!r}"})
    return [key for key, _ in PROMPT_FLAGS if key in given]


@dataclass
class SaveResult:
    demonstration: Demonstration
    saved: bool  # False when it was already submitted (a late autosave changes nothing)
    holds_lease: bool  # False when the lease ran out and the prompt went to others (the text is kept)


def save_draft(session: Session, *, user: User, demonstration_id: int, text: str, lease_s: int,
               now: datetime | None = None, time_spent_s: Any = None, edit_mode: bool | None = None,
               prompt_flags: Iterable[str] | None = None) -> SaveResult:
    """Store the draft's text (saving the same text again changes nothing else) and
    renew the lease. A demonstration already submitted is left as it is. Raises
    NotAllowed for someone else's or a set closed to them, Conflict for a skipped
    one, Invalid for a text over the limit. Commits."""
    demo = _own(session, user=user, demonstration_id=demonstration_id)
    if demo.status != DemonstrationStatus.draft:
        if demo.status == DemonstrationStatus.skipped:
            raise Conflict("You skipped this prompt; its draft can no longer change.")
        session.commit()
        return SaveResult(demo, saved=False, holds_lease=False)
    now = _lock_prompt(session, demo, now)
    demo.text = _clean_text(text, required=False)
    if edit_mode is not None:
        demo.edit_mode = bool(edit_mode)
    if prompt_flags is not None:
        demo.prompt_flags = _clean_flags(prompt_flags)
    if time_spent_s is not None:
        demo.time_spent_s = max(demo.time_spent_s or 0.0, clamp_time_spent(time_spent_s))
    demo.updated_at = now
    holds = _renew(session, demo, now=now, lease_s=lease_s)
    session.commit()
    return SaveResult(demo, saved=True, holds_lease=holds)


@dataclass
class SubmitResult:
    demonstration: Demonstration
    already: bool  # True when it had been submitted before (nothing changed)


def submit_demonstration(session: Session, *, user: User, demonstration_id: int, text: str, lease_s: int,
                         now: datetime | None = None, time_spent_s: Any = None, edit_mode: bool | None = None,
                         prompt_flags: Iterable[str] | None = None) -> SubmitResult:
    """Submit the labeler's response for review, checked with its prompt locked and by
    the database's clock (`now` replaces it in tests). Submitting again returns the
    stored one unchanged. Raises NotFound, NotAllowed (not theirs, or its set is not
    active or open to them any more), Conflict (skipped, or the lease ran out and
    the prompt went to other labelers; the draft is kept), Invalid (empty or too
    long text, unknown flag). Commits."""
    demo = _own(session, user=user, demonstration_id=demonstration_id)
    if demo.status in DONE:
        session.commit()
        return SubmitResult(demo, already=True)
    if demo.status == DemonstrationStatus.skipped:
        raise Conflict("You skipped this prompt; it cannot be submitted any more.")
    now = _lock_prompt(session, demo, now)
    clean_text = _clean_text(text, required=True)
    flags = _clean_flags(prompt_flags) if prompt_flags is not None else demo.prompt_flags
    demo.text = clean_text
    if not _renew(session, demo, now=now, lease_s=lease_s):
        session.commit()  # keep the text as a draft
        raise Conflict("Your time on this prompt ran out and other labelers took it. Your text is kept as a"
                       " draft; open Write for the next prompt.")
    demo.status = DemonstrationStatus.submitted
    demo.expires_at = None
    demo.prompt_flags = flags
    if edit_mode is not None:
        demo.edit_mode = bool(edit_mode)
    if time_spent_s is not None:
        demo.time_spent_s = max(demo.time_spent_s or 0.0, clamp_time_spent(time_spent_s))
    demo.updated_at = now
    session.commit()
    return SubmitResult(demo, already=False)


def skip_demonstration(session: Session, *, user: User, demonstration_id: int, reason: str,
                       now: datetime | None = None) -> Demonstration:
    """Give the prompt back, never to be offered to this labeler again. Raises
    NotFound, NotAllowed (not theirs, or a set closed to them), Conflict (already
    submitted), then Invalid (no reason). Commits."""
    demo = _own(session, user=user, demonstration_id=demonstration_id)
    if demo.status in DONE:
        raise Conflict("You already submitted this demonstration; it cannot be skipped any more.")
    reason = clean_skip_reason(reason, what="prompt")
    if demo.status != DemonstrationStatus.skipped:
        demo.status = DemonstrationStatus.skipped
        demo.skip_reason = reason
        demo.expires_at = None
        demo.updated_at = lease_clock(session, now)
    session.commit()
    return demo


def start_from_model_answer(session: Session, *, user: User, demonstration_id: int, lease_s: int,
                            now: datetime | None = None) -> Demonstration:
    """Edit mode: the newest model answer to the prompt becomes the draft's text, and
    the demonstration is recorded as written from it. Raises NotFound when the prompt
    has no model answer, NotAllowed, Conflict (not a draft any more). Commits."""
    demo = _own(session, user=user, demonstration_id=demonstration_id)
    if demo.status != DemonstrationStatus.draft:
        raise Conflict("This demonstration is no longer a draft.")
    answer = model_answer(session, demo.prompt_id)
    if answer is None:
        raise NotFound("There is no model answer for this prompt to start from.")
    now = _lock_prompt(session, demo, now)
    demo.text = answer.text[:MAX_TEXT_CHARS]
    demo.edit_mode = True
    demo.updated_at = now
    _renew(session, demo, now=now, lease_s=lease_s)
    session.commit()
    return demo


def model_answer(session: Session, prompt_id: int) -> Response | None:
    """The newest model response to the prompt, for the editor's 'start from the model's answer'."""
    return session.scalar(
        select(Response).where(Response.prompt_id == prompt_id)
        .order_by(Response.round.desc(), Response.created_at.desc(), Response.sample_index).limit(1)
    )


@dataclass
class WriterCounts:
    submitted: int = 0
    accepted: int = 0
    rejected: int = 0


def writer_counts(session: Session, *, user: User) -> WriterCounts:
    """The labeler's own demonstrations by review outcome."""
    rows = dict(session.execute(
        select(Demonstration.status, func.count()).where(Demonstration.user_id == user.id)
        .group_by(Demonstration.status)
    ).all())
    return WriterCounts(
        submitted=sum(rows.get(s, 0) for s in DONE), accepted=rows.get(DemonstrationStatus.accepted, 0),
        rejected=rows.get(DemonstrationStatus.rejected, 0),
    )


def recent_rejections(session: Session, *, user: User, limit: int = 5) -> list[Demonstration]:
    """The labeler's latest rejected demonstrations, so they can read why."""
    return list(session.scalars(
        select(Demonstration).where(Demonstration.user_id == user.id,
                                    Demonstration.status == DemonstrationStatus.rejected)
        .order_by(Demonstration.reviewed_at.desc(), Demonstration.id.desc()).limit(limit)
    ))


# ---- review -------------------------------------------------------------------------

def list_demonstrations(session: Session, *, status: DemonstrationStatus | str = DemonstrationStatus.submitted,
                        prompt_set_id: int | None = None, limit: int = 50, offset: int = 0) -> list[Demonstration]:
    """Demonstrations in one status (of one set), least recently changed first."""
    query = (
        select(Demonstration)
        .join(Prompt, Prompt.id == Demonstration.prompt_id)
        .where(Demonstration.status == DemonstrationStatus(status))
        .order_by(Demonstration.updated_at, Demonstration.id)
        .limit(limit).offset(offset)
    )
    if prompt_set_id is not None:
        query = query.where(Prompt.prompt_set_id == prompt_set_id)
    return list(session.scalars(query))


def review_queue(session: Session, *, prompt_set_id: int | None = None, limit: int = 50) -> list[Demonstration]:
    """Submitted demonstrations waiting for review, oldest first."""
    return list_demonstrations(session, status=DemonstrationStatus.submitted, prompt_set_id=prompt_set_id,
                               limit=limit)


def count_waiting(session: Session, *, prompt_set_id: int | None = None) -> int:
    query = (
        select(func.count(Demonstration.id)).join(Prompt, Prompt.id == Demonstration.prompt_id)
        .where(Demonstration.status == DemonstrationStatus.submitted)
    )
    if prompt_set_id is not None:
        query = query.where(Prompt.prompt_set_id == prompt_set_id)
    return session.scalar(query) or 0


def _reviewable(session: Session, demonstration_id: int) -> Demonstration:
    demo = session.get(Demonstration, demonstration_id, with_for_update=True, populate_existing=True)
    if demo is None:
        raise NotFound(f"There is no demonstration {demonstration_id}.")
    if demo.status not in DONE:
        raise Conflict(f"Demonstration {demonstration_id} is a {demo.status.value} one, not submitted;"
                       " only submitted demonstrations can be reviewed.")
    return demo


def _reviewed(demo: Demonstration, status: DemonstrationStatus, reviewer: User, now: datetime,
              reason: str | None = None) -> None:
    demo.status = status
    demo.reject_reason = reason
    demo.reviewed_by_id = reviewer.id
    demo.reviewed_at = now


def accept_demonstration(session: Session, *, reviewer: User, demonstration_id: int, now: datetime) -> Demonstration:
    """Accept a submitted (or earlier rejected) demonstration: it becomes training data.
    Raises NotFound, Conflict for a draft or skipped one. Commits."""
    demo = _reviewable(session, demonstration_id)
    _reviewed(demo, DemonstrationStatus.accepted, reviewer, now)
    session.commit()
    return demo


def reject_demonstration(session: Session, *, reviewer: User, demonstration_id: int, reason: str,
                         now: datetime) -> Demonstration:
    """Reject with a reason the labeler can read; the prompt goes back to the pool for
    another labeler. Raises Invalid (no reason), NotFound, Conflict. Commits."""
    reason = check_text((reason or "").strip(), "reason")
    if not reason:
        raise Invalid("Say why the demonstration is rejected.", errors={"reason": "required"})
    if len(reason) > MAX_REASON_CHARS:
        raise Invalid(f"The reason is too long ({len(reason):,} characters; at most {MAX_REASON_CHARS:,}).",
                      errors={"reason": f"at most {MAX_REASON_CHARS:,} characters"})
    demo = _reviewable(session, demonstration_id)
    _reviewed(demo, DemonstrationStatus.rejected, reviewer, now, reason)
    session.commit()
    return demo


def edit_demonstration(session: Session, *, reviewer: User, demonstration_id: int, text: str,
                       now: datetime) -> Demonstration:
    """Replace the text with the reviewer's correction and accept it. Raises Invalid
    (empty or too long), NotFound, Conflict. Commits."""
    clean = _clean_text(text, required=True)
    demo = _reviewable(session, demonstration_id)
    demo.text = clean
    demo.updated_at = now
    _reviewed(demo, DemonstrationStatus.accepted, reviewer, now)
    session.commit()
    return demo


@dataclass
class ReviewFigures:
    user_id: int
    username: str
    submitted: int = 0  # waiting for review
    accepted: int = 0
    rejected: int = 0
    skipped: int = 0
    time_spent_s: float = 0.0  # over submitted, accepted and rejected ones

    @property
    def reviewed(self) -> int:
        return self.accepted + self.rejected

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / reviewed; None before any review."""
        return self.accepted / self.reviewed if self.reviewed else None

    @property
    def mean_time_s(self) -> float | None:
        n = self.submitted + self.reviewed
        return self.time_spent_s / n if n else None


def acceptance_rates(session: Session, *, prompt_set_id: int | None = None) -> list[ReviewFigures]:
    """Per labeler: demonstrations waiting, accepted, rejected, skipped, and the review
    acceptance rate, by username. Only labeler accounts are listed (an import is
    stored as its admin's)."""
    query = (
        select(User.id, User.username, Demonstration.status, func.count(Demonstration.id),
               func.coalesce(func.sum(Demonstration.time_spent_s), 0.0))
        .join(Demonstration, Demonstration.user_id == User.id)
        .join(Prompt, Prompt.id == Demonstration.prompt_id)
        .where(Demonstration.status != DemonstrationStatus.draft, User.role == Role.labeler)
        .group_by(User.id, User.username, Demonstration.status)
    )
    if prompt_set_id is not None:
        query = query.where(Prompt.prompt_set_id == prompt_set_id)
    figures: dict[int, ReviewFigures] = {}
    for user_id, username, status, n, seconds in session.execute(query):
        f = figures.setdefault(user_id, ReviewFigures(user_id=user_id, username=username))
        setattr(f, DemonstrationStatus(status).value, n)
        if status in DONE:
            f.time_spent_s += float(seconds)
    return sorted(figures.values(), key=lambda f: f.username.lower())


@dataclass
class SetProgress:
    prompts: int = 0
    # Prompts with as many submitted or accepted demonstrations as the overlap asks.
    prompts_done: int = 0
    by_status: dict[str, int] = field(default_factory=lambda: {s.value: 0 for s in DemonstrationStatus})


def set_progress(session: Session, prompt_set: PromptSet) -> SetProgress:
    progress = SetProgress()
    progress.prompts = session.scalar(select(func.count()).where(Prompt.prompt_set_id == prompt_set.id)) or 0
    for status, n in session.execute(
        select(Demonstration.status, func.count()).join(Prompt, Prompt.id == Demonstration.prompt_id)
        .where(Prompt.prompt_set_id == prompt_set.id).group_by(Demonstration.status)
    ):
        progress.by_status[DemonstrationStatus(status).value] = n
    per_prompt = (
        select(func.count(Demonstration.id).label("n")).join(Prompt, Prompt.id == Demonstration.prompt_id)
        .where(Prompt.prompt_set_id == prompt_set.id, Demonstration.status.in_(HOLDING))
        .group_by(Demonstration.prompt_id).subquery()
    )
    progress.prompts_done = session.scalar(
        select(func.count()).select_from(per_prompt).where(per_prompt.c.n >= prompt_set.overlap)
    ) or 0
    return progress


def demonstration_sets(session: Session, *, include_archived: bool = False) -> list[PromptSet]:
    """Demonstration prompt sets, newest first."""
    query = select(PromptSet).where(PromptSet.kind == PromptSetKind.demonstration)
    if not include_archived:
        query = query.where(PromptSet.status != PromptSetStatus.archived)
    return list(session.scalars(query.order_by(PromptSet.created_at.desc(), PromptSet.id.desc())))


# ---- training data and export ----------------------------------------------------------

@dataclass(frozen=True)
class AcceptedDemonstration:
    demonstration_id: int
    prompt_id: int
    prompt_set_id: int
    messages: list[dict[str, str]]
    response: str
    split: Split
    user_id: int


def _accepted_query(prompt_set_ids: Sequence[int]):
    return (
        select(Demonstration.id, Demonstration.prompt_id, Prompt.prompt_set_id, Prompt.messages,
               Demonstration.text, Prompt.split, Demonstration.user_id)
        .join(Prompt, Prompt.id == Demonstration.prompt_id)
        .where(Demonstration.status == DemonstrationStatus.accepted, Prompt.prompt_set_id.in_(list(prompt_set_ids)))
        .order_by(Prompt.prompt_set_id, Demonstration.prompt_id, Demonstration.id)
    )


def _iter_accepted(session: Session, prompt_set_ids: Sequence[int]) -> Iterator[AcceptedDemonstration]:
    for d_id, p_id, s_id, messages, text, split, user_id in stream_rows(session, _accepted_query(prompt_set_ids)):
        yield AcceptedDemonstration(d_id, p_id, s_id, list(messages), text, Split(split), user_id)


def accepted_demonstrations(session: Session, *, prompt_set_ids: Sequence[int]) -> list[AcceptedDemonstration]:
    """The training data: accepted demonstrations of the sets, in a stable order. Raises
    NotFound for an unknown set."""
    for set_id in prompt_set_ids:
        get_prompt_set(session, set_id)
    return list(_iter_accepted(session, prompt_set_ids))


def export_row(item: AcceptedDemonstration, fmt: str) -> dict[str, Any]:
    """One line of the SFT export; provenance columns are ignored by TRL."""
    answer = {"role": "assistant", "content": item.response}
    if fmt == "messages":
        row: dict[str, Any] = {"messages": [*item.messages, answer]}
    elif fmt == "prompt_completion":
        row = {"prompt": item.messages, "completion": [answer]}
    else:
        raise Invalid(f"Unknown export format '{fmt}'; choose {' or '.join(EXPORT_FORMATS)}.",
                      errors={"format": f"one of {', '.join(EXPORT_FORMATS)}"})
    return row | {"demonstration_id": item.demonstration_id, "prompt_id": item.prompt_id,
                  "prompt_set_id": item.prompt_set_id, "split": item.split.value, "labeler_id": item.user_id}


def iter_export(session: Session, *, prompt_set_ids: Sequence[int], fmt: str) -> Iterator[str]:
    """JSONL lines of the accepted demonstrations of the sets, streamed from a
    server-side cursor (memory stays flat however many there are). Raises Invalid
    for an unknown format, NotFound for an unknown set, when called: before the
    first line, so a download never starts and then fails."""
    if fmt not in EXPORT_FORMATS:
        raise Invalid(f"Unknown export format '{fmt}'; choose {' or '.join(EXPORT_FORMATS)}.",
                      errors={"format": f"one of {', '.join(EXPORT_FORMATS)}"})
    for set_id in prompt_set_ids:
        get_prompt_set(session, set_id)
    return (json.dumps(export_row(item, fmt), ensure_ascii=False) + "\n"
            for item in _iter_accepted(session, prompt_set_ids))


# ---- import ---------------------------------------------------------------------------

@dataclass
class ParsedDemonstration:
    line: int
    messages: list[dict[str, str]]
    response: str
    external_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class DemonstrationImportResult:
    added: int = 0
    prompts_added: int = 0
    duplicates_in_file: int = 0
    duplicates_existing: int = 0

    def describe(self) -> str:
        text = (f"Imported {self.added} demonstration{'s' if self.added != 1 else ''}"
                f" ({self.prompts_added} new prompt{'s' if self.prompts_added != 1 else ''}).")
        skipped = self.duplicates_in_file + self.duplicates_existing
        if skipped:
            text += (f" Skipped {skipped} duplicate{'s' if skipped != 1 else ''}"
                     f" ({self.duplicates_in_file} in the file, {self.duplicates_existing} already stored).")
        return text


def _answer(problems: _Problems, where: str, name: str, raw: Any) -> str | None:
    """A response given as text or as [{"role": "assistant", "content": ...}]."""
    if isinstance(raw, list):
        if len(raw) != 1 or not isinstance(raw[0], dict) or raw[0].get("role") != "assistant":
            problems.add(f"{where}: {name} must be a string or a list of one assistant message")
            return None
        raw = raw[0].get("content")
        name = f"{name}[0].content"
    if not isinstance(raw, str):
        problems.add(f"{where}: {name} must be a string, not {_json_type(raw)}")
        return None
    if not _check_text(problems, where, name, raw):
        return None
    if len(raw) > MAX_TEXT_CHARS:
        problems.add(f"{where}: {name} is {len(raw):,} characters long; the limit is {MAX_TEXT_CHARS:,}")
        return None
    return raw.replace("\r\n", "\n").replace("\r", "\n")


def _demo_record(problems: _Problems, where: str, line: int, obj: Any,
                 limits: ImportLimits) -> ParsedDemonstration | None:
    if not isinstance(obj, dict):
        problems.add(f"{where}: expected an object like {{\"prompt\": \"...\", \"response\": \"...\"}},"
                     f" not {_json_type(obj)}")
        return None
    answer_keys = [k for k in ("response", "completion") if k in obj]
    if "messages" in obj:
        if "prompt" in obj or answer_keys:
            problems.add(f"{where}: give either 'messages' or 'prompt' with 'response', not both")
            return None
        raw = obj["messages"]
        if not isinstance(raw, list) or not raw:
            problems.add(f"{where}: 'messages' must be a non-empty list ending with the assistant's answer")
            return None
        last = raw[-1]
        if not isinstance(last, dict) or last.get("role") != "assistant":
            got = last.get("role") if isinstance(last, dict) else _json_type(last)
            problems.add(f"{where}: the last message must be the assistant's answer, not {got!r}")
            return None
        if len(raw) < 2:
            problems.add(f"{where}: 'messages' needs a user turn before the assistant's answer")
            return None
        messages = _messages(problems, where, raw[:-1])
        response = _answer(problems, where, f"'messages'[{len(raw) - 1}].content", last.get("content"))
        name = "'messages'"
    else:
        if "prompt" not in obj:
            problems.add(f"{where}: missing 'prompt' and 'response' (or 'messages' ending with the assistant's answer)")
            return None
        if len(answer_keys) != 1:
            problems.add(f"{where}: missing 'response'" if not answer_keys
                         else f"{where}: give 'response' or 'completion', not both")
            return None
        prompt = obj["prompt"]
        if isinstance(prompt, list):
            messages = _messages(problems, where, prompt)
        elif not isinstance(prompt, str):
            problems.add(f"{where}: 'prompt' must be a string or a list of messages, not {_json_type(prompt)}")
            messages = None
        elif _check_text(problems, where, "'prompt'", prompt):
            messages = canonical_messages([{"role": "user", "content": prompt}])
        else:
            messages = None
        response = _answer(problems, where, f"'{answer_keys[0]}'", obj[answer_keys[0]])
        name = "'prompt'"
    ok = messages is not None and response is not None
    ok = ok and _check_length(problems, where, name, messages, limits)
    id_ok, external_id = _external_id(problems, where, obj.get("id"))
    meta = obj.get("metadata", {})
    if not isinstance(meta, dict):
        problems.add(f"{where}: 'metadata' must be an object, not {_json_type(meta)}")
        return None
    known = ("prompt", "messages", "response", "completion", "id", "metadata")
    meta = {k: v for k, v in obj.items() if k not in known} | meta
    if not (ok and id_ok and _metadata(problems, where, meta, limits)):
        return None
    assert messages is not None and response is not None
    return ParsedDemonstration(line=line, messages=messages, response=response, external_id=external_id, meta=meta)


def parse_demonstrations(data: bytes | str, *, limits: ImportLimits = LIMITS) -> list[ParsedDemonstration]:
    """Every demonstration of a JSONL file, in order. Raises Invalid listing the
    problems, each with its line and field."""
    text_ = decode(data, limits=limits)
    problems = _Problems(limits)
    parsed: list[ParsedDemonstration] = []
    count = 0
    # split("\n"), not splitlines(): U+2028 and friends may sit inside a JSON string.
    for number, line in enumerate(text_.split("\n"), start=1):
        if not line.strip():
            continue
        count += 1
        if count > limits.max_prompts:
            raise _fail(f"the file has more than {limits.max_prompts:,} demonstrations; the limit is"
                        f" {limits.max_prompts:,} per import. Split it into smaller files.")
        where = f"line {number}"
        try:
            obj = load_json(line)
        except json.JSONDecodeError as exc:
            hint = " (one JSON object per line: JSONL)" if number == 1 and line.lstrip().startswith("[") else ""
            problems.add(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}){hint}")
            continue
        except JsonProblem as exc:
            problems.add(f"{where}: not accepted: the JSON {exc}")
            continue
        record = _demo_record(problems, where, number, obj, limits)
        if record is not None:
            parsed.append(record)
    problems.raise_if_any()
    if not parsed:
        raise _fail("there are no demonstrations in the file.")
    return parsed


def import_demonstrations(session: Session, *, prompt_set: PromptSet, data: bytes | str, user: User,
                          now: datetime, status: DemonstrationStatus | str = DemonstrationStatus.accepted,
                          limits: ImportLimits = LIMITS) -> DemonstrationImportResult:
    """Add the file's demonstrations to a demonstration set in one transaction: their
    prompts are found in the set or added to it, the demonstrations stored as the
    importer's (accepted, or submitted to go through review). A prompt given twice
    in the file, or already holding a demonstration of the importer, is skipped.
    Raises Invalid (nothing stored) when any line is bad, Conflict for an archived
    or ranking set. Commits."""
    if prompt_set.kind != PromptSetKind.demonstration:
        raise Conflict(f"'{prompt_set.name}' is a ranking set; import demonstrations into a demonstration set.")
    if prompt_set.status == PromptSetStatus.archived:
        raise Conflict(f"The prompt set '{prompt_set.name}' is archived; it takes no new demonstrations.")
    if status not in (DemonstrationStatus.accepted, DemonstrationStatus.submitted):
        raise Invalid("Imported demonstrations are either accepted or submitted for review.",
                      errors={"status": "accepted or submitted"})
    status = DemonstrationStatus(status)
    parsed = parse_demonstrations(data, limits=limits)
    result = DemonstrationImportResult()
    by_hash: dict[str, ParsedDemonstration] = {}
    for p in parsed:
        h = prompt_hash(p.messages)
        if h in by_hash:
            result.duplicates_in_file += 1
            continue
        by_hash[h] = p
    rows = [
        {"prompt_set_id": prompt_set.id, "external_id": p.external_id, "messages": p.messages,
         "text": p.messages[-1]["content"], "text_hash": h, "meta": p.meta,
         "split": split_for(h, train_ratio=prompt_set.train_ratio, validation_ratio=prompt_set.validation_ratio,
                            rl_ratio=prompt_set.rl_ratio)}
        for h, p in by_hash.items()
    ]
    added = session.scalars(
        pg_insert(Prompt).on_conflict_do_nothing(index_elements=["prompt_set_id", "text_hash"]).returning(Prompt.id),
        rows,
    ).all()
    result.prompts_added = len(added)
    prompt_ids = dict(session.execute(
        select(Prompt.text_hash, Prompt.id).where(Prompt.prompt_set_id == prompt_set.id,
                                                  Prompt.text_hash.in_(list(by_hash)))
    ).all())
    reviewed = status == DemonstrationStatus.accepted
    demo_rows = [
        {"prompt_id": prompt_ids[h], "user_id": user.id, "text": p.response, "status": status,
         "time_spent_s": 0.0, "reviewed_by_id": user.id if reviewed else None, "reviewed_at": now if reviewed else None,
         "created_at": now, "updated_at": now}
        for h, p in by_hash.items()
    ]
    stored = session.scalars(
        pg_insert(Demonstration).on_conflict_do_nothing(index_elements=["prompt_id", "user_id"])
        .returning(Demonstration.id),
        demo_rows,
    ).all()
    result.added = len(stored)
    result.duplicates_existing = len(demo_rows) - len(stored)
    session.commit()
    return result

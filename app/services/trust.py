"""Labeler trust: per labeler of a set, how fast, how consistent with the others and
with gold, and how varied their ratings are; rules per set that flag a labeler, and
a quarantine that keeps their new annotations out of the data until an admin looks.

Figures (on the quality page, per labeler, over their annotations that count):
- time: their median seconds per task beside the set's median (of every counted
  annotation), and the share of their submissions faster than `min_seconds`;
- agreement: leave-one-out consensus agreement and gold accuracy, as the
  agreement module computes them (app/services/agreement.LabelerFigures);
- ratings: the share of their Likert ratings that are their most common value
  (someone who rates everything 4 has 100%) and the entropy of the ratings in bits
  (log2 7 = 2.81 when all seven values are equally common, 0 for one value).

Rules (`TrustRules`, stored per set in prompt_sets.trust_rules; the defaults apply
to every rule a set does not set) judge a labeler once they have `min_tasks`
annotations on the set. Each rule that fires is a `Reason` naming the rule, the
figure and the limit. Flags are computed live and never stored.

Quarantine reuses exclusion (annotations.excluded, app/services/labelers): a
quarantined labeler's annotations submitted from then on are stored excluded and
marked `quarantined`, so training, exports and agreement leave them out like any
excluded annotation, and nothing is deleted. The rules quarantine a flagged
labeler automatically when the set's `auto_quarantine` is on (checked every
CHECK_EVERY submissions of the labeler on the set, right after the submit);
an admin can quarantine by hand too. Lifting a quarantine includes the
quarantined annotations again and stops the rules from quarantining that labeler
on that set again (the admin has looked); the reasons stay visible.
"""

import math
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import Annotation, LabelerTrust, PromptSet, Task, User
from app.services.agreement import HUMAN_AUTHOR, LabelerFigures, labeler_figures
from app.services.errors import Invalid, NotFound
from app.services.prompt_sets import get_prompt_set

# A rule on agreement needs this many compared pairs, one on gold this many gold
# tasks, one on ratings this many ratings: fewer say more about chance than about the labeler.
MIN_CONSENSUS_PAIRS = 20
MIN_GOLD_TASKS = 3
MIN_RATINGS = 20
# A labeler is checked against the set's rules after every this many submissions on it:
# the check reads the set's per-labeler figures (as the quality page's labeler table does),
# too costly for every submit of a large set.
CHECK_EVERY = 5


def _rule(default: Any, help: str, lo: float, hi: float) -> Any:
    return field(default=default, metadata={"help": help, "min": lo, "max": hi})


@dataclass(frozen=True)
class TrustRules:
    """A set's trust rules; the defaults are what a set gets until an admin changes them."""

    min_tasks: int = _rule(10, "Judge a labeler only once they have this many annotations on the set.", 1, 10_000)
    min_seconds: float = _rule(5.0, "A submission faster than this many seconds counts as fast.", 0, 3600)
    max_fast_share: float = _rule(
        0.5, "Flag when more than this share of the labeler's submissions are fast (1 = off).", 0, 1)
    min_time_ratio: float = _rule(
        0.25, "Flag when the labeler's median time is under this share of the set's median (0 = off).", 0, 1)
    min_consensus_agreement: float = _rule(
        0.55, f"Flag when agreement with the other labelers is under this share, over at least"
              f" {MIN_CONSENSUS_PAIRS} pairs (0 = off).", 0, 1)
    min_gold_accuracy: float = _rule(
        0.6, f"Flag when gold accuracy is under this share, over at least {MIN_GOLD_TASKS} gold tasks (0 = off).",
        0, 1)
    max_top_rating_share: float = _rule(
        0.9, f"Flag when more than this share of the labeler's ratings are one value, over at least"
             f" {MIN_RATINGS} ratings (1 = off).", 0, 1)
    auto_quarantine: bool = field(default=False, metadata={
        "help": "Quarantine a flagged labeler automatically: their new annotations stay out of training, "
                "exports and agreement until an admin lifts the quarantine."})


RULE_FIELDS = [f for f in fields(TrustRules)]
DEFAULT_RULES = TrustRules()


def rules_of(prompt_set: PromptSet) -> TrustRules:
    """The set's rules: its stored values over the defaults (unknown stored keys are ignored)."""
    stored = prompt_set.trust_rules or {}
    return TrustRules(**{f.name: stored[f.name] for f in RULE_FIELDS if f.name in stored})


def parse_rules(values: dict[str, Any]) -> TrustRules:
    """Rules from form or JSON values (a missing rule keeps its default; a checkbox
    that is absent is off). Raises Invalid naming each wrong field."""
    errors: dict[str, str] = {}
    clean: dict[str, Any] = {}
    for f in RULE_FIELDS:
        raw = values.get(f.name)
        if f.type in (bool, "bool"):
            clean[f.name] = str(raw).strip().lower() in ("1", "true", "on", "yes")
            continue
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            continue
        lo, hi = f.metadata["min"], f.metadata["max"]
        try:
            number = float(raw.strip() if isinstance(raw, str) else raw)
            if isinstance(raw, bool):
                raise ValueError
        except (TypeError, ValueError):
            errors[f.name] = f"'{str(raw)[:20]}' is not a number; give {lo:g}..{hi:g}"
            continue
        if f.type in (int, "int"):
            if not math.isfinite(number) or not number.is_integer():
                errors[f.name] = f"must be a whole number {lo:g}..{hi:g}"
                continue
            number = int(number)
        if not math.isfinite(number) or not lo <= number <= hi:
            errors[f.name] = f"must be between {lo:g} and {hi:g}"
            continue
        clean[f.name] = number
    if errors:
        detail = "; ".join(f"{k}: {v}" for k, v in errors.items())
        raise Invalid(f"The trust rules are not valid ({detail}).", errors=errors)
    return TrustRules(**clean)


def save_rules(session: Session, *, prompt_set_id: int, values: dict[str, Any]) -> TrustRules:
    """Store the set's rules (every rule, so later changes of the defaults do not move
    a set an admin has tuned). Raises NotFound, Invalid."""
    prompt_set = get_prompt_set(session, prompt_set_id)
    rules = parse_rules(values)
    prompt_set.trust_rules = asdict(rules)
    session.commit()
    return rules


# ---- figures and flags ----------------------------------------------------------------

@dataclass
class Reason:
    """One rule that fired: which, and the figures that made it fire."""

    rule: str
    text: str
    value: float
    limit: float


@dataclass
class TrustRow:
    """One labeler of a set: their trust figures, the rules that flag them, their quarantine."""

    user_id: int
    username: str
    annotations: int  # counted ones (not excluded)
    median_time_s: float | None
    fast_share: float | None
    time_ratio: float | None  # median time / the set's median
    consensus_agreement: float | None
    consensus_pairs: int
    gold_accuracy: float | None
    gold_tasks: int
    rating_histogram: list[int]
    quarantined_annotations: int = 0
    quarantined: bool = False
    quarantined_at: datetime | None = None
    quarantined_by: str | None = None  # None: by the rules
    quarantine_reasons: list[dict[str, Any]] = field(default_factory=list)
    released_at: datetime | None = None
    released_by: str | None = None
    reasons: list[Reason] = field(default_factory=list)

    @property
    def flagged(self) -> bool:
        return bool(self.reasons)

    @property
    def ratings(self) -> int:
        return sum(self.rating_histogram)

    @property
    def top_rating(self) -> int | None:
        """The labeler's most common rating (1..7)."""
        return 1 + self.rating_histogram.index(max(self.rating_histogram)) if self.ratings else None

    @property
    def top_rating_share(self) -> float | None:
        return max(self.rating_histogram) / self.ratings if self.ratings else None

    @property
    def rating_entropy_bits(self) -> float | None:
        n = self.ratings
        if not n:
            return None
        return -sum((c / n) * math.log2(c / n) for c in self.rating_histogram if c) + 0.0


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def evaluate(rules: TrustRules, row: TrustRow) -> list[Reason]:
    """The rules that flag this labeler, each with its figures."""
    if row.annotations < rules.min_tasks:
        return []
    reasons = []
    if row.fast_share is not None and rules.max_fast_share < 1 and row.fast_share > rules.max_fast_share:
        reasons.append(Reason("max_fast_share", f"{_pct(row.fast_share)} of {row.annotations} submissions took"
                              f" under {rules.min_seconds:g} s (rule: at most {_pct(rules.max_fast_share)})",
                              row.fast_share, rules.max_fast_share))
    if row.time_ratio is not None and rules.min_time_ratio > 0 and row.time_ratio < rules.min_time_ratio:
        reasons.append(Reason("min_time_ratio", f"median time {row.median_time_s:.1f} s is {_pct(row.time_ratio)}"
                              f" of the set's median (rule: at least {_pct(rules.min_time_ratio)})",
                              row.time_ratio, rules.min_time_ratio))
    if (row.consensus_agreement is not None and row.consensus_pairs >= MIN_CONSENSUS_PAIRS
            and row.consensus_agreement < rules.min_consensus_agreement):
        reasons.append(Reason("min_consensus_agreement", f"agrees with the other labelers on"
                              f" {_pct(row.consensus_agreement)} of {row.consensus_pairs} pairs"
                              f" (rule: at least {_pct(rules.min_consensus_agreement)})",
                              row.consensus_agreement, rules.min_consensus_agreement))
    if (row.gold_accuracy is not None and row.gold_tasks >= MIN_GOLD_TASKS
            and row.gold_accuracy < rules.min_gold_accuracy):
        reasons.append(Reason("min_gold_accuracy", f"gold accuracy {_pct(row.gold_accuracy)} on {row.gold_tasks}"
                              f" gold tasks (rule: at least {_pct(rules.min_gold_accuracy)})",
                              row.gold_accuracy, rules.min_gold_accuracy))
    share = row.top_rating_share
    if (share is not None and row.ratings >= MIN_RATINGS and rules.max_top_rating_share < 1
            and share > rules.max_top_rating_share):
        reasons.append(Reason("max_top_rating_share", f"{_pct(share)} of {row.ratings} ratings are"
                              f" {row.top_rating} (rule: at most {_pct(rules.max_top_rating_share)})",
                              share, rules.max_top_rating_share))
    return reasons


# The humans' annotations only: AI labelers and imported sources take no time and are not judged.
_TIMES = text(f"""
    SELECT a.user_id,
           count(*) FILTER (WHERE NOT a.excluded) AS counted,
           count(*) FILTER (WHERE NOT a.excluded AND a.time_spent_s < :min_s) AS fast,
           count(*) FILTER (WHERE a.quarantined) AS quarantined
    FROM annotations a JOIN tasks t ON t.id = a.task_id
    WHERE t.prompt_set_id = :set_id AND (CAST(:user_id AS integer) IS NULL OR a.user_id = CAST(:user_id AS integer))
      AND {HUMAN_AUTHOR}
    GROUP BY a.user_id
""")
_SET_MEDIAN = text(f"""
    SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY a.time_spent_s)
    FROM annotations a JOIN tasks t ON t.id = a.task_id
    WHERE t.prompt_set_id = :set_id AND NOT a.excluded AND {HUMAN_AUTHOR}
""")


def trust_rows(session: Session, *, prompt_set_id: int, user_id: int | None = None,
               rules: TrustRules | None = None,
               figures: list[LabelerFigures] | None = None) -> list[TrustRow]:
    """Every labeler of the set with annotations or a trust record (one, when user_id is
    given), flagged ones first, with their figures and the reasons they are flagged."""
    prompt_set = get_prompt_set(session, prompt_set_id)
    rules = rules or rules_of(prompt_set)
    if figures is None:
        figures = labeler_figures(session, prompt_set_id=prompt_set_id)
    by_user = {f.user_id: f for f in figures}
    params = {"set_id": prompt_set_id, "user_id": user_id, "min_s": rules.min_seconds}
    times = {row.user_id: row for row in session.execute(_TIMES, params)}
    set_median = session.scalar(_SET_MEDIAN, params)
    records = {r.user_id: r for r in session.scalars(
        select(LabelerTrust).where(LabelerTrust.prompt_set_id == prompt_set_id,
                                   *([LabelerTrust.user_id == user_id] if user_id is not None else []))
    )}
    user_ids = set(times) | {uid for uid, r in records.items() if r.quarantined or r.released_at}
    names = dict(session.execute(select(User.id, User.username).where(
        User.id.in_(user_ids | {r.quarantined_by_id for r in records.values() if r.quarantined_by_id}
                    | {r.released_by_id for r in records.values() if r.released_by_id}))).all())
    rows = []
    for uid in user_ids:
        f = by_user.get(uid)
        t = times.get(uid)
        record = records.get(uid)
        median = f.median_time_s if f else None
        row = TrustRow(
            user_id=uid, username=names.get(uid, f"#{uid}"),
            annotations=t.counted if t else 0,
            median_time_s=median,
            fast_share=t.fast / t.counted if t and t.counted else None,
            time_ratio=median / set_median if median is not None and set_median else None,
            consensus_agreement=f.consensus_agreement if f else None,
            consensus_pairs=f.consensus_pairs if f else 0,
            gold_accuracy=f.gold_accuracy if f else None, gold_tasks=f.gold_tasks if f else 0,
            rating_histogram=list(f.rating_histogram) if f else [0] * 7,
            quarantined_annotations=t.quarantined if t else 0,
        )
        if record is not None:
            row.quarantined = record.quarantined
            row.quarantined_at = record.quarantined_at
            row.quarantined_by = names.get(record.quarantined_by_id) if record.quarantined_by_id else None
            row.quarantine_reasons = list(record.quarantine_reasons or [])
            row.released_at = record.released_at
            row.released_by = names.get(record.released_by_id) if record.released_by_id else None
        row.reasons = evaluate(rules, row)
        rows.append(row)
    rows.sort(key=lambda r: (not r.quarantined, not r.flagged, r.username))
    return rows


@dataclass
class SetTrust:
    rules: TrustRules
    set_median_time_s: float | None
    rows: list[TrustRow]


def set_trust(session: Session, *, prompt_set_id: int, figures: list[LabelerFigures] | None = None) -> SetTrust:
    """The set's rules, its median time and every labeler's trust row (for the quality page)."""
    prompt_set = get_prompt_set(session, prompt_set_id)
    rules = rules_of(prompt_set)
    rows = trust_rows(session, prompt_set_id=prompt_set_id, rules=rules, figures=figures)
    median = session.scalar(_SET_MEDIAN, {"set_id": prompt_set_id})
    return SetTrust(rules=rules, set_median_time_s=float(median) if median is not None else None, rows=rows)


# ---- checking and quarantine ----------------------------------------------------------

def check_due(submitted: int | None) -> bool:
    """Whether the submit that brought the labeler's count on a set to `submitted` runs a check."""
    return bool(submitted) and submitted % CHECK_EVERY == 0


def check_labeler(session: Session, *, prompt_set_id: int, user_id: int) -> TrustRow | None:
    """Judge one labeler by the set's rules now; quarantine them when the rules flag them,
    the set quarantines automatically, and no admin has lifted a quarantine of theirs
    on this set. Returns their row (None when they have no annotations on the set)."""
    rows = trust_rows(session, prompt_set_id=prompt_set_id, user_id=user_id)
    row = rows[0] if rows else None
    prompt_set = session.get(PromptSet, prompt_set_id)
    if (row is not None and row.flagged and not row.quarantined and row.released_at is None
            and rules_of(prompt_set).auto_quarantine):
        row.quarantined = _quarantine(session, prompt_set_id=prompt_set_id, user_id=user_id, by_id=None,
                                      reasons=[asdict(r) for r in row.reasons])
    session.commit()
    return row


def _quarantine(session: Session, *, prompt_set_id: int, user_id: int, by_id: int | None,
                reasons: list[dict[str, Any]]) -> bool:
    """Quarantine (by an admin, or by the rules when by_id is None); True when it took.
    The rules' quarantine is decided in the statement itself: it never overrides an
    admin who lifted a quarantine (or quarantined by hand) since the figures were read."""
    now = utcnow()
    values = {"quarantined": True, "quarantined_at": now, "quarantined_by_id": by_id,
              "quarantine_reasons": reasons, "released_at": None, "released_by_id": None}
    only_if = None if by_id is not None else (
        LabelerTrust.released_at.is_(None) & LabelerTrust.quarantined.is_(False))
    taken = session.execute(
        insert(LabelerTrust).values(prompt_set_id=prompt_set_id, user_id=user_id, submitted=0, **values)
        .on_conflict_do_update(index_elements=["prompt_set_id", "user_id"], set_=values, where=only_if)
        .returning(LabelerTrust.user_id)
    ).first()
    return taken is not None


def _labeler_of(session: Session, prompt_set_id: int, user_id: int) -> User:
    get_prompt_set(session, prompt_set_id)
    user = session.get(User, user_id)
    if user is None:
        raise NotFound(f"No user with id {user_id}.")
    return user


def quarantine(session: Session, *, prompt_set_id: int, user_id: int, by: User) -> None:
    """An admin quarantines a labeler on the set: from now on their new annotations there are
    stored excluded (those already stored stay as they are). Raises NotFound."""
    _labeler_of(session, prompt_set_id, user_id)
    rows = trust_rows(session, prompt_set_id=prompt_set_id, user_id=user_id)
    reasons = [asdict(r) for r in rows[0].reasons] if rows else []
    _quarantine(session, prompt_set_id=prompt_set_id, user_id=user_id, by_id=by.id, reasons=reasons)
    session.commit()


def release(session: Session, *, prompt_set_id: int, user_id: int, by: User) -> int:
    """Lift a labeler's quarantine on the set: their quarantined annotations count again
    (exactly those; annotations excluded by hand stay excluded), and the rules leave
    them unquarantined on this set from now on. Returns how many annotations came back.
    Raises NotFound."""
    _labeler_of(session, prompt_set_id, user_id)
    session.execute(
        update(LabelerTrust)
        .where(LabelerTrust.prompt_set_id == prompt_set_id, LabelerTrust.user_id == user_id)
        .values(quarantined=False, released_at=utcnow(), released_by_id=by.id)
    )
    restored = session.execute(
        update(Annotation)
        .where(Annotation.user_id == user_id, Annotation.quarantined,
               Annotation.task_id.in_(select(Task.id).where(Task.prompt_set_id == prompt_set_id)))
        .values(excluded=False, quarantined=False)
    ).rowcount
    session.commit()
    return restored

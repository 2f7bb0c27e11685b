"""The leaderboard across every model ever evaluated, and the evaluation evidence a model
page and the "Make generator" button show.

Every counted vote of every evaluation set (evaluation.vote_rows_query: no excluded
labeler, no gold task) enters one Bradley-Terry fit (app/services/ratings.py), anchored
so the default SFT model is 1000. A vote's lengths are its two responses' characters
(tokenizer-free, so models with different tokenizers compare). The votes are read on
each request; the fit (with its bootstrap, about a second at 100k votes: bench/ratings.py)
is kept per process for the last few distinct sets of votes, so views recompute it only
after a vote changes.
"""

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.enums import ModelKind, PromptSetKind, VoteOutcome
from app.db.models import Model, PromptSet
from app.services import evaluation, models
from app.services.ratings import Leaderboard, Rating, Votes, WinRate, fit_leaderboard, head_to_head

# A vote's score for side A; ties and "both bad" count half (ratings.py's convention).
OUTCOME_SCORE = {VoteOutcome.a: 1.0, VoteOutcome.b: 0.0, VoteOutcome.tie: 0.5, VoteOutcome.both_bad: 0.5}


@dataclass(frozen=True)
class Entry:
    """One model on the leaderboard."""

    model: Model
    rating: Rating
    mean_chars: float  # mean length of its responses over the votes it took part in


@dataclass(frozen=True)
class ModelBoard:
    board: Leaderboard
    entries: list[Entry]  # best raw rating first
    anchor: Model | None
    votes: Votes  # every counted vote, keyed by model id

    def entry(self, model_id: int) -> Entry | None:
        return next((e for e in self.entries if e.model.id == model_id), None)


def load_votes(session: Session) -> Votes:
    """Every counted vote of every evaluation set, keyed by model id, with both lengths in characters."""
    set_ids = list(session.scalars(select(PromptSet.id).where(PromptSet.kind == PromptSetKind.evaluation)))
    rows = evaluation.vote_rows_query(set_ids).subquery() if set_ids else None
    found = [] if rows is None else session.execute(
        select(rows.c.model_a_id, rows.c.model_b_id, rows.c.outcome, rows.c.chars_a, rows.c.chars_b)
        .where(rows.c.model_a_id.is_not(None), rows.c.model_b_id.is_not(None),
               rows.c.model_a_id != rows.c.model_b_id)
    ).all()
    if not found:
        return Votes.from_keys(np.zeros(0, dtype=int), np.zeros(0, dtype=int), [], [], [])
    a, b, outcome, chars_a, chars_b = zip(*found)
    return Votes.from_keys(a, b, [OUTCOME_SCORE[VoteOutcome(o)] for o in outcome], chars_a, chars_b)


FITS_KEPT = 8
_fits: "OrderedDict[bytes, Leaderboard]" = OrderedDict()
_fits_lock = threading.Lock()


def _fit(votes: Votes, anchor: int | None, seed: int, options: dict[str, int]) -> Leaderboard:
    """fit_leaderboard, or the board already fitted to exactly these votes and settings."""
    digest = hashlib.blake2b(repr((votes.models, anchor, seed, sorted(options.items()))).encode(), digest_size=16)
    for array in (votes.a, votes.b, votes.score, votes.length_a, votes.length_b):
        digest.update(b"none" if array is None else f"{array.dtype}{array.shape}".encode())
        if array is not None:
            digest.update(np.ascontiguousarray(array).tobytes())
    key = digest.digest()
    with _fits_lock:
        if key in _fits:
            _fits.move_to_end(key)
            return _fits[key]
    board = fit_leaderboard(votes, anchor=anchor, seed=seed, **options)
    with _fits_lock:
        _fits[key] = board
        while len(_fits) > FITS_KEPT:
            _fits.popitem(last=False)
    return board


def model_board(session: Session, *, n_bootstrap: int | None = None, seed: int = 0) -> ModelBoard:
    """The leaderboard of every model with counted votes, the default SFT model at 1000."""
    votes = load_votes(session)
    anchor = models.default_model(session, ModelKind.sft)
    options = {} if n_bootstrap is None else {"n_bootstrap": n_bootstrap}
    board = _fit(votes, anchor.id if anchor else None, seed, options)
    index = np.concatenate([votes.a, votes.b])
    lengths = np.concatenate([votes.length_a, votes.length_b]) if len(votes) else np.zeros(0)
    mean_chars = np.bincount(index, lengths, len(votes.models)) / np.maximum(np.bincount(index, minlength=len(
        votes.models)), 1)
    by_id = {m.id: m for m in session.scalars(select(Model).where(Model.id.in_(list(votes.models))))}
    entries = [Entry(by_id[r.model], r, float(mean_chars[votes.models.index(r.model)]))
               for r in board.ratings if r.model in by_id]
    return ModelBoard(board, entries, anchor if anchor is not None and board.anchor == anchor.id else None, votes)


def win_rate_against(board: ModelBoard, model_id: int, other_id: int) -> WinRate | None:
    """The model's record against the other over every counted vote; None when they never met."""
    if model_id not in board.votes.models or other_id not in board.votes.models:
        return None
    rate = head_to_head(board.votes, model_id, other_id)
    return rate if rate.votes else None


@dataclass(frozen=True)
class Evidence:
    """What human evaluation says of a model: its leaderboard entry and its record against its parent."""

    entry: Entry | None
    parent: Model | None
    against_parent: WinRate | None
    anchor: Model | None


def evidence(session: Session, model: Model, board: ModelBoard | None = None) -> Evidence:
    """The model's rating and its win rate against its parent (None where not evaluated)."""
    board = board or model_board(session)
    parent = model.parent
    return Evidence(board.entry(model.id), parent,
                    win_rate_against(board, model.id, parent.id) if parent is not None else None, board.anchor)


def sort_by_rating(found: Sequence[Model], board: ModelBoard) -> list[Model]:
    """The models best rated first; those without a rating after them, in their order."""
    rating = {e.model.id: e.rating.rating for e in board.entries}
    return sorted(found, key=lambda m: (m.id not in rating, -rating.get(m.id, 0.0)))

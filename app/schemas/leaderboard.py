"""JSON shapes of the leaderboard and of a model's evaluation evidence."""

from pydantic import BaseModel, Field

from app.db.enums import ModelKind
from app.services.leaderboard import Entry, Evidence, ModelBoard
from app.services.ratings import WinRate


class RatingOut(BaseModel):
    model_id: int
    model: str
    kind: ModelKind
    votes: int = Field(description="Counted votes the model took part in.")
    rating: float = Field(description="Bradley-Terry rating on the Elo scale; the anchor is 1000.")
    rating_low: float = Field(description="Bootstrap 95% interval of the rating.")
    rating_high: float
    lc_rating: float | None = Field(description="Length-controlled rating: the response-length difference regressed "
                                                "out (as AlpacaEval 2).")
    lc_rating_low: float | None
    lc_rating_high: float | None
    connected: bool = Field(description="Compared with the anchor through some chain of votes; if not, its rating "
                                        "cannot be read against the others.")
    mean_chars: float = Field(description="Mean length of its responses (characters) over the votes it took part in.")


class LeaderboardOut(BaseModel):
    anchor_model_id: int | None = Field(description="The model rated 1000 (the default SFT model); null: the mean "
                                                    "rating is 1000.")
    votes: int
    bootstrap_resamples: int
    length_effect: float | None = Field(description="Probability that a response one typical length difference longer"
                                                    " wins between otherwise equal models (0.5: no length bias).")
    ratings: list[RatingOut] = Field(description="Best raw rating first.")


class WinRateOut(BaseModel):
    votes: int
    wins: int
    losses: int
    ties: int = Field(description="Ties and both-bad votes.")
    win_rate: float | None = Field(description="Ties counting half.")
    interval_low: float = Field(description="95% Wilson interval.")
    interval_high: float


class EvaluationEvidenceOut(BaseModel):
    rating: RatingOut | None = Field(description="The model on the leaderboard; null when never evaluated.")
    parent_id: int | None
    against_parent: WinRateOut | None = Field(description="Its record against its parent over every counted vote; "
                                                          "null when they never met.")


def rating_out(entry: Entry) -> RatingOut:
    r = entry.rating
    return RatingOut(model_id=entry.model.id, model=entry.model.name, kind=entry.model.kind, votes=r.votes,
                     rating=r.rating, rating_low=r.low, rating_high=r.high, lc_rating=r.lc_rating,
                     lc_rating_low=r.lc_low, lc_rating_high=r.lc_high, connected=r.connected,
                     mean_chars=entry.mean_chars)


def leaderboard_out(board: ModelBoard) -> LeaderboardOut:
    return LeaderboardOut(anchor_model_id=board.anchor.id if board.anchor else None, votes=board.board.votes,
                          bootstrap_resamples=board.board.n_bootstrap, length_effect=board.board.length_effect,
                          ratings=[rating_out(e) for e in board.entries])


def win_rate_out(rate: WinRate) -> WinRateOut:
    return WinRateOut(votes=rate.votes, wins=rate.wins, losses=rate.losses, ties=rate.ties, win_rate=rate.rate,
                      interval_low=rate.low, interval_high=rate.high)


def evidence_out(found: Evidence) -> EvaluationEvidenceOut:
    return EvaluationEvidenceOut(
        rating=rating_out(found.entry) if found.entry else None,
        parent_id=found.parent.id if found.parent else None,
        against_parent=win_rate_out(found.against_parent) if found.against_parent else None)

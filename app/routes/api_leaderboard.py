"""JSON API of the leaderboard (engineers and admins)."""

from fastapi import APIRouter

from app.routes.deps import EngineerUser, SessionDep
from app.schemas.leaderboard import LeaderboardOut, leaderboard_out
from app.services import leaderboard

router = APIRouter(prefix="/leaderboard", tags=["evaluations"])


@router.get("", response_model=LeaderboardOut)
def get_leaderboard(session: SessionDep, user: EngineerUser):
    """Bradley-Terry ratings of every model with counted votes, over every evaluation set:
    raw and length-controlled, each with a bootstrap 95% interval, the default SFT model
    at 1000."""
    return leaderboard_out(leaderboard.model_board(session))

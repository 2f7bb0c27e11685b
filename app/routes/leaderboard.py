"""Engineer page: the leaderboard of every model ever evaluated by blind human votes."""

from fastapi import APIRouter, Request

from app.routes.deps import EngineerUser, SessionDep
from app.services import leaderboard
from app.web import render

router = APIRouter(prefix="/leaderboard", include_in_schema=False)


@router.get("")
def leaderboard_page(request: Request, session: SessionDep, user: EngineerUser):
    return render(request, "pages/leaderboard.html", {"board": leaderboard.model_board(session)})

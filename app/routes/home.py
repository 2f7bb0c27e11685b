"""The home page of each role."""

from fastapi import APIRouter, Request

from app.routes.deps import CurrentUser
from app.web import render

router = APIRouter(include_in_schema=False)


@router.get("/")
def home(request: Request, user: CurrentUser):
    return render(request, f"pages/home_{user.role.value}.html")

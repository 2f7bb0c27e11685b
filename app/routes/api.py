"""The JSON API under /api/v1 (OpenAPI at /api/v1/openapi.json; bearer tokens or the
session). Each area's router holds paths relative to /api/v1; they are included here,
in this order, and the app includes this one router."""

from fastapi import APIRouter

from app.routes import (
    api_demonstrations,
    api_docs,
    api_evaluations,
    api_leaderboard,
    api_jobs,
    api_label,
    api_models,
    api_prompt_sets,
    api_quality,
    api_review,
    api_training,
    api_users,
)

PREFIX = "/api/v1"

router = APIRouter(prefix=PREFIX)
for area in (api_users, api_prompt_sets, api_label, api_quality, api_review, api_jobs, api_training, api_models,
             api_demonstrations, api_evaluations, api_leaderboard, api_docs):
    router.include_router(area.router)

"""JSON API of the model registry: models with their lineage, samples side by side,
and promoting a model to generate a prompt set's next round."""

from typing import Literal

from fastapi import APIRouter

from app.db.enums import ModelKind
from app.routes.deps import EngineerUser, SessionDep
from app.schemas.common import Id
from app.schemas.jobs import job_out
from app.schemas.models import (ModelDetailOut, ModelOut, PromoteIn, PromoteOut, SamplePairOut, model_detail_out,
                                sample_pair_out)
from app.services import leaderboard, models

router = APIRouter(prefix="/models", tags=["models"])


@router.get("", response_model=list[ModelOut])
def list_models(session: SessionDep, user: EngineerUser, kind: ModelKind | None = None,
                sort: Literal["default", "rating"] = "default"):
    """Defaults first, then newest; or (sort=rating) best leaderboard rating first, unrated models last."""
    found = models.models_of(session, [kind] if kind else ModelKind)
    if sort == "rating":
        found = leaderboard.sort_by_rating(found, leaderboard.model_board(session, n_bootstrap=0))
    return found


@router.get("/{model_id}", response_model=ModelDetailOut)
def get_model(model_id: Id, session: SessionDep, user: EngineerUser):
    model = models.get_model(session, model_id)
    return model_detail_out(model, lineage=models.lineage(session, model),
                            related=models.related_models(session, model),
                            children=models.children(session, model),
                            generator_of=models.generator_of(session, model),
                            evidence=leaderboard.evidence(session, model))


@router.get("/{model_id}/samples", response_model=list[SamplePairOut])
def get_samples(model_id: Id, session: SessionDep, user: EngineerUser):
    """The validation prompts answered by the model's starting point (before) and by it (after)."""
    models.get_model(session, model_id)
    return [sample_pair_out(pair) for pair in models.side_by_side(session, model_id)]


@router.post("/{model_id}/promote", response_model=PromoteOut)
def promote(model_id: Id, body: PromoteIn, session: SessionDep, user: EngineerUser):
    """Make the model the generator of a ranking set and open its next round (queued
    now when the set is active), optionally as the best K of N samples by a reward model."""
    models.get_model(session, model_id)
    prompt_set, job = models.promote_generator(session, model_id=model_id, prompt_set_id=body.prompt_set_id,
                                               user_id=user.id, best_of_n=body.best_of_n,
                                               best_of_n_reward_model_id=body.best_of_n_reward_model_id)
    return PromoteOut(prompt_set_id=prompt_set.id, round=prompt_set.round,
                      generator_model_id=prompt_set.generator_model_id, best_of_n=prompt_set.best_of_n,
                      best_of_n_reward_model_id=prompt_set.best_of_n_reward_model_id, job=job_out(job) if job else None)

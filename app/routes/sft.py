"""Engineer page: start a supervised fine-tuning run (`train_sft` job) on accepted
demonstrations and see the SFT runs and models made so far."""

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from starlette.datastructures import FormData

from app.db.enums import JobKind
from app.routes.deps import EngineerUser, SessionDep
from app.services import demonstrations as demos
from app.services import jobs, sft
from app.services.errors import Invalid
from app.services.run_settings import form_values, submitted_settings
from app.web import flash, redirect, render

router = APIRouter(prefix="/sft", include_in_schema=False)



def _context(session, *, form: dict[str, Any] | None = None, errors: dict | None = None,
             error: str | None = None) -> dict[str, Any]:
    sets = demos.demonstration_sets(session, include_archived=True)
    models = sft.base_models(session)
    default_form = form_values(sft.SETTINGS) | {
        "base_model_id": str(models[0].id) if models else "", "prompt_set_ids": [], "name": "",
    }
    return {
        "form": default_form | (form or {}), "form_errors": errors or {}, "form_error": error,
        "models": models, "sets": sets, "accepted": sft.accepted_counts(session, [s.id for s in sets]),
        "settings": sft.SETTINGS, "runs": jobs.list_jobs(session, kind=JobKind.train_sft, limit=20),
        "sft_models": sft.sft_models(session),
    }


@router.get("")
def sft_page(request: Request, session: SessionDep, user: EngineerUser):
    return render(request, "pages/sft.html", _context(session))


async def read_form(request: Request) -> FormData:
    return await request.form()


@router.post("")
def start(request: Request, session: SessionDep, user: EngineerUser, data: Annotated[FormData, Depends(read_form)]):
    values = submitted_settings(data, sft.SETTINGS)
    form = values | {"base_model_id": str(data.get("base_model_id") or ""), "name": str(data.get("name") or ""),
                     "prompt_set_ids": [str(v) for v in data.getlist("prompt_set_ids")]}
    try:
        job = sft.start_sft_job(session, user_id=user.id, base_model_id=form["base_model_id"],
                                prompt_set_ids=form["prompt_set_ids"], values=values, name=form["name"],
                                flags_from_form=True)
    except Invalid as exc:
        context = _context(session, form=form, errors=exc.errors, error=exc.message)
        return render(request, "pages/sft.html", context, block="sft_form", status_code=422)
    flash(request, f"Queued SFT job #{job.id}.", "success")
    return redirect(request, f"/jobs/{job.id}")

"""Admin: a set's quality page (agreement, labelers, progress, allowed labelers,
gold tasks) and its export page with streamed downloads."""

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import Response

from app.db.models import PromptSet
from app.routes.deps import AdminUser, SessionDep
from app.routes.exports import ExportPlan, meta_response, stream
from app.schemas.common import Id
from app.services import ai_labelers, export, gold, labelers, preference_import, review, trust
from app.services.agreement import compute_set_agreement
from app.services.errors import Invalid
from app.services.progress import set_progress
from app.services.prompt_sets import get_prompt_set
from app.web import fragment_or_redirect, render, render_form_errors

router = APIRouter(prefix="/admin/prompt-sets/{prompt_set_id}", include_in_schema=False)

DEFAULT_THRESHOLD = 0.6
# InstructGPT (Ouyang et al. 2022, "Training language models to follow instructions"): training labelers
# agreed with each other 72.6 ± 1.5% of the time.
INSTRUCTGPT_AGREEMENT = 0.726
Threshold = Annotated[float, Query(ge=0, le=1, description="Agreement under which a labeler is highlighted")]
CHANGED = {"HX-Trigger": "quality-changed"}  # the figures and labeler rows reload on it
QUICK_PICKS = 10  # non-gold tasks offered as quick picks in the gold form
ALLOWED = "partials/_quality_allowed.html"
GOLD = "partials/_quality_gold.html"
TRUST = "partials/_quality_trust.html"


def _agreement_rows(session, prompt_set_id: int) -> dict[str, Any]:
    agreement = compute_set_agreement(session, prompt_set_id=prompt_set_id)
    rows = labelers.labeler_rows(session, prompt_set_id=prompt_set_id, agreement=agreement)
    # Worst agreement first, unknown agreement last; the table re-sorts in the browser.
    rows.sort(key=lambda r: (r.agreement is None, r.agreement or 0.0, r.username))
    return {"agreement": agreement, "rows": rows}


def _trust_context(session, prompt_set: PromptSet, figures=None, **extra: Any) -> dict[str, Any]:
    return {
        "prompt_set": prompt_set, "rule_fields": trust.RULE_FIELDS, "defaults": trust.DEFAULT_RULES,
        "trust": trust.set_trust(session, prompt_set_id=prompt_set.id, figures=figures),
    } | extra


def _allowed_context(session, prompt_set: PromptSet, **extra: Any) -> dict[str, Any]:
    return {
        "prompt_set": prompt_set,
        "allowed": labelers.allowed_labelers(session, prompt_set_id=prompt_set.id),
        "choices": labelers.labeler_choices(session, prompt_set_id=prompt_set.id),
    } | extra


def _gold_context(session, prompt_set: PromptSet, **extra: Any) -> dict[str, Any]:
    return {
        "prompt_set": prompt_set,
        "gold_tasks": gold.list_gold_tasks(session, prompt_set_id=prompt_set.id),
        "quick_tasks": gold.candidate_tasks(session, prompt_set_id=prompt_set.id, limit=QUICK_PICKS),
    } | extra


async def _form_fields(request: Request) -> dict[str, str]:
    return {key: value for key, value in (await request.form()).items() if isinstance(value, str)}


def _done(request: Request, prompt_set_id: int, fragment: Callable[[], Response], error: str | None = None):
    """An htmx request gets the fragment; a plain form post goes back to the page (with the error, if any)."""
    return fragment_or_redirect(request, f"/admin/prompt-sets/{prompt_set_id}/quality", fragment,
                                message=error, category="error")


def _page_context(session, prompt_set: PromptSet, threshold: float) -> dict[str, Any]:
    rows = _agreement_rows(session, prompt_set.id)
    return (
        {"prompt_set": prompt_set, "threshold": threshold, "reference": INSTRUCTGPT_AGREEMENT,
         "progress": set_progress(session, prompt_set_id=prompt_set.id),
         "review_counts": review.review_counts(session, prompt_set_id=prompt_set.id),
         "sources": preference_import.list_sources(session, prompt_set.id),
         "prefill": ai_labelers.prefill_study(session, prompt_set_id=prompt_set.id)}
        | rows
        | _trust_context(session, prompt_set, figures=rows["agreement"].labelers)
        | _allowed_context(session, prompt_set)
        | _gold_context(session, prompt_set)
    )


@router.get("/quality")
def quality_page(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: Id,
                 threshold: Threshold = DEFAULT_THRESHOLD):
    prompt_set = get_prompt_set(session, prompt_set_id)
    return render(request, "pages/quality.html", _page_context(session, prompt_set, threshold))


@router.get("/quality/figures")
def figures_fragment(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: Id):
    """The set's figures; the page reloads them after a labeler is excluded or included."""
    prompt_set = get_prompt_set(session, prompt_set_id)
    context = {"prompt_set": prompt_set, "reference": INSTRUCTGPT_AGREEMENT,
               "agreement": compute_set_agreement(session, prompt_set_id=prompt_set_id)}
    return render(request, "partials/_quality_figures.html", context)


@router.get("/quality/labelers")
def labeler_rows_fragment(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: Id,
                          threshold: Threshold = DEFAULT_THRESHOLD):
    """The labeler table's rows; the page reloads them after an exclusion changes everyone's agreement."""
    get_prompt_set(session, prompt_set_id)
    context = {"prompt_set_id": prompt_set_id, "threshold": threshold} | _agreement_rows(session, prompt_set_id)
    return render(request, "partials/_quality_labeler_rows.html", context)


def _set_excluded(request: Request, session, prompt_set_id: int, user_id: int, *, excluded: bool,
                  everywhere: bool, threshold: float):
    get_prompt_set(session, prompt_set_id)
    labelers.set_excluded(session, user_id=user_id, excluded=excluded,
                          prompt_set_id=None if everywhere else prompt_set_id)
    rows = labelers.labeler_rows(session, prompt_set_id=prompt_set_id, user_id=user_id)
    context = {"prompt_set_id": prompt_set_id, "threshold": threshold, "row": rows[0] if rows else None}
    # The row swaps in place; the set's figures and the other rows listen for this event and reload.
    return _done(request, prompt_set_id,
                 lambda: render(request, "partials/_quality_labeler_row.html", context, headers=CHANGED))


@router.post("/quality/labelers/{user_id}/exclude")
def exclude_labeler(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: Id, user_id: Id,
                    everywhere: Annotated[bool, Form()] = False,
                    threshold: Annotated[float, Form(ge=0, le=1)] = DEFAULT_THRESHOLD):
    return _set_excluded(request, session, prompt_set_id, user_id, excluded=True, everywhere=everywhere,
                         threshold=threshold)


@router.post("/quality/labelers/{user_id}/include")
def include_labeler(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: Id, user_id: Id,
                    everywhere: Annotated[bool, Form()] = False,
                    threshold: Annotated[float, Form(ge=0, le=1)] = DEFAULT_THRESHOLD):
    return _set_excluded(request, session, prompt_set_id, user_id, excluded=False, everywhere=everywhere,
                         threshold=threshold)


# ---- labeler trust ----------------------------------------------------------------------

@router.get("/quality/trust")
def trust_fragment(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: Id):
    """The trust section; the page reloads it after an exclusion changes the figures."""
    prompt_set = get_prompt_set(session, prompt_set_id)
    return render(request, TRUST, _trust_context(session, prompt_set))


@router.post("/quality/trust-rules")
def trust_rules(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: Id,
                form: Annotated[dict[str, str], Depends(_form_fields)]):
    """Every rule of trust.TrustRules as a field (auto_quarantine a checkbox)."""
    prompt_set = get_prompt_set(session, prompt_set_id)
    try:
        trust.save_rules(session, prompt_set_id=prompt_set_id, values=form)
    except Invalid as exc:
        context = _trust_context(session, prompt_set, rules_values=form)
        return _done(request, prompt_set_id, lambda: render_form_errors(request, exc, TRUST, context,
                                                                         prefix="rules_"), error=exc.message)
    return _done(request, prompt_set_id, lambda: render(request, TRUST, _trust_context(session, prompt_set,
                                                                                         rules_saved=True)))


@router.post("/quality/labelers/{user_id}/quarantine")
def quarantine_labeler(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: Id, user_id: Id):
    prompt_set = get_prompt_set(session, prompt_set_id)
    trust.quarantine(session, prompt_set_id=prompt_set_id, user_id=user_id, by=admin)
    return _done(request, prompt_set_id, lambda: render(request, TRUST, _trust_context(session, prompt_set)))


@router.post("/quality/labelers/{user_id}/release")
def release_labeler(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: Id, user_id: Id):
    """Lift the quarantine: the held-back annotations count again, so the figures reload."""
    prompt_set = get_prompt_set(session, prompt_set_id)
    trust.release(session, prompt_set_id=prompt_set_id, user_id=user_id, by=admin)
    return _done(request, prompt_set_id,
                 lambda: render(request, TRUST, _trust_context(session, prompt_set), headers=CHANGED))


# ---- allowed labelers ---------------------------------------------------------------

@router.post("/quality/allowed")
def allow(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: Id,
          username: Annotated[str, Form(max_length=200)] = ""):
    prompt_set = get_prompt_set(session, prompt_set_id)
    try:
        labelers.allow_labeler(session, prompt_set_id=prompt_set_id, username=username)
    except Invalid as exc:
        context = _allowed_context(session, prompt_set, username=username)
        return _done(request, prompt_set_id, lambda: render_form_errors(request, exc, ALLOWED, context,
                                                                         prefix="allowed_"), error=exc.message)
    return _done(request, prompt_set_id, lambda: render(request, ALLOWED, _allowed_context(session, prompt_set)))


@router.post("/quality/allowed/{user_id}/remove")
def disallow(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: Id, user_id: Id):
    prompt_set = get_prompt_set(session, prompt_set_id)
    labelers.disallow_labeler(session, prompt_set_id=prompt_set_id, user_id=user_id)
    return _done(request, prompt_set_id, lambda: render(request, ALLOWED, _allowed_context(session, prompt_set)))


# ---- gold ------------------------------------------------------------------------------

@router.get("/quality/gold/form")
def gold_form(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: Id,
              task_id: Id):
    """The expected-answer form of one task of the set."""
    task = gold.get_task(session, prompt_set_id=prompt_set_id, task_id=task_id)
    return render(request, "partials/_quality_gold_form.html", {"prompt_set_id": prompt_set_id, "task": task})


def _gold_changed(request: Request, session, prompt_set: PromptSet):
    # Gold tasks leave the agreement figures and score the labelers: the table reloads.
    return _done(request, prompt_set.id,
                 lambda: render(request, GOLD, _gold_context(session, prompt_set), headers=CHANGED))


@router.post("/quality/gold/{task_id}")
def mark_gold(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: Id, task_id: Id,
              form: Annotated[dict[str, str], Depends(_form_fields)]):
    """Fields rank_<response id> (a ranking) or best_response_id (an expected best response)."""
    prompt_set = get_prompt_set(session, prompt_set_id)
    ranks = {key.removeprefix("rank_"): value for key, value in form.items() if key.startswith("rank_")}
    best = form.get("best_response_id")
    try:
        gold.mark_gold(session, prompt_set_id=prompt_set_id, task_id=task_id,
                       ranking=None if best else ranks, best_response_id=best or None)
    except Invalid as exc:
        task = gold.get_task(session, prompt_set_id=prompt_set_id, task_id=task_id)
        context = _gold_context(session, prompt_set, prompt_set_id=prompt_set_id, task=task, values=form)
        return _done(request, prompt_set_id, lambda: render_form_errors(request, exc, GOLD, context),
                     error=exc.message)
    return _gold_changed(request, session, prompt_set)


@router.post("/quality/gold/{task_id}/unmark")
def unmark_gold(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: Id, task_id: Id):
    prompt_set = get_prompt_set(session, prompt_set_id)
    gold.unmark_gold(session, prompt_set_id=prompt_set_id, task_id=task_id)
    return _gold_changed(request, session, prompt_set)


@router.post("/quality/gold-rate")
def gold_rate(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: Id,
              gold_rate: Annotated[str, Form(max_length=50)] = ""):
    prompt_set = get_prompt_set(session, prompt_set_id)
    try:
        gold.set_gold_rate(session, prompt_set_id=prompt_set_id, rate=gold_rate)
    except Invalid as exc:
        context = _gold_context(session, prompt_set, rate_value=gold_rate)
        return _done(request, prompt_set_id, lambda: render_form_errors(request, exc, GOLD, context, prefix="rate_"),
                     error=exc.message)
    return _done(request, prompt_set_id, lambda: render(request, GOLD, _gold_context(session, prompt_set,
                                                                                       rate_saved=True)))


# ---- export -----------------------------------------------------------------------------

@router.get("/export")
def export_page(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: Id):
    prompt_set = get_prompt_set(session, prompt_set_id)
    rows = labelers.labeler_rows(session, prompt_set_id=prompt_set_id)
    return render(request, "pages/quality_export.html", {
        "prompt_set": prompt_set, "rows": rows, "formats": export.FORMATS,
    })


@router.get("/export/download")
def export_download(session: SessionDep, admin: AdminUser, plan: ExportPlan):
    return stream(session, plan)


@router.get("/export/meta")
def export_sidecar(session: SessionDep, admin: AdminUser, plan: ExportPlan):
    return meta_response(session, plan)

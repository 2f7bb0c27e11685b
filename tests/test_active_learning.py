"""Active learning: the margin, the uncertainty order of leases, the set's order setting,
the score_tasks job and what queues it, and who sees the scores."""

import math
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from app.config import Settings
from app.db.base import utcnow
from app.db.enums import JobKind, JobStatus, ModelKind, PromptSetKind, PromptSetStatus, Role, TaskOrder
from app.db.models import Job, PromptSet, TaskScore
from app.db.session import new_session
from app.services import active_learning, models
from app.services.assignment import lease_next_task, skip_task
from app.services.errors import Conflict, Invalid
from tests.conftest import login
from tests.factories import make_model, make_prompt_set, make_task, make_user
from trainer.reward import load_reward_model, score
from trainer.worker import execute_job


def test_margin_is_the_mean_reward_gap_over_pairs():
    assert active_learning.margin([1.0, 1.0]) == 0.0
    assert active_learning.margin([2.0, -1.0]) == 3.0
    # Pairs (0,1)=1, (0,2)=3, (1,2)=2: mean 2.
    assert active_learning.margin([0.0, 1.0, 3.0]) == pytest.approx(2.0)
    with pytest.raises(AssertionError):
        active_learning.margin([1.0])


def scored_set(session, margins: list[float | None], *, order: TaskOrder, num_labels: list[int] | None = None):
    """A set with overlap 2 and one task per margin, oldest first; None: not scored."""
    rm = make_model(session, name=f"rm-{order.value}-{len(margins)}", kind=ModelKind.reward)
    prompt_set = make_prompt_set(session, k=2, overlap=2, task_order=order)
    start = utcnow() - timedelta(hours=1)
    tasks = [make_task(session, prompt_set, created_at=start + timedelta(minutes=i),
                       num_labels=(num_labels or [0] * len(margins))[i]) for i in range(len(margins))]
    active_learning.store_scores(session, model_id=rm.id, job_id=None, scored=[
        (t.id, {t.items[0].response_id: 0.0, t.items[1].response_id: m}) for t, m in zip(tasks, margins)
        if m is not None])
    session.commit()
    return prompt_set, tasks


def lease_order(session, labeler) -> list[int]:
    """The order one labeler is handed the tasks (each skipped once seen, so the next comes)."""
    seen = []
    while (got := lease_next_task(session, user=labeler, lease_s=600)) is not None:
        seen.append(got.task.id)
        skip_task(session, user=labeler, task_id=got.task.id, reason="Other")
    return seen


def test_uncertainty_order_hands_out_the_smallest_margin_first_after_overlap_filling(session):
    margins = [0.9, None, 0.1, 0.5, 2.0, 0.3]
    prompt_set, tasks = scored_set(session, margins, order=TaskOrder.uncertainty, num_labels=[0, 0, 0, 0, 1, 0])
    ids = [t.id for t in tasks]
    # The half-labeled task first (finish the overlap), then by margin, the unscored task last.
    assert lease_order(session, make_user(session)) == [ids[4], ids[2], ids[5], ids[3], ids[0], ids[1]]

    # The same scores in a set ordered by creation change nothing.
    session.execute(PromptSet.__table__.update().where(PromptSet.id == prompt_set.id)
                    .values(task_order=TaskOrder.created.value))
    session.commit()
    assert lease_order(session, make_user(session)) == [ids[4], ids[0], ids[1], ids[2], ids[3], ids[5]]


def test_the_order_setting_is_checked_per_field(session):
    sft = make_model(session, name="an-sft")
    rm = make_model(session, name="an-rm", kind=ModelKind.reward)
    prompt_set = make_prompt_set(session, k=2)
    with pytest.raises(Invalid) as bad:
        active_learning.update_order(session, prompt_set=prompt_set, order="random", order_model_id=str(sft.id),
                                     user_id=None)
    assert set(bad.value.errors) == {"task_order", "order_model_id"}
    assert "reward model" in bad.value.errors["order_model_id"]
    for raw in ("abc", "0", "999999", -3):
        with pytest.raises(Invalid) as bad:
            active_learning.update_order(session, prompt_set=prompt_set, order="uncertainty", order_model_id=raw,
                                         user_id=None)
        assert set(bad.value.errors) == {"order_model_id"}
    evaluation = make_prompt_set(session, k=2, kind=PromptSetKind.evaluation, pairwise=True)
    with pytest.raises(Conflict):
        active_learning.update_order(session, prompt_set=evaluation, order="uncertainty", order_model_id=None,
                                     user_id=None)
    # Good values: saved, and scoring with the chosen model is queued.
    job = active_learning.update_order(session, prompt_set=prompt_set, order="uncertainty",
                                       order_model_id=str(rm.id), user_id=None)
    assert (prompt_set.task_order, prompt_set.order_model_id) == (TaskOrder.uncertainty, rm.id)
    assert job.kind == JobKind.score_tasks and job.params == {"prompt_set_id": prompt_set.id,
                                                              "reward_model_id": rm.id}
    # Saving the same again queues nothing; asking by hand returns the job still queued.
    assert active_learning.update_order(session, prompt_set=prompt_set, order="uncertainty",
                                        order_model_id=rm.id, user_id=None) is None
    assert active_learning.queue_scoring(session, prompt_set=prompt_set, created_by_id=None).id == job.id
    archived = make_prompt_set(session, k=2, status=PromptSetStatus.archived)
    with pytest.raises(Conflict):
        active_learning.queue_scoring(session, prompt_set=archived, created_by_id=None)


def score_jobs(session) -> dict[int, int]:
    """{prompt set id: reward model id} of the queued score_tasks jobs."""
    return {j.prompt_set_id: j.params["reward_model_id"] for j in session.scalars(
        select(Job).where(Job.kind == JobKind.score_tasks, Job.status == JobStatus.queued))}


def test_a_new_reward_model_rescores_the_sets_that_follow_the_newest(session):
    with pytest.raises(Conflict, match="reward model"):  # none registered yet
        active_learning.queue_scoring(session, prompt_set=make_prompt_set(session, k=2), created_by_id=None)
    chosen = make_model(session, name="chosen-rm", kind=ModelKind.reward)
    following = make_prompt_set(session, k=2, task_order=TaskOrder.uncertainty)
    fixed = make_prompt_set(session, k=2, task_order=TaskOrder.uncertainty, order_model_id=chosen.id)
    make_prompt_set(session, k=2)  # ordered by creation
    make_prompt_set(session, k=2, task_order=TaskOrder.uncertainty, status=PromptSetStatus.archived)
    models.register_model(session, name="an-sft-checkpoint", kind=ModelKind.sft, path="/x", source="test")
    assert score_jobs(session) == {}
    new = models.register_model(session, name="new-rm", kind=ModelKind.reward, path="/y", source="test")
    assert score_jobs(session) == {following.id: new.id}
    assert active_learning.scoring_model(session, fixed).id == chosen.id


def test_score_tasks_job_stores_each_open_tasks_margin(committed, tiny_reward_dir):
    with new_session() as session:
        rm = make_model(session, tiny_reward_dir, name="tiny-rm", kind=ModelKind.reward)
        prompt_set = make_prompt_set(session, k=3, overlap=1)
        open_tasks = [make_task(session, prompt_set, texts=[f"good river {i}", f"lamp {i}", f"good good {i}"])
                      for i in range(5)]
        make_task(session, prompt_set, num_labels=1)  # labeled already: its order no longer matters
        make_task(session, prompt_set, is_gold=True)
        session.commit()
        job = active_learning.queue_scoring(session, prompt_set=prompt_set, created_by_id=None)
        ids = {"job": job.id, "set": prompt_set.id, "rm": rm.id}
        expected = {t.id: (t.prompt.messages, [(i.response_id, i.response.text) for i in t.items])
                    for t in open_tasks}
    execute_job(ids["job"], settings=Settings(device="cpu"))
    model, tokenizer = load_reward_model(tiny_reward_dir)
    with new_session() as session:
        job = session.get(Job, ids["job"])
        assert job.status == JobStatus.succeeded, job.traceback
        assert job.result["tasks"] == 5 and job.result["reward_model"] == "tiny-rm"
        stored = {s.task_id: s for s in session.scalars(select(TaskScore))}
        assert set(stored) == set(expected)
        for task_id, (messages, items) in expected.items():
            rewards = score(model, tokenizer, messages, [text for _, text in items]).tolist()
            row = stored[task_id]
            assert row.model_id == ids["rm"] and row.job_id == ids["job"]
            assert row.rewards == pytest.approx({str(rid): r for (rid, _), r in zip(items, rewards)}, abs=1e-4)
            assert row.margin == pytest.approx(active_learning.margin(rewards), abs=1e-4)
        assert math.isclose(job.result["margin_min"], min(s.margin for s in stored.values()), abs_tol=1e-3)
        summary = active_learning.order_summary(session, session.get(PromptSet, ids["set"]))
        assert (summary.open_tasks, summary.scored_tasks) == (5, 5)
        assert [r.margin for r in summary.lowest] == sorted(s.margin for s in stored.values())
    # Scored again (a new model, say): the rows are replaced, not added.
    with new_session() as session:
        again = active_learning.queue_scoring(session, prompt_set=session.get(PromptSet, ids["set"]),
                                              created_by_id=None)
        again_id = again.id
    execute_job(again_id, settings=Settings(device="cpu"))
    with new_session() as session:
        assert session.scalar(select(func.count()).select_from(TaskScore)) == 5
        assert {s.job_id for s in session.scalars(select(TaskScore))} == {again_id}


def test_generating_tasks_of_a_set_ordered_by_uncertainty_queues_scoring(committed, tiny_model_dir):
    from tests.test_generate import run_generate

    with new_session() as session:
        generator = make_model(session, tiny_model_dir)
        rm = make_model(session, name="rm-for-generated", kind=ModelKind.reward)
        ordered = make_prompt_set(session, model=generator, k=2, max_new_tokens=4, prompts=["Hi.", "Hello."],
                                  task_order=TaskOrder.uncertainty)
        plain = make_prompt_set(session, model=generator, k=2, max_new_tokens=4, prompts=["Hey."])
        session.commit()
        ids = (ordered.id, plain.id)
    run_generate(ids[0])
    run_generate(ids[1])
    with new_session() as session:
        assert score_jobs(session) == {ids[0]: rm.id}


# ---- pages and API ---------------------------------------------------------------------

def test_admin_sets_the_order_on_the_page_and_sees_the_scores(client, client_as, session):
    rm = make_model(session, name="page-rm", kind=ModelKind.reward)
    prompt_set, tasks = scored_set(session, [0.125, 0.75], order=TaskOrder.created)
    admin = client_as(Role.admin)
    page = admin.get(f"/admin/prompt-sets/{prompt_set.id}")
    assert page.status_code == 200 and 'id="prompt-set-order"' in page.text
    assert "0.125" in page.text and f"#{tasks[0].id}" in page.text and "page-rm" in page.text

    bad = admin.post(f"/admin/prompt-sets/{prompt_set.id}/task-order",
                     data={"task_order": "sideways", "order_model_id": "abc"}, headers={"HX-Request": "true"})
    assert bad.status_code == 422
    assert "must be created or uncertainty" in bad.text and "choose a reward model from the registry" in bad.text
    ok = admin.post(f"/admin/prompt-sets/{prompt_set.id}/task-order",
                    data={"task_order": "uncertainty", "order_model_id": str(rm.id)})
    assert ok.status_code == 303
    session.refresh(prompt_set)
    assert (prompt_set.task_order, prompt_set.order_model_id) == (TaskOrder.uncertainty, rm.id)
    assert score_jobs(session) == {prompt_set.id: rm.id}
    assert admin.post(f"/admin/prompt-sets/{prompt_set.id}/score-tasks").status_code == 303


def test_api_sets_the_order_and_engineers_read_the_scores(client, client_as, session):
    rm = make_model(session, name="api-rm", kind=ModelKind.reward)
    prompt_set, tasks = scored_set(session, [0.5, 0.25], order=TaskOrder.created)
    engineer = client_as(Role.engineer)
    body = engineer.get(f"/api/v1/prompt-sets/{prompt_set.id}/task-scores").json()
    assert [row["task_id"] for row in body["lowest"]] == [tasks[1].id, tasks[0].id]
    assert body["task_order"] == "created" and body["scored_tasks"] == 2
    assert engineer.put(f"/api/v1/prompt-sets/{prompt_set.id}/task-order",
                        json={"task_order": "uncertainty"}).status_code == 403  # admins set it
    queued = engineer.post(f"/api/v1/prompt-sets/{prompt_set.id}/task-scores")
    assert queued.status_code == 202 and queued.json()["kind"] == "score_tasks"

    client.cookies.clear()  # sign out
    client.headers.pop("X-CSRF-Token")
    admin = client_as(Role.admin)
    bad = admin.put(f"/api/v1/prompt-sets/{prompt_set.id}/task-order",
                    json={"task_order": "uncertainty", "order_model_id": tasks[0].id + 10_000})
    assert bad.status_code == 422 and "order_model_id" in bad.json()["errors"]
    ok = admin.put(f"/api/v1/prompt-sets/{prompt_set.id}/task-order",
                   json={"task_order": "uncertainty", "order_model_id": rm.id})
    assert ok.status_code == 200 and ok.json()["order_model_id"] == rm.id
    assert admin.get(f"/api/v1/prompt-sets/{prompt_set.id}").json()["task_order"] == "uncertainty"


def test_labelers_never_see_the_scores(client, session):
    rm = make_model(session, name="hidden-rm", kind=ModelKind.reward)
    prompt_set = make_prompt_set(session, k=2, task_order=TaskOrder.uncertainty, order_model_id=rm.id)
    task = make_task(session, prompt_set, texts=["first answer", "second answer"])
    a, b = (item.response_id for item in task.items)
    active_learning.store_scores(session, model_id=rm.id, job_id=None, scored=[(task.id, {a: 0.318309, b: 1.414213})])
    labeler = make_user(session)
    session.commit()
    client.headers["X-CSRF-Token"] = login(client, labeler)
    page = client.get("/label")
    api = client.get("/api/v1/label/next")
    assert page.status_code == 200 and "first answer" in page.text
    assert api.status_code == 200 and "first answer" in api.text
    for text in (page.text, api.text):
        for secret in ("0.318", "1.414", "1.096", "margin", "hidden-rm", "uncertainty"):
            assert secret not in text
    assert client.get(f"/api/v1/prompt-sets/{prompt_set.id}/task-scores").status_code == 403
    assert client.get(f"/admin/prompt-sets/{prompt_set.id}").status_code == 403

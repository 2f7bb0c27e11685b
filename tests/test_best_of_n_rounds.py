"""Best-of-N rounds: a ranking round generated as the top K of N samples per prompt by a
reward model. The tasks hold exactly the K best, record N, the reward model and every
candidate's reward, labelers never see any of it, and bad choices are named per field."""

import json

import pytest
import torch
from sqlalchemy import select

from app.config import Settings
from app.db.enums import JobKind, JobStatus, ModelKind, Role
from app.db.models import Job, PromptSet, Response, Task
from app.db.session import new_session
from app.services import auth, jobs, models, prompt_sets
from app.services.errors import Invalid
from tests.factories import make_model, make_prompt_set, make_user
from trainer.reward import load_reward_model, score
from trainer.worker import execute_job

K, N, PROMPTS = 3, 6, 4


def generate_round(prompt_set_id: int) -> Job:
    with new_session() as session:
        job = jobs.enqueue_job(session, kind=JobKind.generate, params={"prompt_set_id": prompt_set_id,
                                                                       "batch_size": 12})
    execute_job(job.id, settings=Settings(device="cpu"))
    with new_session() as session:
        return session.get(Job, job.id)


@pytest.fixture
def best_of_n_set(committed, tiny_model_dir, tiny_reward_dir):
    """An active ranking set in best-of-N mode (K = 3 of N = 6), generated: (set id, reward model id)."""
    with new_session() as session:
        generator = make_model(session, tiny_model_dir, name="tiny-sft", is_default=True)
        reward = make_model(session, tiny_reward_dir, name="tiny-rm", kind=ModelKind.reward)
        prompt_set = make_prompt_set(session, model=generator, k=K, max_new_tokens=8, name="bon round",
                                     best_of_n=N, best_of_n_reward_model_id=reward.id,
                                     prompts=[f"Tell me about topic {i}." for i in range(PROMPTS)])
        session.commit()
        set_id, reward_id = prompt_set.id, reward.id
    job = generate_round(set_id)
    assert job.status == JobStatus.succeeded, job.traceback
    assert job.result["tasks"] == PROMPTS and job.result["responses"] == PROMPTS * N
    assert (job.result["best_of_n"], job.result["reward_model_id"]) == (N, reward_id)
    return set_id, reward_id


def test_tasks_hold_the_top_k_of_n_by_reward_with_the_scores_recorded(best_of_n_set, tiny_reward_dir):
    set_id, reward_id = best_of_n_set
    rm, tokenizer = load_reward_model(tiny_reward_dir)
    with new_session() as session:
        tasks = session.scalars(select(Task).where(Task.prompt_set_id == set_id)).all()
        assert len(tasks) == PROMPTS
        for task in tasks:
            candidates = session.scalars(select(Response).where(Response.prompt_id == task.prompt_id)
                                         .order_by(Response.sample_index)).all()
            assert [r.sample_index for r in candidates] == list(range(N))
            assert len({r.text for r in candidates}) == N  # N distinct samples were scored
            # Scored anew, independently of the job: the task shows exactly the K best.
            rewards = score(rm, tokenizer, task.prompt.messages, [r.text for r in candidates])
            best = {candidates[i].id for i in rewards.topk(K).indices.tolist()}
            shown = {item.response_id for item in task.items}
            assert task.k == K and len(task.items) == K and shown == best
            # The record: N, the reward model, every candidate's reward, best first.
            selection = task.selection
            assert (selection["mode"], selection["n"], selection["reward_model_id"]) == ("best_of_n", N, reward_id)
            recorded = {c["response_id"]: c["reward"] for c in selection["candidates"]}
            assert set(recorded) == {r.id for r in candidates}
            torch.testing.assert_close(torch.tensor([recorded[r.id] for r in candidates]), rewards,
                                       atol=1e-3, rtol=0)
            assert [c["response_id"] for c in selection["candidates"][:K]] == sorted(best, key=lambda i: -recorded[i])
            assert min(recorded[i] for i in shown) >= max(recorded[i] for i in set(recorded) - shown)


def test_a_plain_round_records_no_selection(committed, tiny_model_dir):
    with new_session() as session:
        generator = make_model(session, tiny_model_dir, is_default=True)
        prompt_set = make_prompt_set(session, model=generator, k=2, max_new_tokens=6, prompts=["Hi.", "Why?"])
        session.commit()
        set_id = prompt_set.id
    job = generate_round(set_id)
    assert job.status == JobStatus.succeeded and "best_of_n" not in job.result
    with new_session() as session:
        tasks = session.scalars(select(Task).where(Task.prompt_set_id == set_id)).all()
        assert len(tasks) == 2 and all(t.selection is None and len(t.items) == 2 for t in tasks)


def test_labelers_never_see_the_scores_or_the_mode(best_of_n_set, client, client_as, session):
    set_id, _ = best_of_n_set
    rewards = [c["reward"] for t in session.scalars(select(Task).where(Task.prompt_set_id == set_id))
               for c in t.selection["candidates"]]
    client_as("labeler")
    html = client.get("/label").text
    api = client.get("/api/v1/label/next").json()
    assert api["task"] is not None and len(api["task"]["responses"]) == K  # a best-of-N task is being shown
    assert "tiny-rm" not in html
    shown = json.dumps(api)
    for text in (html, shown):
        lowered = text.lower()
        assert "reward" not in lowered and "best_of_n" not in lowered and "best of" not in lowered
        assert "selection" not in shown and "candidates" not in shown
        for reward in rewards:
            assert str(reward) not in text


def test_admins_and_engineers_see_the_mode(best_of_n_set, client, client_as, session):
    set_id, _ = best_of_n_set
    client_as("admin")
    page = client.get(f"/admin/prompt-sets/{set_id}").text
    assert f"best {K} of {N} samples per prompt by the reward model" in page and "tiny-rm" in page
    assert f"{PROMPTS} tasks so far: mean reward" in page
    api = client.get(f"/api/v1/prompt-sets/{set_id}").json()
    assert api["best_of_n"] == N and api["best_of_n_reward_model_id"] is not None
    generator = session.scalar(select(PromptSet).where(PromptSet.id == set_id)).generator_model_id
    client.cookies.clear()  # signed out
    client.headers.pop("X-CSRF-Token")
    client_as("engineer")
    model_page = client.get(f"/models/{generator}").text
    assert f"best {K} of {N} by tiny-rm" in model_page


# ---- choosing the mode: forms and API, checked per field ------------------------------------

def test_the_mode_is_checked_per_field(session, tmp_path):
    sft = make_model(session, tmp_path, name="sft", is_default=True)
    reward = make_model(session, tmp_path, name="rm", kind=ModelKind.reward)
    session.commit()

    def errors(**values) -> dict[str, str]:
        with pytest.raises(Invalid) as caught:
            prompt_sets.create_prompt_set(session, name="s", **values)
        session.rollback()
        return caught.value.errors

    assert "must be more than K (4)" in errors(best_of_n="4", best_of_n_reward_model_id=reward.id)["best_of_n"]
    assert errors(best_of_n=33, best_of_n_reward_model_id=reward.id)["best_of_n"] == "must be 2..32"
    assert errors(best_of_n="many", best_of_n_reward_model_id=reward.id)["best_of_n"] == "must be a whole number"
    assert errors(best_of_n=8, best_of_n_reward_model_id=sft.id) == {
        "best_of_n_reward_model_id": "choose a reward model from the list"}
    assert "best_of_n_reward_model_id" in errors(best_of_n=8, best_of_n_reward_model_id=999_999)
    assert "ranking sets" in errors(best_of_n=8, kind="demonstration")["best_of_n"]
    created = prompt_sets.create_prompt_set(session, name="bon", k=2, best_of_n=" 8 ")
    assert (created.best_of_n, created.best_of_n_reward_model_id) == (8, reward.id)  # the only reward model
    # K may not reach N afterwards; N blank turns the mode off.
    with pytest.raises(Invalid) as caught:
        prompt_sets.update_prompt_set(session, prompt_set=created, k=8)
    assert "must be more than K (8)" in caught.value.errors["best_of_n"]
    session.rollback()
    prompt_sets.update_prompt_set(session, prompt_set=created, best_of_n="")
    assert (created.best_of_n, created.best_of_n_reward_model_id) == (None, None)
    with pytest.raises(Invalid) as caught:
        models.promote_generator(session, model_id=sft.id, prompt_set_id=created.id, user_id=None, best_of_n=2)
    assert set(caught.value.errors) == {"best_of_n"}
    session.rollback()
    assert created.round == 1


def test_no_reward_model_registered_is_named(session, tmp_path):
    make_model(session, tmp_path, name="sft", is_default=True)
    with pytest.raises(Invalid) as caught:
        prompt_sets.create_prompt_set(session, name="s", best_of_n=8)
    assert caught.value.errors == {"best_of_n_reward_model_id": "register a reward model first (none is registered)"}


def test_promotion_opens_a_best_of_n_round_from_the_page_and_the_api(client, client_as, session, tmp_path):
    sft = make_model(session, tmp_path, name="sft", is_default=True)
    reward = make_model(session, tmp_path, name="rm-page", kind=ModelKind.reward)
    ranked = make_prompt_set(session, k=2, name="ranked")
    token = client_as("engineer").headers["X-CSRF-Token"]
    session.commit()
    page = client.get(f"/models/{sft.id}")
    assert 'name="best_of_n"' in page.text and "rm-page" in page.text
    bad = client.post(f"/models/{sft.id}/promote", headers={"HX-Request": "true"}, data={
        "csrf_token": token, "prompt_set_id": str(ranked.id), "best_of_n": "2",
        "best_of_n_reward_model_id": str(sft.id)})
    assert bad.status_code == 422
    assert "must be more than K (2)" in bad.text and "choose a reward model from the list" in bad.text
    assert 'value="2"' in bad.text  # the form comes back as sent
    session.refresh(ranked)
    assert ranked.round == 1 and ranked.best_of_n is None
    done = client.post(f"/models/{sft.id}/promote", data={
        "csrf_token": token, "prompt_set_id": str(ranked.id), "best_of_n": "8",
        "best_of_n_reward_model_id": str(reward.id)})
    assert done.status_code == 303
    session.refresh(ranked)
    assert (ranked.round, ranked.best_of_n, ranked.best_of_n_reward_model_id) == (2, 8, reward.id)

    user = make_user(session, role=Role.engineer)
    _, raw = auth.create_api_token(session, user=user, name="tests")
    session.commit()
    client.headers["Authorization"] = f"Bearer {raw}"
    refused = client.post(f"/api/v1/models/{sft.id}/promote", json={
        "prompt_set_id": ranked.id, "best_of_n": 40, "best_of_n_reward_model_id": 999_999})
    assert refused.status_code == 422
    assert set(refused.json()["errors"]) == {"best_of_n", "best_of_n_reward_model_id"}
    plain = client.post(f"/api/v1/models/{sft.id}/promote", json={"prompt_set_id": ranked.id})
    assert plain.status_code == 200 and plain.json()["best_of_n"] is None and plain.json()["round"] == 3


def test_the_set_forms_and_api_take_the_mode(client, client_as, session, tmp_path):
    make_model(session, tmp_path, name="sft", is_default=True)
    reward = make_model(session, tmp_path, name="rm-form", kind=ModelKind.reward)
    token = client_as("admin").headers["X-CSRF-Token"]
    session.commit()
    assert 'name="best_of_n_reward_model_id"' in client.get("/admin/prompt-sets/new").text
    bad = client.post("/admin/prompt-sets", headers={"HX-Request": "true"}, data={
        "csrf_token": token, "name": "form set", "k": "4", "best_of_n": "3", "best_of_n_reward_model_id": str(reward.id)})
    assert bad.status_code == 422 and "must be more than K (4)" in bad.text
    created = client.post("/admin/prompt-sets", data={
        "csrf_token": token, "name": "form set", "k": "4", "best_of_n": "12",
        "best_of_n_reward_model_id": str(reward.id)})
    assert created.status_code == 303
    prompt_set = session.scalar(select(PromptSet).where(PromptSet.name == "form set"))
    assert (prompt_set.best_of_n, prompt_set.best_of_n_reward_model_id) == (12, reward.id)
    page = client.get(f"/admin/prompt-sets/{prompt_set.id}").text
    assert "best 4 of 12 samples per prompt" in page and 'value="12"' in page
    patched = client.patch(f"/api/v1/prompt-sets/{prompt_set.id}", json={"k": 9, "best_of_n": 9})
    assert patched.status_code == 422 and "must be more than K (9)" in patched.json()["errors"]["best_of_n"]
    off = client.patch(f"/api/v1/prompt-sets/{prompt_set.id}", json={"best_of_n": None})
    assert off.status_code == 200 and off.json()["best_of_n"] is None
    assert off.json()["best_of_n_reward_model_id"] is None

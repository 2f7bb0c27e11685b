"""Evaluations through the ASGI client: the blind A/B page and API a labeler gets
(no model identity anywhere), the engineer's pages and API, bad input."""

import json
import re

from sqlalchemy import select

from app.db.enums import JobKind, ModelKind, PromptSetKind, Role, Split
from app.db.models import Job, PromptSet, Vote
from tests.conftest import login
from tests.factories import make_evaluation, make_model, make_prompt_set, make_task, make_user

HX = {"HX-Request": "true"}
NAMES = ("zebra-sft-secret", "yak-policy-secret")


def hidden(html: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match, f"no hidden {name}"
    return match.group(1)


def eval_world(session, prompts=4, overlap=1):
    sft = make_model(session, name=NAMES[0], is_default=True)
    policy = make_model(session, name=NAMES[1], kind=ModelKind.policy)
    # Named as engineers name them: after the models. Labelers see "Comparison #id" instead.
    prompt_set = make_evaluation(session, [sft, policy], prompts=prompts, overlap=overlap,
                                 name=f"{NAMES[0]} vs {NAMES[1]}")
    session.commit()
    return prompt_set, sft, policy


def assert_anonymous(text: str, *models) -> None:
    for m in models:
        assert m.name not in text
        assert "model_id" not in text and '"model"' not in text


def test_the_labeler_never_sees_which_model_wrote_which_response(client, session):
    prompt_set, sft, policy = eval_world(session)
    labeler = make_user(session)
    session.commit()
    client.headers["X-CSRF-Token"] = login(client, labeler)
    page = client.get("/label")
    assert page.status_code == 200
    html = page.text
    assert 'data-mode="vote"' in html and 'name="vote"' in html and "Both bad" in html
    assert 'name="rating-' not in html  # no Likert ratings on the A/B page
    assert_anonymous(html, sft, policy)
    fragment = client.get("/label", headers=HX)
    assert fragment.status_code == 200 and 'id="label-task"' in fragment.text and "<html" not in fragment.text
    assert_anonymous(fragment.text, sft, policy)
    api = client.get("/api/v1/label/next")
    assert api.status_code == 200
    body = api.json()
    assert body["task"]["mode"] == "vote" and body["task"]["k"] == 2
    assert_anonymous(api.text, sft, policy)

    def keys(value):
        if isinstance(value, dict):
            return set(value) | {k for v in value.values() for k in keys(v)}
        if isinstance(value, list):
            return {k for v in value for k in keys(v)}
        return set()
    assert not [k for k in keys(body) if "model" in k]

    # A vote through the form: the next task comes back, still anonymous.
    task_id = int(re.search(r'data-task-id="(\d+)"', html).group(1))
    response = client.post(f"/label/{task_id}/submit", headers=HX, data={
        "idempotency_key": hidden(html, "idempotency_key"), "started_at": hidden(html, "started_at"),
        "vote": "b", "strength": "clearly", "comment": "B is kinder",
    })
    assert response.status_code == 200, response.text
    assert f"Saved task {task_id}." in response.text
    assert_anonymous(response.text, sft, policy)
    stored = session.scalar(select(Vote).where(Vote.task_id == task_id))
    assert (stored.outcome, stored.strength) == ("b", "clearly")
    # The API takes a vote too.
    nxt = client.get("/api/v1/label/next").json()["task"]
    submitted = client.post(f"/api/v1/label/{nxt['id']}", json={"idempotency_key": "api-vote-key-1", "vote": "tie"})
    assert submitted.status_code == 201, submitted.text
    assert submitted.json()["comparisons"] == 0
    assert_anonymous(submitted.text, sft, policy)
    # History shows the vote's ranks without ratings.
    history = client.get("/label/history")
    assert history.status_code == 200 and "None/7" not in history.text
    assert_anonymous(history.text, sft, policy)
    assert f"Comparison #{prompt_set.id}" in history.text and f"Comparison #{prompt_set.id}" in html


def test_a_vote_without_a_choice_is_refused_next_to_the_field(client, session):
    eval_world(session)
    labeler = make_user(session)
    session.commit()
    client.headers["X-CSRF-Token"] = login(client, labeler)
    html = client.get("/label").text
    task_id = int(re.search(r'data-task-id="(\d+)"', html).group(1))
    response = client.post(f"/label/{task_id}/submit", headers=HX, data={
        "idempotency_key": hidden(html, "idempotency_key"), "started_at": hidden(html, "started_at"),
        "strength": "much"})
    assert response.status_code == 422
    assert 'id="error-vote"' in response.text and "choose one of a, b, tie, both_bad" in response.text
    api = client.post(f"/api/v1/label/{task_id}", json={"idempotency_key": "api-vote-key-2", "vote": "tie",
                                                         "strength": "much"})
    assert api.status_code == 422 and "strength" in api.json()["errors"]


def test_engineer_creates_an_evaluation_and_reads_its_results(client, client_as, session):
    sft = make_model(session, name="sft-one", is_default=True)
    policy = make_model(session, name="policy-one", kind=ModelKind.policy)
    source = make_prompt_set(session)
    make_task(session, source, split=Split.validation)
    session.commit()
    client_as(Role.engineer)
    assert "New evaluation" in client.get("/evaluations").text
    form = client.get("/evaluations/new")
    assert form.status_code == 200 and "sft-one" in form.text and source.name in form.text
    bad = client.post("/evaluations", headers=HX, data={"name": "e1", "model_ids": [str(sft.id)],
                                                         "prompts": '{"prompt": "hi"}'})
    assert bad.status_code == 422 and "choose at least 2 different models" in bad.text
    assert session.scalar(select(PromptSet).where(PromptSet.name == "e1")) is None
    no_prompts = client.post("/evaluations", headers=HX, data={"name": "e1", "model_ids": [str(sft.id), str(policy.id)]})
    assert no_prompts.status_code == 422 and "paste prompts, or choose ranking sets" in no_prompts.text
    created = client.post("/evaluations", data={
        "name": "e1", "model_ids": [str(sft.id), str(policy.id)], "source_set_ids": [str(source.id)],
        "prompts": '{"prompt": "Say hi."}\n{"prompt": "Say bye."}', "temperature": "0.8", "top_p": "0.9",
        "max_new_tokens": "16", "seed": "3", "overlap": "2",
    }, follow_redirects=False)
    assert created.status_code == 303, created.text
    prompt_set = session.scalar(select(PromptSet).where(PromptSet.name == "e1"))
    assert created.headers["location"] == f"/evaluations/{prompt_set.id}"
    assert prompt_set.kind == PromptSetKind.evaluation and prompt_set.status.value == "active"
    assert prompt_set.overlap == 2 and prompt_set.temperature == 0.8
    job = session.scalar(select(Job).where(Job.prompt_set_id == prompt_set.id))
    assert job.kind == JobKind.generate
    page = client.get(f"/evaluations/{prompt_set.id}")
    assert page.status_code == 200 and "Win rates" in page.text and "sft-one" in page.text
    api = client.get(f"/api/v1/evaluations/{prompt_set.id}").json()
    assert [m["name"] for m in api["models"]] == ["sft-one", "policy-one"]
    assert api["pairs"][0]["votes"] == 0 and api["pairs"][0]["win_rate"] is None
    assert any(e["prompt_set_id"] == prompt_set.id for e in client.get("/api/v1/evaluations").json())
    # A ranking set's id is no evaluation.
    assert client.get(f"/evaluations/{source.id}").status_code == 404
    assert client.get(f"/api/v1/evaluations/{source.id}").status_code == 404


def test_api_refuses_bad_evaluations_naming_the_field(client, client_as, session):
    sft = make_model(session)
    reward = make_model(session, kind=ModelKind.reward)
    session.commit()
    client_as(Role.engineer)
    for body, field in [
        ({"name": "x", "model_ids": [sft.id], "prompts": '{"prompt": "a"}'}, "model_ids"),
        ({"name": "x", "model_ids": [sft.id, reward.id], "prompts": '{"prompt": "a"}'}, "model_ids"),
        ({"name": "x", "model_ids": [sft.id, sft.id + 1000], "prompts": '{"prompt": "a"}'}, "model_ids"),
        ({"name": "", "model_ids": [sft.id, reward.id]}, "name"),
        ({"name": "x", "model_ids": [sft.id, reward.id], "prompts": "{not json"}, "prompts"),
        ({"name": "x", "model_ids": [sft.id, reward.id], "prompts": '{"prompt": "a"}', "temperature": 0},
         "temperature"),
    ]:
        response = client.post("/api/v1/evaluations", json=body)
        assert response.status_code == 422, (body, response.text)
        assert field in response.json()["errors"], (body, response.json())
    assert client.post("/api/v1/evaluations", json={"name": "x"}).status_code == 422


def test_results_and_votes_export_after_votes(client, client_as, session):
    from app.services import annotations, assignment

    prompt_set, sft, policy = eval_world(session, prompts=4)
    labeler = make_user(session)
    for i, outcome in enumerate(["a", "b", "tie", "both_bad"]):
        lease = assignment.lease_next_task(session, user=labeler, lease_s=600)
        annotations.submit_annotation(session, user=labeler, task_id=lease.task.id, ratings=None, ranks=None,
                                      vote=outcome, idempotency_key=f"export-vote-{i}")
    client_as(Role.engineer)
    api = client.get(f"/api/v1/evaluations/{prompt_set.id}").json()
    pair = api["pairs"][0]
    assert pair["votes"] == 4 and pair["wins"] + pair["losses"] == 2 and pair["ties"] == 1 and pair["both_bad"] == 1
    assert api["labelers"][0]["labeler"] == labeler.username
    export = client.get(f"/api/v1/evaluations/{prompt_set.id}/votes")
    assert export.status_code == 200
    rows = [json.loads(line) for line in export.text.splitlines()]
    assert len(rows) == 4 and {r["outcome"] for r in rows} == {"a", "b", "tie", "both_bad"}
    assert {r["model_a"] for r in rows} | {r["model_b"] for r in rows} == set(NAMES)
    page = client.get(f"/evaluations/{prompt_set.id}")
    assert 'class="interval-bar"' in page.text
    download = client.get(f"/evaluations/{prompt_set.id}/votes.jsonl")
    assert download.status_code == 200 and download.text == export.text


def test_labelers_cannot_open_evaluations(client, client_as, session):
    prompt_set, _, _ = eval_world(session)
    client_as(Role.labeler)
    assert client.get(f"/api/v1/evaluations/{prompt_set.id}").status_code == 403
    assert client.get("/evaluations", follow_redirects=False).status_code == 403

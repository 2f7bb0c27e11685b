"""Prompt sets: settings validation, counts, the status life cycle, generation
queueing, and the admin pages."""

import json
import re

import pytest
from sqlalchemy import func, select

from app.db.enums import JobKind, JobStatus, ModelKind, PromptSetStatus, Role
from app.db.models import Job, Prompt, PromptSet, Response, Task
from app.services import prompt_sets
from app.services.errors import Conflict, Invalid
from app.services.prompt_import import import_prompts
from tests.factories import create_set, make_model, make_user

def jsonl(*texts: str) -> str:
    return "".join(json.dumps({"prompt": t}) + "\n" for t in texts)


def set_count(session) -> int:
    return session.scalar(select(func.count()).select_from(PromptSet))


def generate_jobs(session, prompt_set) -> list[Job]:
    return list(session.scalars(
        select(Job).where(Job.prompt_set_id == prompt_set.id, Job.kind == JobKind.generate).order_by(Job.id)))


# ---- creating and changing settings ------------------------------------------------

def test_new_set_is_a_draft_with_the_table_defaults(session):
    ps = prompt_sets.create_prompt_set(session, name="  Helpfulness round 1 ")
    assert ps.name == "Helpfulness round 1"
    assert ps.status == PromptSetStatus.draft
    assert (ps.k, ps.overlap, ps.temperature, ps.top_p) == (4, 1, 1.0, 0.95)
    assert (ps.train_ratio, ps.validation_ratio, ps.rl_ratio) == (0.8, 0.1, 0.1)


def test_form_strings_are_accepted(session):
    ps = prompt_sets.create_prompt_set(
        session, name="from a form", k="3", temperature="0.7", top_p="0.9", max_new_tokens="64", seed="42",
        overlap="2", train_ratio="0.6", validation_ratio="0.2", rl_ratio="0.2", kind="ranking")
    assert (ps.k, ps.temperature, ps.top_p, ps.max_new_tokens, ps.seed, ps.overlap) == (3, 0.7, 0.9, 64, 42, 2)


@pytest.mark.parametrize(("values", "field", "message"), [
    ({"k": 1}, "k", "must be 2..9"),
    ({"k": 10}, "k", "must be 2..9"),
    ({"k": "four"}, "k", "must be a whole number"),
    ({"k": "4.5"}, "k", "must be a whole number"),
    ({"k": ""}, "k", "required"),
    ({"k": True}, "k", "must be a whole number"),
    ({"temperature": True}, "temperature", "must be a number"),
    ({"temperature": " "}, "temperature", "required"),
    ({"temperature": 0}, "temperature", "must be greater than 0"),
    ({"temperature": "nan"}, "temperature", "must be a finite number"),
    ({"top_p": 1.5}, "top_p", "must be greater than 0 and at most 1"),
    ({"max_new_tokens": 0}, "max_new_tokens", "must be 1..4096"),
    ({"seed": -1}, "seed", "must be 0.."),
    ({"overlap": 0}, "overlap", "must be 1..100"),
    ({"train_ratio": 0.5}, "ratios", "must add up to 1 (they add up to 0.7)"),
    ({"rl_ratio": -0.1, "train_ratio": 1.0}, "rl_ratio", "must be between 0 and 1"),
    ({"name": "   "}, "name", "required"),
    ({"name": "x" * 201}, "name", "at most 200 characters"),
    ({"kind": "essay"}, "kind", "must be one of ranking, demonstration"),
    ({"generator_model_id": 999999}, "generator_model_id", "choose an SFT or policy model"),
])
def test_bad_setting_is_named_with_its_field_and_nothing_is_stored(session, values, field, message):
    before = set_count(session)
    with pytest.raises(Invalid) as caught:
        prompt_sets.create_prompt_set(session, **({"name": "bad settings"} | values))
    assert message in caught.value.errors[field]
    assert set_count(session) == before


def test_all_bad_fields_are_reported_together(session):
    with pytest.raises(Invalid) as caught:
        prompt_sets.create_prompt_set(session, name="", k=0, top_p=0, overlap=0)
    assert set(caught.value.errors) == {"name", "k", "top_p", "overlap"}


def test_names_are_unique_ignoring_case(session):
    create_set(session, instructions="x")
    prompt_sets.create_prompt_set(session, name="Safety")
    with pytest.raises(Conflict) as caught:
        prompt_sets.create_prompt_set(session, name="safety")
    assert caught.value.errors == {"name": "already taken"}


def test_generator_defaults_to_the_default_sft_model_and_must_be_a_generator(session):
    make_model(session, kind=ModelKind.policy, is_default=True)
    sft = make_model(session, kind=ModelKind.sft, is_default=True)
    reward = make_model(session, kind=ModelKind.reward)
    assert create_set(session).generator_model_id == sft.id
    with pytest.raises(Invalid) as caught:
        create_set(session, generator_model_id=reward.id)
    assert "generator_model_id" in caught.value.errors


def test_ratios_are_fixed_once_the_set_has_prompts(session):
    ps = create_set(session)
    prompt_sets.update_prompt_set(session, prompt_set=ps, train_ratio="0.5", validation_ratio="0.25",
                                  rl_ratio="0.25", k="6", name="renamed")
    assert (ps.train_ratio, ps.k, ps.name) == (0.5, 6, "renamed")
    import_prompts(session, prompt_set=ps, data=jsonl("a"))
    with pytest.raises(Invalid) as caught:
        prompt_sets.update_prompt_set(session, prompt_set=ps, train_ratio=0.8, validation_ratio=0.1, rl_ratio=0.1)
    assert "fixed once prompts are imported" in caught.value.errors["ratios"]
    # Other settings may still change; the same ratios are no change.
    prompt_sets.update_prompt_set(session, prompt_set=ps, overlap=3, train_ratio="0.5")
    assert ps.overlap == 3 and ps.train_ratio == 0.5


# ---- counts ------------------------------------------------------------------------

def test_counts_follow_prompts_responses_and_labeled_tasks(session):
    ps = create_set(session, k=2, overlap=2)
    import_prompts(session, prompt_set=ps, data=jsonl("a", "b", "c"))
    prompts = session.scalars(select(Prompt).where(Prompt.prompt_set_id == ps.id).order_by(Prompt.id)).all()
    for labels, prompt in zip((0, 1, 2), prompts):
        session.add_all([Response(prompt_id=prompt.id, round=1, sample_index=i, text=f"r{i}") for i in range(2)])
        session.add(Task(prompt_set_id=ps.id, prompt_id=prompt.id, round=1, k=2, num_labels=labels))
    # A response of an older round is not counted.
    session.add(Response(prompt_id=prompts[0].id, round=0, sample_index=0, text="old"))
    session.flush()

    c = prompt_sets.counts(session, ps)
    assert (c.prompts, c.responses, c.tasks, c.tasks_ready, c.tasks_labeled) == (3, 6, 3, 2, 1)
    assert sum(c.prompts_per_split.values()) == 3
    (summary,) = [s for s in prompt_sets.list_prompt_sets(session) if s.prompt_set.id == ps.id]
    assert summary.counts == c


# ---- life cycle ----------------------------------------------------------------------

def test_a_draft_without_prompts_cannot_start(session):
    ps = create_set(session)
    with pytest.raises(Conflict, match="Import prompts before starting"):
        prompt_sets.start_prompt_set(session, prompt_set=ps, user_id=None)
    assert ps.status == PromptSetStatus.draft


def test_starting_a_set_queues_one_generate_job(session):
    admin = make_user(session, role=Role.admin)
    ps = create_set(session)
    import_prompts(session, prompt_set=ps, data=jsonl("a", "b"))
    assert generate_jobs(session, ps) == []  # a draft generates nothing yet

    job = prompt_sets.start_prompt_set(session, prompt_set=ps, user_id=admin.id)

    assert ps.status == PromptSetStatus.active
    (stored,) = generate_jobs(session, ps)
    assert stored.id == job.id and stored.status == JobStatus.queued
    assert stored.params == {"prompt_set_id": ps.id} and stored.created_by_id == admin.id


def test_status_transitions_are_checked(session):
    ps = create_set(session)
    import_prompts(session, prompt_set=ps, data=jsonl("a"))
    with pytest.raises(Conflict, match="it is draft"):
        prompt_sets.pause_prompt_set(session, prompt_set=ps)
    with pytest.raises(Conflict):
        prompt_sets.resume_prompt_set(session, prompt_set=ps, user_id=None)
    prompt_sets.start_prompt_set(session, prompt_set=ps, user_id=None)
    with pytest.raises(Conflict, match="it is active"):
        prompt_sets.start_prompt_set(session, prompt_set=ps, user_id=None)
    with pytest.raises(Conflict):
        prompt_sets.resume_prompt_set(session, prompt_set=ps, user_id=None)
    prompt_sets.pause_prompt_set(session, prompt_set=ps)
    assert ps.status == PromptSetStatus.paused
    prompt_sets.resume_prompt_set(session, prompt_set=ps, user_id=None)
    assert ps.status == PromptSetStatus.active
    prompt_sets.archive_prompt_set(session, prompt_set=ps)
    assert ps.status == PromptSetStatus.archived
    with pytest.raises(Conflict, match="it is archived"):
        prompt_sets.archive_prompt_set(session, prompt_set=ps)
    with pytest.raises(Conflict, match="archived"):
        prompt_sets.update_prompt_set(session, prompt_set=ps, k=3)


def test_imports_into_an_active_set_queue_generation_once(session):
    ps = create_set(session)
    import_prompts(session, prompt_set=ps, data=jsonl("a"))
    first = prompt_sets.start_prompt_set(session, prompt_set=ps, user_id=None)
    # A job is queued already: new prompts wait for it rather than queueing a second one.
    result = import_prompts(session, prompt_set=ps, data=jsonl("b"))
    assert result.generation_job_id is None
    assert [j.id for j in generate_jobs(session, ps)] == [first.id]

    first.status = JobStatus.succeeded
    session.flush()
    result = import_prompts(session, prompt_set=ps, data=jsonl("c"))
    assert result.generation_job_id is not None
    assert len(generate_jobs(session, ps)) == 2
    # Once every prompt has its task, an import of duplicates only has nothing to generate.
    for prompt in session.scalars(select(Prompt).where(Prompt.prompt_set_id == ps.id)):
        session.add(Task(prompt_set_id=ps.id, prompt_id=prompt.id, round=1, k=4))
    generate_jobs(session, ps)[-1].status = JobStatus.succeeded
    session.flush()
    assert import_prompts(session, prompt_set=ps, data=jsonl("c")).generation_job_id is None
    assert len(generate_jobs(session, ps)) == 2


def generated_then_paused(session) -> PromptSet:
    """A set whose one prompt was generated (its generation job succeeded), then paused."""
    ps = create_set(session)
    import_prompts(session, prompt_set=ps, data=jsonl("a"))
    job = prompt_sets.start_prompt_set(session, prompt_set=ps, user_id=None)
    prompt = session.scalar(select(Prompt).where(Prompt.prompt_set_id == ps.id))
    session.add(Task(prompt_set_id=ps.id, prompt_id=prompt.id, round=1, k=4))
    job.status = JobStatus.succeeded
    prompt_sets.pause_prompt_set(session, prompt_set=ps)
    return ps


def test_prompts_imported_while_paused_are_generated_on_resume(session):
    ps = generated_then_paused(session)

    assert import_prompts(session, prompt_set=ps, data=jsonl("b")).generation_job_id is None
    assert prompt_sets.resume_prompt_set(session, prompt_set=ps, user_id=None) is not None
    assert len(generate_jobs(session, ps)) == 2


def test_resuming_with_every_prompt_generated_queues_nothing(session):
    ps = generated_then_paused(session)
    assert prompt_sets.resume_prompt_set(session, prompt_set=ps, user_id=None) is None
    assert len(generate_jobs(session, ps)) == 1


def test_demonstration_sets_start_without_generation(session):
    ps = create_set(session, kind="demonstration")
    import_prompts(session, prompt_set=ps, data=jsonl("write your own answer"))
    assert prompt_sets.start_prompt_set(session, prompt_set=ps, user_id=None) is None
    assert ps.status == PromptSetStatus.active and generate_jobs(session, ps) == []


# ---- pages -------------------------------------------------------------------------

def test_list_page_shows_sets_with_status_and_counts(admin_client, session):
    ps = create_set(session)
    import_prompts(session, prompt_set=ps, data=jsonl("a", "b", "c"))
    page = admin_client.get("/admin/prompt-sets")
    assert page.status_code == 200
    row = re.search(rf'<tr id="prompt-set-{ps.id}".*?</tr>', page.text, re.S).group(0)
    assert ps.name in row and "draft" in row and "<td>3</td>" in row


def test_new_page_shows_the_defaults_and_the_registered_models(admin_client, session):
    default = make_model(session, is_default=True, name="smol-sft")
    make_model(session, kind=ModelKind.reward, name="a-reward-model")
    page = admin_client.get("/admin/prompt-sets/new")
    assert page.status_code == 200
    assert 'name="k" type="number" min="2" max="9" step="1" value="4"' in page.text
    assert 'name="train_ratio" type="number" min="0" max="1" step="any" value="0.8"' in page.text
    assert f'<option value="{default.id}" selected>smol-sft (sft, default)</option>' in page.text
    generator_select = page.text.split('name="generator_model_id"')[1].split("</select>")[0]
    assert "smol-sft" in generator_select and "a-reward-model" not in generator_select
    scorer_select = page.text.split('name="best_of_n_reward_model_id"')[1].split("</select>")[0]
    assert "a-reward-model" in scorer_select and "smol-sft" not in scorer_select  # best-of-N rounds' scorer


def test_create_form_with_bad_values_comes_back_with_errors_and_values(admin_client, session):
    before = set_count(session)
    response = admin_client.post("/admin/prompt-sets", data={
        "name": "Kept name", "k": "12", "temperature": "0.7", "top_p": "0.9", "max_new_tokens": "64",
        "seed": "1", "overlap": "1", "train_ratio": "0.5", "validation_ratio": "0.1", "rl_ratio": "0.1",
    }, headers={"HX-Request": "true"})
    assert response.status_code == 422
    assert response.text.lstrip().startswith('<section class="card" id="prompt-set-form">')
    assert "must be 2..9" in response.text and "must add up to 1" in response.text
    assert 'value="Kept name"' in response.text and 'value="12"' in response.text
    assert set_count(session) == before


def test_create_form_makes_a_draft_and_opens_its_page(admin_client, session):
    response = admin_client.post("/admin/prompt-sets", data={
        "name": "Helpful answers", "instructions": "Prefer **short** answers <script>alert(1)</script>",
        "k": "3", "overlap": "2",
    })
    assert response.status_code == 303
    ps = session.scalar(select(PromptSet).where(PromptSet.name == "Helpful answers"))
    assert response.headers["location"] == f"/admin/prompt-sets/{ps.id}"
    assert (ps.k, ps.overlap, ps.status) == (3, 2, PromptSetStatus.draft)

    page = admin_client.get(response.headers["location"])
    assert page.status_code == 200
    assert "Created the prompt set" in page.text
    assert "<strong>short</strong>" in page.text and "<script>alert(1)" not in page.text
    assert 'id="prompt-set-import"' in page.text and 'type="file" name="file"' in page.text
    assert 'name="content"' in page.text
    assert "/admin/prompt-sets/%d/start" % ps.id in page.text


def test_upload_of_a_bad_file_lists_its_lines_and_stores_nothing(admin_client, session):
    ps = create_set(session)
    bad = jsonl("fine") + '{"prompt": 3}\n{oops\n'
    response = admin_client.post(
        f"/admin/prompt-sets/{ps.id}/prompts", files={"file": ("prompts.jsonl", bad.encode(), "application/jsonl")},
        data={"format": "auto"}, headers={"HX-Request": "true"})
    assert response.status_code == 422
    assert response.text.lstrip().startswith('<section class="card" id="prompt-set-import">')
    assert "line 2: &#39;prompt&#39; must be a string, not a number" in response.text
    assert "line 3: not valid JSON" in response.text
    assert prompt_sets.count_prompts(session, ps.id) == 0


def test_paste_and_upload_import_prompts_and_flash_the_result(admin_client, session):
    ps = create_set(session)
    response = admin_client.post(f"/admin/prompt-sets/{ps.id}/prompts",
                                 data={"content": "prompt,topic\nhello,greeting\nbye,farewell\n", "format": "auto"})
    assert response.status_code == 303
    response = admin_client.post(
        f"/admin/prompt-sets/{ps.id}/prompts", files={"file": ("more.jsonl", jsonl("hello", "new").encode())})
    assert response.status_code == 303
    page = admin_client.get(f"/admin/prompt-sets/{ps.id}")
    assert "Imported 1 prompt" in page.text and "Skipped 1 duplicate" in page.text
    assert '<strong data-count="prompts">3</strong>' in page.text


def test_bad_paste_is_kept_in_the_form(admin_client, session):
    ps = create_set(session)
    response = admin_client.post(f"/admin/prompt-sets/{ps.id}/prompts",
                                 data={"content": '{"prompt": "ok"}\n{"messages": []}\n'})
    assert response.status_code == 422
    assert "line 2: &#39;messages&#39; must be a non-empty list" in response.text
    assert "{&#34;prompt&#34;: &#34;ok&#34;}" in response.text
    assert prompt_sets.count_prompts(session, ps.id) == 0


def test_import_needs_a_file_or_pasted_text(admin_client, session):
    ps = create_set(session)
    response = admin_client.post(f"/admin/prompt-sets/{ps.id}/prompts", data={"content": "  ", "format": "auto"},
                                 files={"file": ("", b"", "application/octet-stream")})
    assert response.status_code == 422
    assert "Choose a file to upload or paste prompts" in response.text


def test_start_button_activates_the_set_and_the_status_polls_while_generation_waits(admin_client, session):
    ps = create_set(session)
    import_prompts(session, prompt_set=ps, data=jsonl("a", "b"))
    status = admin_client.get(f"/admin/prompt-sets/{ps.id}/status")
    assert 'hx-trigger="every 2s"' not in status.text

    response = admin_client.post(f"/admin/prompt-sets/{ps.id}/start")
    assert response.status_code == 303
    assert ps.status == PromptSetStatus.active
    page = admin_client.get(f"/admin/prompt-sets/{ps.id}")
    assert "Generation of responses is queued" in page.text
    assert 'data-job-status="queued"' in page.text and 'hx-trigger="every 2s"' in page.text

    job = generate_jobs(session, ps)[0]
    job.status, job.progress_done, job.progress_total = JobStatus.running, 1, 2
    session.flush()
    status = admin_client.get(f"/admin/prompt-sets/{ps.id}/status", headers={"HX-Request": "true"})
    assert status.text.lstrip().startswith('<section class="card" id="prompt-set-status"')
    assert "1 of 2 done (50%)" in status.text and 'hx-trigger="every 2s"' in status.text

    job.status = JobStatus.succeeded
    session.flush()
    status = admin_client.get(f"/admin/prompt-sets/{ps.id}/status")
    assert 'data-job-status="succeeded"' in status.text and 'hx-trigger="every 2s"' not in status.text


def test_pause_resume_archive_buttons(admin_client, session):
    ps = create_set(session)
    import_prompts(session, prompt_set=ps, data=jsonl("a"))
    # Pausing a draft is refused with the reason.
    response = admin_client.post(f"/admin/prompt-sets/{ps.id}/pause")
    assert response.status_code == 409
    assert "it is draft, and only active sets can be paused" in response.text
    for action, status in (("start", "active"), ("pause", "paused"), ("resume", "active"), ("archive", "archived")):
        assert admin_client.post(f"/admin/prompt-sets/{ps.id}/{action}").status_code == 303
        assert ps.status.value == status
    page = admin_client.get(f"/admin/prompt-sets/{ps.id}")
    assert 'id="prompt-set-import"' not in page.text and "/archive" not in page.text


def test_settings_form_saves_and_refuses_bad_values(admin_client, session):
    ps = create_set(session)
    fields = {"name": ps.name, "instructions": "Be kind.", "k": "5", "temperature": "0.8", "top_p": "1",
              "max_new_tokens": "32", "seed": "3", "overlap": "2", "train_ratio": "0.8",
              "validation_ratio": "0.1", "rl_ratio": "0.1"}
    assert admin_client.post(f"/admin/prompt-sets/{ps.id}/settings", data=fields).status_code == 303
    assert (ps.k, ps.instructions, ps.overlap) == (5, "Be kind.", 2)
    response = admin_client.post(f"/admin/prompt-sets/{ps.id}/settings", data=fields | {"overlap": "0"},
                                 headers={"HX-Request": "true"})
    assert response.status_code == 422 and "must be 1..100" in response.text
    assert ps.overlap == 2


def test_unknown_set_is_404(admin_client):
    assert admin_client.get("/admin/prompt-sets/999999").status_code == 404


def test_archiving_cancels_queued_generation(session):
    ps = create_set(session)
    import_prompts(session, prompt_set=ps, data=jsonl("a"))
    job = prompt_sets.start_prompt_set(session, prompt_set=ps, user_id=None)
    prompt_sets.archive_prompt_set(session, prompt_set=ps)
    session.refresh(job)
    assert ps.status == PromptSetStatus.archived and job.status == JobStatus.cancelled

"""AI labelers: a reward model trained on a known rule labels a set beside rule-following
humans (its agreement on the quality page, no overlap used, training only by choice), the
judge-model path's mechanics (both orders asked, answer-token probabilities, a ranking of the
right shape), pre-annotation (shown on a fixed half, shown/changed recorded, the study's
figures), and the account rules (no sign-in, admins only, clear messages)."""

import pytest
import torch
from sqlalchemy import select

from app.config import Settings
from app.db.enums import JobStatus, ModelKind, PromptSetKind, Role
from app.db.models import Annotation, Job, Rating, Task, User
from app.db.session import new_session
from app.services import ai_labelers, annotations, auth, training, users
from app.services.agreement import compute_set_agreement, ranking_agreement
from app.services.assignment import lease_next_task
from app.services.errors import Conflict, Invalid, NotAllowed
from app.services.progress import set_progress
from tests.conftest import csrf_of, login
from tests.factories import make_model, make_prompt_set, make_task, make_user, response_ids, synthetic
from tests.factories.quality import annotate
from trainer.ai_judge import PairVerdict, copeland_ranks, dense_ranks, judge_pairs, judge_prompt
from trainer.common import encode_prompt, prepare_tokenizer
from trainer.models import load_causal_lm, load_tokenizer
from trainer.reward import RewardConfig, train_reward_model
from trainer.worker import execute_job


def run(job_id: int, tmp_path) -> Job:
    execute_job(job_id, settings=Settings(device="cpu", data_dir=tmp_path))
    with new_session() as session:
        return session.get(Job, job_id)


# ---- pure rules -------------------------------------------------------------------------

def test_rankings_from_scores_and_from_pairwise_wins_tie_what_is_equal():
    assert dense_ranks([0.5, 2.0, 0.5, -1.0]) == [2, 1, 2, 3]
    # 0 beats 1 and 2; 1 and 2 tie; 3 loses to everyone: Copeland scores 2, -1, -1, -3... with ties.
    prefs = {(0, 1): 1, (0, 2): 1, (0, 3): 1, (1, 2): 0, (1, 3): 1, (2, 3): 1}
    assert copeland_ranks(4, prefs) == [1, 2, 2, 3]
    # A cycle (0 > 1 > 2 > 0) is a three-way tie.
    assert copeland_ranks(3, {(0, 1): 1, (1, 2): 1, (0, 2): -1}) == [1, 1, 1]


def test_a_judge_that_always_answers_a_is_read_as_a_tie():
    """Both orders cancel position bias: P("A") = 0.9 whichever response is shown first says nothing."""
    biased = PairVerdict(0, 1, p_ab=0.9, p_ba=0.9, p_i=(0.9 + 1 - 0.9) / 2)
    assert biased.preference(0.02) == 0
    assert PairVerdict(0, 1, 0.8, 0.3, (0.8 + 1 - 0.3) / 2).preference(0.02) == 1
    assert PairVerdict(0, 1, 0.3, 0.8, (0.3 + 1 - 0.8) / 2).preference(0.02) == -1


def test_judge_model_reads_answer_token_probabilities_in_both_orders(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir), torch.device("cpu"), torch.float32).eval()
    tokenizer = prepare_tokenizer(load_tokenizer(str(tiny_model_dir)))
    messages = [{"role": "user", "content": "Name a fruit."}]
    responses = ["apple", "a river stone", "bread and lamp"]
    verdicts = judge_pairs(model, tokenizer, messages, responses, instructions="Be brief.",
                           principles="- Prefer answers that name a fruit.")
    assert [(v.i, v.j) for v in verdicts] == [(0, 1), (0, 2), (1, 2)]
    a_id = tokenizer("A", add_special_tokens=False).input_ids[0]
    b_id = tokenizer("B", add_special_tokens=False).input_ids[0]

    def p_a(first: str, second: str) -> float:
        """P("A") among A/B at the answer position, one prompt alone (no padding)."""
        prompt = judge_prompt(messages, first, second, instructions="Be brief.",
                              principles="- Prefer answers that name a fruit.")
        ids = torch.tensor([encode_prompt(tokenizer, prompt)])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
        return torch.sigmoid(logprobs[a_id] - logprobs[b_id]).item()

    for v in verdicts:
        assert v.p_ab == pytest.approx(p_a(responses[v.i], responses[v.j]), abs=1e-4)  # i shown as A
        assert v.p_ba == pytest.approx(p_a(responses[v.j], responses[v.i]), abs=1e-4)  # j shown as A
        assert v.p_i == pytest.approx((v.p_ab + 1 - v.p_ba) / 2)
    # The principles reach the judge: its question quotes them, and the set's instructions.
    text = judge_prompt(messages, "x", "y", instructions="Be brief.", principles="- Be kind.")[0]["content"]
    assert "- Be kind." in text and text.startswith("Be brief.") and "Response A:\nx" in text


# ---- a reward model as AI labeler ----------------------------------------------------------

@pytest.fixture(scope="module")
def rule_reward_model(tiny_model_dir, tmp_path_factory):
    """A tiny reward model trained on the synthetic rule (more GOOD is better)."""
    config = RewardConfig(epochs=1, batch_size=8, learning_rate=1e-3, eval_batch_size=32)
    result = train_reward_model(config, synthetic.ranked_groups(range(0, 120), k=4, seed=1),
                                synthetic.ranked_groups(range(1000, 1020), k=4, seed=2), model_path=tiny_model_dir,
                                output_dir=tmp_path_factory.mktemp("rule-rm") / "rm")
    assert result.metrics["val_accuracy"] > 0.8
    return result.output_dir


def test_reward_model_ai_labeler_agrees_with_rule_following_humans_and_fills_no_overlap(
        committed, rule_reward_model, admin_client, tmp_path):
    with new_session() as session:
        admin, alice, bob, carol = (make_user(session, role=Role.admin), make_user(session), make_user(session),
                                    make_user(session))
        rm = make_model(session, rule_reward_model, name="rule-rm", kind=ModelKind.reward)
        prompt_set = make_prompt_set(session, k=4, overlap=2)
        groups = synthetic.ranked_groups(range(3000, 3013), k=4, seed=3)
        for group in groups[:12]:  # two humans follow the rule on 12 tasks; the 13th is unlabeled
            task = make_task(session, prompt_set, texts=group.responses, messages=group.messages)
            for human in (alice, bob):
                annotate(session, task, response_ids(task), human, group.ranks)
        make_task(session, prompt_set, texts=groups[12].responses, messages=groups[12].messages)
        session.commit()
        ai = ai_labelers.create_ai_labeler(session, username="rule-rm-judge", judge_model_id=rm.id)
        job = ai_labelers.start_ai_label_job(session, prompt_set_id=prompt_set.id, ai_user_id=ai.id,
                                             created_by_id=admin.id)
        ids = {"set": prompt_set.id, "ai": ai.id, "carol": carol.id, "admin": admin.id, "job": job.id}

    job = run(ids["job"], tmp_path)
    assert job.status == JobStatus.succeeded, job.traceback
    assert job.result["tasks"] == 13 and job.result["judge_kind"] == "reward"
    with new_session() as session:
        # Stored like a labeler's annotation: every response rated and ranked, comparisons expanded.
        stored = session.scalars(select(Annotation).where(Annotation.user_id == ids["ai"])).all()
        assert len(stored) == 13 and all(len(a.ratings) == 4 and a.comparisons for a in stored)
        # Never human overlap: label counts, progress and the lease order are the humans' alone.
        counts = sorted(session.scalars(select(Task.num_labels).where(Task.prompt_set_id == ids["set"])))
        assert counts == [0] + [2] * 12
        progress = set_progress(session, prompt_set_id=ids["set"])
        assert (progress.done, progress.labels_needed) == (12, 2)
        lease = lease_next_task(session, user=session.get(User, ids["carol"]), lease_s=600)
        assert lease is not None and lease.task.num_labels == 0  # the AI's label did not fill the 13th task
        # Its agreement with the human consensus is high; the humans' own figures leave it out.
        figures = compute_set_agreement(session, prompt_set_id=ids["set"])
        ai_row = next(f for f in figures.labelers if f.user_id == ids["ai"])
        assert ai_row.ai and ai_row.consensus_agreement > 0.8 and ai_row.consensus_pairs >= 40
        human_pairs = sum(training.ranked_pairs(group.ranks) for group in groups[:12])
        assert (figures.annotations, figures.pairwise_pairs, figures.pairwise_agreement) == (24, human_pairs, 1.0)
        assert figures.alpha_ratings == pytest.approx(1.0)  # the AI's neutral ratings are not in it
        # Training takes it only when asked.
        without = [a for part in training.reward_data(session, [ids["set"]]) for a in part]
        with_ai = [a for part in training.reward_data(session, [ids["set"]], include_ai=True) for a in part]
        assert (len(without), len(with_ai)) == (24, 37) and not any(a.ai for a in without)
        assert ranking_agreement(with_ai)[1] == ranking_agreement(without)[1]  # AI items never in the ceiling
        # "missing" finds nothing left; "all" ranks every task again, one annotation each.
        again = ai_labelers.start_ai_label_job(session, prompt_set_id=ids["set"], ai_user_id=ids["ai"],
                                               created_by_id=ids["admin"])
        redo = ai_labelers.start_ai_label_job(session, prompt_set_id=ids["set"], ai_user_id=ids["ai"],
                                              scope="all", created_by_id=ids["admin"])
        again_id, redo_id = again.id, redo.id
    assert run(again_id, tmp_path).result["tasks"] == 0
    assert run(redo_id, tmp_path).result["tasks"] == 13
    with new_session() as session:
        assert len(session.scalars(select(Annotation.id).where(Annotation.user_id == ids["ai"])).all()) == 13

    # The quality page shows it as AI, with its agreement.
    page = admin_client.get(f"/admin/prompt-sets/{ids['set']}/quality")
    assert page.status_code == 200
    row = page.text.split(f'id="labeler-{ids["ai"]}"')[1].split("</tr>")[0]
    assert "rule-rm-judge" in row and 'class="badge ai"' in row
    assert f"{100 * ai_row.consensus_agreement:.1f}%" in row


# ---- a judge model as AI labeler -------------------------------------------------------------

def test_judge_model_ai_labeler_ranks_every_task_asking_each_pair_twice(committed, tiny_model_dir, tmp_path):
    with new_session() as session:
        admin = make_user(session, role=Role.admin)
        sft = make_model(session, tiny_model_dir, name="tiny-sft", kind=ModelKind.sft)
        prompt_set = make_prompt_set(session, k=3, instructions="Rank by helpfulness.")
        tasks = [make_task(session, prompt_set, texts=["apple pie", "river", "good good lamp"]) for _ in range(3)]
        session.commit()
        ai = ai_labelers.create_ai_labeler(session, username="sft-judge", judge_model_id=sft.id)
        ai_labelers.update_ai_settings(session, prompt_set_id=prompt_set.id, principles="- Prefer food.")
        job = ai_labelers.start_ai_label_job(session, prompt_set_id=prompt_set.id, ai_user_id=ai.id,
                                             created_by_id=admin.id)
        ids = {"job": job.id, "ai": ai.id, "tasks": [t.id for t in tasks]}
    job = run(ids["job"], tmp_path)
    assert job.status == JobStatus.succeeded, job.traceback
    assert job.result["judge_kind"] == "judge" and job.result["tasks"] == 3
    assert job.result["pairs_judged"] == 9 and job.result["prompts_asked"] == 18  # 3 pairs x 2 orders per task
    assert 0.0 <= job.result["order_consistency"] <= 1.0
    with new_session() as session:
        for task_id in ids["tasks"]:
            ranks = session.scalars(select(Rating.rank).join(Annotation).where(
                Annotation.task_id == task_id, Annotation.user_id == ids["ai"])).all()
            assert len(ranks) == 3 and min(ranks) == 1 and all(1 <= r <= 3 for r in ranks)
            assert sorted(set(ranks)) == list(range(1, len(set(ranks)) + 1))  # dense: ties share a rank
            assert session.get(Task, task_id).num_labels == 0


# ---- pre-annotation ---------------------------------------------------------------------------

def test_pre_annotation_is_shown_on_a_fixed_half_and_records_shown_and_changed(session, client):
    admin, labeler = make_user(session, role=Role.admin), make_user(session)
    rm = make_model(session, "models/rm", kind=ModelKind.reward)
    ai = ai_labelers.create_ai_labeler(session, username="pre-ai", judge_model_id=rm.id)
    prompt_set = make_prompt_set(session, k=3, overlap=1)
    tasks = [make_task(session, prompt_set) for _ in range(12)]
    arms = {annotations.prefill_arm(t.id) for t in tasks}
    assert arms == {True, False}  # both halves among 12 tasks
    for task in tasks:  # the AI ranks in display order: A best
        ai_labelers.store_ranking(session, ai_user=ai, task_id=task.id, ranks=[1, 2, 3], now=task.created_at)
    session.commit()
    ai_labelers.update_ai_settings(session, prompt_set_id=prompt_set.id, pre_annotator_id=ai.id)

    # The labeling page: the AI's ranks pre-filled, with a notice, only on the shown half.
    login(client, labeler)
    page = client.get("/label")
    task_id = int(page.text.split('data-task-id="')[1].split('"')[0])
    task = session.get(Task, task_id)
    first = sorted(task.items, key=lambda i: i.position)[0].response_id
    shown = annotations.prefill_arm(task_id)
    assert ('id="prefill-notice"' in page.text) == shown
    assert (f'name="rank-{first}" value="1"' in page.text) == shown
    session.expire_all()

    # Submitting: half the labeler's rankings keep the AI's order, half reverse it.
    stored = {}
    for n in range(12):
        lease = lease_next_task(session, user=labeler, lease_s=600)
        order = [i.response_id for i in sorted(lease.task.items, key=lambda i: i.position)]
        keep = n % 2 == 0
        ranks = dict(zip(order, [1, 2, 3] if keep else [3, 2, 1]))
        result = annotations.submit_annotation(
            session, user=labeler, task_id=lease.task.id, ratings=dict.fromkeys(order, 4), ranks=ranks,
            idempotency_key=f"prefill-key-{n}", time_spent_s=10 if annotations.prefill_arm(lease.task.id) else 20,
            prefill_offered=True)  # as the labeling page submits
        stored[lease.task.id] = (result.annotation.id, keep)
    for task_id, (annotation_id, keep) in stored.items():
        annotation = session.get(Annotation, annotation_id)
        if annotations.prefill_arm(task_id):
            assert annotation.prefill_shown is True and annotation.prefill_changed is (not keep)
        else:
            assert annotation.prefill_shown is False and annotation.prefill_changed is None
    # AI annotations never reached the labeler's queue nor the task's count.
    assert all(session.get(Task, t).num_labels == 1 for t in stored)

    study = ai_labelers.prefill_study(session, prompt_set_id=prompt_set.id)
    n_shown = sum(annotations.prefill_arm(t) for t in stored)
    kept_shown = sum(keep for t, (_, keep) in stored.items() if annotations.prefill_arm(t))
    assert (study.shown.annotations, study.hidden.annotations) == (n_shown, 12 - n_shown)
    assert study.shown.mean_time_s == 10 and study.hidden.mean_time_s == 20
    assert study.shown.changed_rate == pytest.approx(1 - kept_shown / n_shown)
    assert study.shown.ai_agreement == pytest.approx(kept_shown / n_shown)  # kept: 3 pairs agree; reversed: none
    assert study.shown.ai_pairs == 3 * n_shown and study.pre_annotator == "pre-ai"

    client.cookies.clear()
    login(client, admin)
    page = client.get(f"/admin/prompt-sets/{prompt_set.id}/quality")
    assert 'id="prefill-study"' in page.text and "pre-ai" in page.text
    assert client.get(f"/api/v1/prompt-sets/{prompt_set.id}/prefill-study").json()["shown"]["annotations"] == n_shown

    # Another pre-annotator starts a fresh study: what labelers did beside the first is not its evidence.
    other = ai_labelers.create_ai_labeler(session, username="pre-ai-2", judge_model_id=rm.id)
    for task in tasks:
        ai_labelers.store_ranking(session, ai_user=other, task_id=task.id, ranks=[3, 2, 1], now=task.created_at)
    session.commit()
    ai_labelers.update_ai_settings(session, prompt_set_id=prompt_set.id, pre_annotator_id=other.id)
    fresh = ai_labelers.prefill_study(session, prompt_set_id=prompt_set.id)
    assert fresh.pre_annotator == "pre-ai-2"
    assert (fresh.shown.annotations, fresh.hidden.annotations, fresh.shown.ai_pairs) == (0, 0, 0)
    assert session.get(Annotation, stored[task_id][0]).prefill_user_id == ai.id


def test_an_api_submission_is_no_evidence_for_the_pre_annotation_study(session, client):
    rm = make_model(session, "models/rm", kind=ModelKind.reward)
    ai = ai_labelers.create_ai_labeler(session, username="pre-ai-api", judge_model_id=rm.id)
    labeler = make_user(session)
    prompt_set = make_prompt_set(session, k=2, overlap=1)
    task = next(t for t in (make_task(session, prompt_set) for _ in range(8)) if annotations.prefill_arm(t.id))
    for t in session.scalars(select(Task).where(Task.prompt_set_id == prompt_set.id)):
        ai_labelers.store_ranking(session, ai_user=ai, task_id=t.id, ranks=[1, 2], now=t.created_at)
    session.commit()
    ai_labelers.update_ai_settings(session, prompt_set_id=prompt_set.id, pre_annotator_id=ai.id)
    client.headers["X-CSRF-Token"] = login(client, labeler)
    while (nxt := client.get("/api/v1/label/next").json()["task"])["id"] != task.id:  # the shown half's task
        ids = [r["id"] for r in nxt["responses"]]
        client.post(f"/api/v1/label/{nxt['id']}", json={"idempotency_key": f"api-{nxt['id']}-key",
                                                        "ratings": dict.fromkeys(map(str, ids), 4),
                                                        "ranks": {str(ids[0]): 1, str(ids[1]): 2}})
    ids = [r["id"] for r in nxt["responses"]]
    done = client.post(f"/api/v1/label/{task.id}", json={"idempotency_key": "api-shown-key",
                                                        "ratings": dict.fromkeys(map(str, ids), 4),
                                                        "ranks": {str(ids[0]): 2, str(ids[1]): 1}})
    assert done.status_code == 201, done.text
    stored = session.scalar(select(Annotation).where(Annotation.task_id == task.id, Annotation.user_id == labeler.id))
    assert (stored.prefill_shown, stored.prefill_changed, stored.prefill_user_id) == (None, None, None)


def test_a_set_without_pre_annotation_records_nothing(session):
    labeler = make_user(session)
    prompt_set = make_prompt_set(session, k=2)
    task = make_task(session, prompt_set)
    lease_next_task(session, user=labeler, lease_s=600)
    ids = response_ids(task)
    result = annotations.submit_annotation(session, user=labeler, task_id=task.id, ratings={ids[0]: 5, ids[1]: 3},
                                           ranks={ids[0]: 1, ids[1]: 2}, idempotency_key="no-prefill-1")
    annotation = session.get(Annotation, result.annotation.id)
    assert annotation.prefill_shown is None and annotation.prefill_changed is None


# ---- accounts and settings --------------------------------------------------------------------

def test_ai_accounts_cannot_sign_in_nor_get_a_password(session, client):
    rm = make_model(session, "models/rm", kind=ModelKind.reward)
    ai = ai_labelers.create_ai_labeler(session, username="no-login-ai", judge_model_id=rm.id)
    assert ai.kind.value == "ai" and ai.is_ai and ai.role == Role.labeler
    with pytest.raises(Conflict, match="AI labeler"):
        users.set_password(session, user=ai, password="a-password-1")
    # Even with a password known to the database (set behind the service's back), sign-in refuses it.
    ai.password_hash = users.hash_password("a-password-1")
    session.commit()
    with pytest.raises(Invalid):
        auth.authenticate(session, username="no-login-ai", password="a-password-1", address="1.2.3.4",
                          max_failures=5, max_address_failures=20, window_s=60)
    page = client.post("/login", data={"username": "no-login-ai", "password": "a-password-1",
                                       "csrf_token": csrf_of(client)}, follow_redirects=False)
    assert page.status_code != 303 and "Wrong username or password" in page.text
    with pytest.raises(NotAllowed):
        auth.create_api_token(session, user=ai, name="sneaky")


def test_admins_create_ai_labelers_on_the_users_page_and_api(session, client_as):
    rm = make_model(session, "models/rm", kind=ModelKind.reward, name="rm-for-ai")
    labeler_client = client_as(Role.labeler)
    assert labeler_client.post("/admin/users/ai", data={"username": "x-ai", "judge_model_id": rm.id}).status_code == 403
    labeler_client.cookies.clear()
    labeler_client.headers.pop("X-CSRF-Token")
    client = client_as(Role.admin)
    page = client.post("/admin/users/ai", data={"username": "judge-one", "judge_model_id": str(rm.id)},
                       follow_redirects=True)
    assert page.status_code == 200 and "judge-one" in page.text and "judge rm-for-ai" in page.text
    bad = client.post("/admin/users/ai", data={"username": "judge-two", "judge_model_id": "999999"})
    assert bad.status_code == 422 and "choose a reward, SFT or policy model from the list" in bad.text
    made = client.post("/api/v1/users/ai", json={"username": "judge-api", "judge_model_id": rm.id})
    assert made.status_code == 201 and made.json()["kind"] == "ai" and made.json()["judge_model_id"] == rm.id


def test_ai_settings_and_runs_check_every_field(session):
    admin = make_user(session, role=Role.admin)
    rm = make_model(session, "models/rm", kind=ModelKind.reward)
    ai = ai_labelers.create_ai_labeler(session, username="set-ai", judge_model_id=rm.id)
    human = make_user(session)
    ranking = make_prompt_set(session)
    demo = make_prompt_set(session, kind=PromptSetKind.demonstration)
    with pytest.raises(Invalid) as error:
        ai_labelers.update_ai_settings(session, prompt_set_id=ranking.id, principles="x" * 10_001,
                                       pre_annotator_id=human.id)
    assert set(error.value.errors) == {"principles", "pre_annotator_id"}
    with pytest.raises(Conflict, match="not a ranking set"):
        ai_labelers.update_ai_settings(session, prompt_set_id=demo.id, principles="")
    with pytest.raises(Invalid) as error:
        ai_labelers.start_ai_label_job(session, prompt_set_id=ranking.id, ai_user_id=human.id, scope="some",
                                       created_by_id=admin.id)
    assert set(error.value.errors) == {"ai_user_id", "scope"}
    with pytest.raises(Invalid) as error:
        ai_labelers.create_ai_labeler(session, username="!", judge_model_id=None)
    assert set(error.value.errors) == {"username", "judge_model_id"}
    saved = ai_labelers.update_ai_settings(session, prompt_set_id=ranking.id, principles="- Be honest.\r\n",
                                           pre_annotator_id=str(ai.id))
    assert (saved.principles, saved.pre_annotator_id) == ("- Be honest.", ai.id)

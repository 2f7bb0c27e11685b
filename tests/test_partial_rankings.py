"""Partial (top-k) rankings and "all bad" submissions: validation, the expansion into
comparisons (pairs counted by hand), agreement, the reward model's data, exports and
the quality counts."""

from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from app.db.models import Annotation, Comparison, Rating
from app.services import annotations, export, training
from app.services.agreement import compute_set_agreement, ranking_agreement
from app.services.annotations import expand_comparisons
from app.services.assignment import lease_next_task
from app.services.errors import Invalid
from app.services.prompt_sets import create_prompt_set, update_prompt_set
from tests.conftest import login
from tests.factories import make_prompt_set, make_task, make_user
from trainer.cli_train import ranking_of

NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
A, B, C, D = 0, 1, 2, 3  # display positions


def _task(session, *, k=4, top_k=2, overlap=1):
    prompt_set = make_prompt_set(session, k=k, overlap=overlap, top_k=top_k)
    task = make_task(session, prompt_set)
    return prompt_set, task, [item.response_id for item in task.items]  # ids in display order A, B, C, D


def _submit(session, user, task, *, ratings=(7, 5, 3, 1), ranks=None, key=None, **kwargs):
    got = lease_next_task(session, user=user, now=NOW, lease_s=1800)
    assert got is not None and got.task.id == task.id
    ids = [item.response_id for item in task.items]
    return annotations.submit_annotation(
        session, user=user, task_id=task.id, now=NOW,
        ratings={rid: v for rid, v in zip(ids, ratings) if v is not None},
        ranks={rid: v for rid, v in zip(ids, ranks or ()) if v is not None},
        idempotency_key=key or f"key-{user.id:04d}-{task.id:04d}", **kwargs)


def _pairs_of(session, annotation_id):
    return sorted(session.execute(
        select(Comparison.chosen_response_id, Comparison.rejected_response_id, Comparison.rank_margin)
        .where(Comparison.annotation_id == annotation_id)).all())


# ---- the expansion, counted by hand (K = 4, k = 2) ----

def test_top_2_of_4_expands_to_the_ranked_pair_and_ranked_vs_unranked_pairs():
    # A and B ranked 1 and 2; C and D unranked, stored tied last (rank k + 1 = 3).
    ratings = {10: 7, 11: 5, 12: 3, 13: 1}
    pairs = {(p.chosen, p.rejected): p.rank_margin for p in expand_comparisons(ratings, {10: 1, 11: 2, 12: 3, 13: 3})}
    # 1 pair among the ranked (A>B) + 2 x 2 ranked vs unranked; none between C and D.
    assert pairs == {(10, 11): 1, (10, 12): 2, (10, 13): 2, (11, 12): 1, (11, 13): 1}
    # A tie among the ranked: no A-B pair, each still beats both unranked: 4 pairs.
    tied = {(p.chosen, p.rejected) for p in expand_comparisons(ratings, {10: 1, 11: 1, 12: 3, 13: 3})}
    assert tied == {(10, 12), (10, 13), (11, 12), (11, 13)}
    # "All bad" gives none, whatever ranks come with it.
    assert expand_comparisons(ratings, {10: 1, 11: 2, 12: 3, 13: 4}, all_bad=True) == []


def test_a_top_k_submission_stores_5_comparisons_and_the_unranked_tied_last(session):
    labeler = make_user(session)
    _, task, ids = _task(session)
    result = _submit(session, labeler, task, ranks=(1, 2, None, None))
    stored = session.get(Annotation, result.annotation.id)
    assert stored.top_k == 2 and not stored.all_bad and stored.all_bad_reason is None
    assert _pairs_of(session, stored.id) == sorted([
        (ids[A], ids[B], 1), (ids[A], ids[C], 2), (ids[A], ids[D], 2), (ids[B], ids[C], 1), (ids[B], ids[D], 1)])
    ranks = dict(session.execute(select(Rating.response_id, Rating.rank).where(Rating.annotation_id == stored.id)).all())
    assert ranks == {ids[A]: 1, ids[B]: 2, ids[C]: 3, ids[D]: 3}
    # The edit form shows the unranked ones as unranked, not as rank 3.
    assert annotations.submission_values(stored)["ranks"] == {ids[A]: "1", ids[B]: "2"}


def test_a_top_k_submission_with_a_tie_stores_4_comparisons(session):
    labeler = make_user(session)
    _, task, ids = _task(session)
    result = _submit(session, labeler, task, ranks=(None, 1, 1, None))
    assert _pairs_of(session, result.annotation.id) == sorted([
        (ids[B], ids[A], 2), (ids[B], ids[D], 2), (ids[C], ids[A], 2), (ids[C], ids[D], 2)])


def test_all_bad_stores_the_flag_and_reason_no_ranks_and_no_comparisons(session):
    labeler = make_user(session)
    _, task, ids = _task(session)
    # Ratings are optional with "all bad": two given, two left out.
    result = _submit(session, labeler, task, ratings=(2, None, 1, None), all_bad=True,
                     all_bad_reason="  Every answer ignores the question.  ")
    stored = session.get(Annotation, result.annotation.id)
    assert stored.all_bad and stored.all_bad_reason == "Every answer ignores the question."
    assert stored.top_k is None
    assert _pairs_of(session, stored.id) == []
    rows = session.execute(select(Rating.response_id, Rating.likert, Rating.rank)
                           .where(Rating.annotation_id == stored.id)).all()
    assert sorted(rows) == sorted([(ids[A], 2, None), (ids[B], None, None), (ids[C], 1, None), (ids[D], None, None)])
    values = annotations.submission_values(stored)
    assert values["all_bad"] and values["ranks"] == {} and values["ratings"] == {ids[A]: "2", ids[C]: "1"}


# ---- validation ----

def test_a_rank_beyond_k_and_too_few_ranked_are_refused_naming_the_field(session):
    labeler = make_user(session)
    _, task, ids = _task(session)
    with pytest.raises(Invalid) as beyond:
        _submit(session, labeler, task, ranks=(1, 2, 3, None))
    assert "only the best 2" in beyond.value.errors[f"rank-{ids[C]}"]
    with pytest.raises(Invalid) as few:
        _submit(session, labeler, task, ranks=(1, None, None, None))
    assert few.value.errors["ranks"].startswith("rank exactly 2 responses")
    with pytest.raises(Invalid) as unrated:
        _submit(session, labeler, task, ratings=(7, 5, 3, None), ranks=(1, 2, None, None))
    assert f"rating-{ids[D]}" in unrated.value.errors  # ratings stay required with top-k


def test_all_bad_needs_a_bounded_reason_and_no_ranking(session):
    labeler = make_user(session)
    _, task, _ = _task(session)
    for reason, message in ((None, "say why"), ("   ", "say why"), ("x" * 501, "at most 500 characters")):
        with pytest.raises(Invalid) as refused:
            _submit(session, labeler, task, all_bad=True, all_bad_reason=reason)
        assert message in refused.value.errors["all_bad_reason"]
    with pytest.raises(Invalid) as ranked:
        _submit(session, labeler, task, ranks=(1, 2, None, None), all_bad=True, all_bad_reason="all wrong")
    assert "no ranking" in ranked.value.errors["ranks"]


def test_the_api_refuses_a_rank_beyond_k_and_all_bad_without_reason_with_422(client, session):
    labeler = make_user(session)
    _, task, ids = _task(session)
    headers = {"X-CSRF-Token": login(client, labeler)}
    got = client.get("/api/v1/label/next").json()["task"]
    assert got["id"] == task.id and got["top_k"] == 2
    body = {"idempotency_key": "api-topk-0001", "ratings": {str(i): 4 for i in ids},
            "ranks": {str(ids[A]): 1, str(ids[B]): 3}}
    beyond = client.post(f"/api/v1/label/{task.id}", headers=headers, json=body)
    assert beyond.status_code == 422 and f"rank-{ids[B]}" in beyond.json()["errors"]
    no_reason = client.post(f"/api/v1/label/{task.id}", headers=headers,
                            json={"idempotency_key": "api-topk-0002", "all_bad": True})
    assert no_reason.status_code == 422 and "all_bad_reason" in no_reason.json()["errors"]
    ok = client.post(f"/api/v1/label/{task.id}", headers=headers,
                     json={"idempotency_key": "api-topk-0003", "all_bad": True, "all_bad_reason": "All off topic."})
    assert ok.status_code == 201, ok.text
    assert ok.json()["comparisons"] == 0


def test_top_k_setting_is_checked_against_k(session, admin_client):
    with pytest.raises(Invalid) as refused:
        create_prompt_set(session, name="topk-too-big", k=4, top_k=4)
    assert "less than K (4)" in refused.value.errors["top_k"]
    prompt_set = create_prompt_set(session, name="topk-ok", k=4, top_k="2")
    assert prompt_set.top_k == 2
    with pytest.raises(Invalid) as shrunk:
        update_prompt_set(session, prompt_set=prompt_set, k=2)  # top 2 of 2 is no partial ranking
    assert "top_k" in shrunk.value.errors
    update_prompt_set(session, prompt_set=prompt_set, top_k="")
    assert prompt_set.top_k is None
    api = admin_client.patch(f"/api/v1/prompt-sets/{prompt_set.id}", json={"top_k": 0})
    assert api.status_code == 422 and "top_k" in api.json()["errors"]
    assert admin_client.patch(f"/api/v1/prompt-sets/{prompt_set.id}", json={"top_k": 3}).json()["top_k"] == 3
    form = admin_client.post(f"/admin/prompt-sets/{prompt_set.id}/settings", data={
        "name": "topk-ok", "k": "4", "top_k": "9", "temperature": "1", "top_p": "0.95", "max_new_tokens": "16",
        "seed": "0", "overlap": "1", "train_ratio": "0.8", "validation_ratio": "0.1", "rl_ratio": "0.1"})
    assert form.status_code == 422 and "must be" in form.text


# ---- agreement ----

def test_agreement_leaves_out_pairs_of_two_unranked_responses_and_all_bad(session):
    ps, task, ids = _task(session, overlap=3)
    u, v, w = make_user(session), make_user(session), make_user(session)
    _submit(session, u, task, ranks=(1, 2, None, None))  # A > B > {C, D}
    _submit(session, v, task, ranks=(1, None, 2, None))  # A > C > {B, D}
    _submit(session, w, task, ratings=(None,) * 4, all_bad=True, all_bad_reason="none is usable")
    result = compute_set_agreement(session, prompt_set_id=ps.id)
    # Pairs both stated: AB, AC, AD agree; BC disagrees (u: B > C, v: C > B). CD (u: both
    # unranked) and BD (v: both unranked) are no preference and are not counted at all.
    assert (result.pairwise_agreement, result.pairwise_pairs) == (0.75, 4)
    assert result.tie_rate == 0.0
    assert result.kendall_tau_b == pytest.approx((3 - 1) / 4)  # no ties left: (nc - nd) / n0
    by_user = {f.user_id: f for f in result.labelers}
    assert by_user[u.id].consensus_agreement == 0.75 and by_user[u.id].consensus_pairs == 4
    assert by_user[w.id].consensus_pairs == 0 and by_user[w.id].all_bad == 1
    assert result.all_bad == 1 and result.annotations == 3
    assert sum(by_user[w.id].rating_histogram) == 0  # no ratings given with "all bad"


def test_ranking_agreement_on_partial_rankings_and_all_bad():
    responses = ["a", "b", "c", "d"]
    items = [
        export.RankedAnnotation(1, 7, "train", [], responses, [1, 2, 3, 3], top_k=2),
        export.RankedAnnotation(2, 7, "train", [], responses, [1, 3, 2, 3], top_k=2),
        # "All bad" ranks nothing, whatever ranks it carries: it would disagree on every pair.
        export.RankedAnnotation(3, 7, "train", [], responses, [4, 3, 2, 1], all_bad=True),
    ]
    assert ranking_agreement(items) == (0.75, 4)


# ---- the reward model's data and the exports ----

def test_training_data_has_the_partial_ranking_and_not_all_bad(session):
    ps, task, ids = _task(session, overlap=2)
    u, w = make_user(session), make_user(session)
    partial = _submit(session, u, task, ranks=(2, 1, None, None)).annotation.id
    _submit(session, w, task, all_bad=True, all_bad_reason="nothing answers it")
    items = list(export.iter_ranked_annotations(session, [ps.id]))
    assert [item.annotation_id for item in items] == [partial]
    assert items[0].ranks == [2, 1, 3, 3] and items[0].top_k == 2
    # The trainer's pairs (a strictly better rank wins) are the 5 stored comparisons.
    assert training.ranked_pairs(items[0].ranks) == 5 == len(_pairs_of(session, partial))
    train, val = training.reward_data(session, [ps.id])
    assert [i.annotation_id for i in train + val] == [partial]


def test_exports_carry_top_k_and_all_bad_and_all_bad_has_no_comparison(session):
    ps, task, ids = _task(session, overlap=2)
    u, w = make_user(session), make_user(session)
    partial = _submit(session, u, task, ranks=(1, 2, None, None)).annotation.id
    bad = _submit(session, w, task, ratings=(None,) * 4, all_bad=True, all_bad_reason="=all wrong").annotation.id
    filters = export.parse_filters(prompt_set_ids=[ps.id])
    rows = list(export.iter_rows(session, export.plan_export(session, kind="annotations", fmt="jsonl",
                                                             filters=filters)))
    by_id = {row["annotation_id"]: row for row in rows}
    assert by_id[bad]["all_bad"] is True and by_id[bad]["all_bad_reason"] == "=all wrong"
    assert [r["rank"] for r in by_id[bad]["ratings"]] == [None] * 4
    assert by_id[partial]["all_bad"] is False and by_id[partial]["top_k"] == 2
    comparisons = list(export.iter_rows(session, export.plan_export(session, kind="comparisons", fmt="plain",
                                                                    filters=filters)))
    assert {row["annotation_id"] for row in comparisons} == {partial} and len(comparisons) == 5
    csv_plan = export.plan_export(session, kind="annotations", fmt="csv", filters=filters)
    text = b"".join(export.iter_export(session, csv_plan)).decode()
    assert "all_bad,all_bad_reason" in text.splitlines()[0] and "'=all wrong" in text
    # The command-line trainer reads the annotations export the same way: "all bad" ranks nothing.
    assert ranking_of(by_id[bad], "line 2") is None
    assert ranking_of(by_id[partial], "line 1").ranks == [1, 2, 3, 3]


# ---- pages ----

def test_label_page_with_top_k_shows_k_slots_and_the_all_bad_box(client, session):
    labeler = make_user(session)
    _, task, _ = _task(session)
    login(client, labeler)
    html = client.get("/label").text
    assert 'data-top-k="2"' in html and "Not ranked · tied last" in html
    assert 'data-rank="3"' not in html and 'data-rank="2"' in html
    assert 'name="all_bad"' in html and "<kbd>X</kbd> marks all responses unacceptable" in html


def test_an_all_bad_form_without_reason_comes_back_with_the_field_marked(client, session):
    labeler = make_user(session)
    _, task, ids = _task(session)
    token = login(client, labeler)
    html = client.get("/label").text
    key = html.split('name="idempotency_key" value="')[1].split('"')[0]
    refused = client.post(f"/label/{task.id}/submit", headers={"HX-Request": "true"},
                          data={"csrf_token": token, "idempotency_key": key, "all_bad": "true", "all_bad_reason": ""})
    assert refused.status_code == 422
    assert 'id="error-all_bad_reason"' in refused.text and "checked" in refused.text.split('id="all-bad-check"')[1][:40]


def test_quality_page_counts_all_bad_per_set_and_labeler(admin_client, session):
    ps, task, _ = _task(session, overlap=2)
    u, w = make_user(session, username="pr-ann"), make_user(session, username="pr-wes")
    _submit(session, u, task, ranks=(1, 2, None, None))
    _submit(session, w, task, all_bad=True, all_bad_reason="all made up")
    html = admin_client.get(f"/admin/prompt-sets/{ps.id}/quality").text
    assert '<strong id="all-bad-count">1</strong>' in html
    row = html.split('data-username="pr-wes"')[1].split("</tr>")[0]
    assert 'class="num all-bad-count" data-value="1"' in row
    history_client_row = html.split('data-username="pr-ann"')[1].split("</tr>")[0]
    assert 'class="num all-bad-count" data-value="0"' in history_client_row


def test_history_shows_an_all_bad_submission(client, session):
    labeler = make_user(session)
    _, task, _ = _task(session)
    _submit(session, labeler, task, all_bad=True, all_bad_reason="none is safe")
    login(client, labeler)
    html = client.get("/label/history").text
    assert 'class="badge all-bad" title="none is safe"' in html

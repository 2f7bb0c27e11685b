"""Review and correction: the queue by disagreement, accepting, correcting for training
or as gold, and what each does to the training data and exports (nothing deleted)."""

import json

import pytest
from sqlalchemy import func, select

from app.db.enums import Role
from app.db.models import Annotation, Comparison, Rating, Task, TaskReview
from app.services import export, review, training
from app.services.errors import Conflict, Invalid, NotFound
from tests.conftest import login
from tests.factories import annotate, make_prompt_set, make_task, make_user, task_with_ids


@pytest.fixture
def labeled(session):
    """Three tasks of K = 3: `split` where ann and bob rank oppositely, `agreed` where they
    agree, `single` with ann alone; and an unlabeled one."""
    ps = make_prompt_set(session, k=3, overlap=2)
    ann, bob = make_user(session, username="r-ann"), make_user(session, username="r-bob")
    admin = make_user(session, role=Role.admin, username="r-chief")
    agreed, agreed_ids = task_with_ids(session, ps)
    annotate(session, agreed, agreed_ids, ann, [1, 2, 3])
    annotate(session, agreed, agreed_ids, bob, [1, 2, 3])
    split, split_ids = task_with_ids(session, ps)
    annotate(session, split, split_ids, ann, [1, 2, 3])
    annotate(session, split, split_ids, bob, [3, 2, 1], flags=["unsafe"])
    single, single_ids = task_with_ids(session, ps)
    annotate(session, single, single_ids, ann, [2, 1, 3])
    unlabeled = make_task(session, ps)
    session.commit()
    return {"set": ps, "admin": admin, "ann": ann, "bob": bob, "agreed": (agreed, agreed_ids),
            "split": (split, split_ids), "single": (single, single_ids), "unlabeled": unlabeled}


def _stored(session):
    """Everything the labelers stored: a review must leave it as it was."""
    session.expire_all()
    return (sorted(session.execute(select(Annotation.id, Annotation.user_id, Annotation.excluded))),
            sorted(session.execute(select(Rating.annotation_id, Rating.response_id, Rating.rank, Rating.likert))),
            sorted(session.execute(select(Comparison.annotation_id, Comparison.chosen_response_id,
                                          Comparison.rejected_response_id))))


def _training_pairs(session, set_id: int, task: Task) -> list[tuple[int | None, int | None, list[int]]]:
    """(annotation, review, ranks) of the reward model's items for the task's prompt."""
    train, validation = training.reward_data(session, [set_id])
    return sorted(((a.annotation_id, a.review_id, a.ranks) for a in train + validation
                   if a.prompt_id == task.prompt_id), key=str)


def test_queue_orders_labeled_tasks_by_disagreement(session, labeled):
    items = review.review_queue(session, prompt_set_id=labeled["set"].id)
    assert [i.task_id for i in items] == [labeled["split"][0].id, labeled["agreed"][0].id, labeled["single"][0].id]
    assert items[0].disagreement == 1.0 and items[1].disagreement == 0.0 and items[2].disagreement is None
    assert items[0].compared == 3 and items[0].labels == 2

    review.accept_task(session, prompt_set_id=labeled["set"].id, task_id=labeled["split"][0].id,
                       reviewer=labeled["admin"])
    open_ids = [i.task_id for i in review.review_queue(session, prompt_set_id=labeled["set"].id)]
    assert labeled["split"][0].id not in open_ids
    reviewed = review.review_queue(session, prompt_set_id=labeled["set"].id, show="reviewed")
    assert [(i.task_id, i.status) for i in reviewed] == [(labeled["split"][0].id, "accepted")]
    assert review.review_counts(session, prompt_set_id=labeled["set"].id).accepted == 1
    with pytest.raises(Invalid) as error:
        review.review_queue(session, prompt_set_id=labeled["set"].id, show="nope")
    assert "show" in error.value.errors


def test_a_correction_changes_the_training_data_and_deletes_nothing(session, labeled):
    ps, admin = labeled["set"], labeled["admin"]
    task, ids = labeled["split"]
    stored = _stored(session)
    before = _training_pairs(session, ps.id, task)
    assert len(before) == 2 and all(review_id is None for _, review_id, _ in before)

    # The reviewer says: the middle response is best, then the last, then the first.
    correction = review.correct_task(session, prompt_set_id=ps.id, task_id=task.id, reviewer=admin,
                                     ranking={ids[0]: 3, ids[1]: 1, ids[2]: 2}, use="training", note="B is right")
    assert correction.reviewer_id == admin.id and correction.created_at is not None

    # The reward model's data: the correction alone stands for the task, its ranks in display order.
    after = _training_pairs(session, ps.id, task)
    assert len(after) == 1
    annotation_id, review_id, ranks = after[0]
    assert annotation_id is None and review_id == correction.id
    by_position = {item.response_id: item.position for item in task.items}
    expected = {ids[0]: 3, ids[1]: 1, ids[2]: 2}
    assert ranks == [expected[rid] for rid in sorted(ids, key=by_position.get)]
    # The other tasks' annotations are untouched in the data.
    assert len(_training_pairs(session, ps.id, labeled["agreed"][0])) == 2
    # The labelers' annotations, ratings and comparisons are all still stored.
    assert _stored(session) == stored

    # The comparisons export (what TRL reads): the correction's three pairs, attributed to the reviewer.
    plan = export.plan_export(session, kind="comparisons", fmt="plain",
                              filters=export.parse_filters(prompt_set_ids=ps.id))
    rows = [r for r in export.iter_rows(session, plan) if r["task_id"] == task.id]
    pairs = {(r["chosen"], r["rejected"]) for r in rows}
    text = {item.response_id: item.response.text for item in task.items}
    assert pairs == {(text[ids[1]], text[ids[2]]), (text[ids[1]], text[ids[0]]), (text[ids[2]], text[ids[0]])}
    assert all(r["review"] == "corrected:training" and r["review_id"] == correction.id
               and r["labeler_id"] == admin.id and r["comparison_id"] is None for r in rows)
    assert export.count_rows(session, plan) == len(list(export.iter_rows(session, plan)))
    # The annotations export keeps both labelers' annotations, marked.
    plan = export.plan_export(session, kind="annotations", fmt="jsonl",
                              filters=export.parse_filters(prompt_set_ids=ps.id))
    marked = [r for r in export.iter_rows(session, plan) if r["task_id"] == task.id]
    assert len(marked) == 2 and {r["review"] for r in marked} == {"corrected:training"}
    others = [r for r in export.iter_rows(session, plan) if r["task_id"] != task.id]
    assert {r["review"] for r in others} == {None}

    # A later review is the task's state: accepting it puts the labelers' annotations back.
    review.accept_task(session, prompt_set_id=ps.id, task_id=task.id, reviewer=admin)
    assert _training_pairs(session, ps.id, task) == before
    assert session.scalar(select(func.count(TaskReview.id)).where(TaskReview.task_id == task.id)) == 2


def test_a_correction_stands_in_only_for_the_labelers_a_filter_keeps(session, labeled):
    ps, admin = labeled["set"], labeled["admin"]
    task, ids = labeled["single"]  # ann's alone
    review.correct_task(session, prompt_set_id=ps.id, task_id=task.id, reviewer=admin,
                        ranking={ids[0]: 1, ids[1]: 2, ids[2]: 2}, use="training")
    of = lambda user: [a for a in export.iter_ranked_annotations(session, [ps.id], user_ids=[user.id])  # noqa: E731
                       if a.prompt_id == task.prompt_id]
    assert [a.review_id is not None for a in of(labeled["ann"])] == [True]
    assert of(labeled["bob"]) == []


def test_a_gold_correction_makes_the_task_gold(session, labeled):
    ps, admin = labeled["set"], labeled["admin"]
    task, ids = labeled["split"]
    review.correct_task(session, prompt_set_id=ps.id, task_id=task.id, reviewer=admin,
                        ranking={str(ids[0]): "1", str(ids[1]): "2", str(ids[2]): "3"}, use="gold")
    session.refresh(task)
    assert task.is_gold and task.gold_ranking == {str(ids[0]): 1, str(ids[1]): 2, str(ids[2]): 3}
    # Gold tasks test the labelers; they leave the training data.
    assert _training_pairs(session, ps.id, task) == []
    assert review.review_counts(session, prompt_set_id=ps.id).gold == 1


def test_bad_reviews_are_refused_naming_the_field(session, labeled):
    ps, admin = labeled["set"], labeled["admin"]
    task, ids = labeled["split"]
    with pytest.raises(Invalid) as error:
        review.correct_task(session, prompt_set_id=ps.id, task_id=task.id, reviewer=admin,
                            ranking={ids[0]: 1, ids[1]: 9}, use="elsewhere")
    assert {"use", f"rank_{ids[1]}", f"rank_{ids[2]}"} <= error.value.errors.keys()
    with pytest.raises(Invalid) as error:
        review.correct_task(session, prompt_set_id=ps.id, task_id=task.id, reviewer=admin,
                            ranking={i: 1 for i in ids}, use="training")
    assert "ranking" in error.value.errors
    with pytest.raises(Invalid) as error:
        review.accept_task(session, prompt_set_id=ps.id, task_id=task.id, reviewer=admin, note="x" * 5000)
    assert "note" in error.value.errors
    with pytest.raises(Conflict):
        review.accept_task(session, prompt_set_id=ps.id, task_id=labeled["unlabeled"].id, reviewer=admin)
    other = make_prompt_set(session)
    with pytest.raises(NotFound):
        review.accept_task(session, prompt_set_id=other.id, task_id=task.id, reviewer=admin)
    session.rollback()
    assert session.scalar(select(func.count(TaskReview.id))) == 0


# ---- pages ---------------------------------------------------------------------------------

def signed_in(client, user):
    """The client signed in as this user (posts carry the session's CSRF token)."""
    client.headers.pop("X-CSRF-Token", None)
    client.cookies.clear()
    client.headers["X-CSRF-Token"] = login(client, user)
    return client


def test_admin_reviews_and_corrects_through_the_pages(client, session, labeled):
    ps = labeled["set"]
    task, ids = labeled["split"]
    admin = signed_in(client, labeled["admin"])
    queue = admin.get(f"/admin/prompt-sets/{ps.id}/review")
    assert queue.status_code == 200
    assert queue.text.index(f'data-task="{task.id}"') < queue.text.index(f'data-task="{labeled["agreed"][0].id}"')

    page = admin.get(f"/admin/prompt-sets/{ps.id}/review/{task.id}")
    assert page.status_code == 200
    assert 'data-labeler="r-ann"' in page.text and 'data-labeler="r-bob"' in page.text
    assert "unsafe" in page.text and "Consensus" in page.text

    token = admin.headers["X-CSRF-Token"]
    bad = admin.post(f"/admin/prompt-sets/{ps.id}/review/{task.id}/correct",
                     data={"csrf_token": token, f"rank_{ids[0]}": "1", f"rank_{ids[1]}": "seven",
                           f"rank_{ids[2]}": "2", "use": "training"})
    assert bad.status_code == 422 and "rank must be a whole number" in bad.text
    assert admin.post(f"/admin/prompt-sets/{ps.id}/review/{task.id}/correct",
                      data={"csrf_token": token, "use": "training"}).status_code == 422
    assert admin.post(f"/admin/prompt-sets/{ps.id}/review/{labeled['unlabeled'].id}/accept",
                      data={"csrf_token": token}).status_code == 409
    assert admin.get(f"/admin/prompt-sets/{ps.id}/review/999999").status_code == 404
    assert admin.get(f"/admin/prompt-sets/{ps.id}/review?show=everything").status_code == 422

    done = admin.post(f"/admin/prompt-sets/{ps.id}/review/{task.id}/correct",
                      data={"csrf_token": token, f"rank_{ids[0]}": "2", f"rank_{ids[1]}": "1",
                            f"rank_{ids[2]}": "3", "use": "training", "note": "checked"})
    assert done.status_code == 303
    # On to the next open task, the most disagreed one left.
    assert done.headers["location"].endswith(f"/review/{labeled['agreed'][0].id}")
    page = admin.get(f"/admin/prompt-sets/{ps.id}/review/{task.id}")
    assert "corrected" in page.text and "r-chief" in page.text and "checked" in page.text
    quality = admin.get(f"/admin/prompt-sets/{ps.id}/quality")
    assert "1 corrected for training" in quality.text

    labeler = signed_in(client, labeled["ann"])
    assert labeler.get(f"/admin/prompt-sets/{ps.id}/review/{task.id}").status_code == 403
    assert labeler.post(f"/admin/prompt-sets/{ps.id}/review/{task.id}/accept").status_code == 403
    assert session.scalar(select(func.count(TaskReview.id))) == 1
    row = session.scalar(select(TaskReview))
    assert json.loads(json.dumps(row.ranking)) == {str(ids[0]): 2, str(ids[1]): 1, str(ids[2]): 3}


def test_the_json_api_reviews_and_lists_the_queue(client, session, labeled):
    ps = labeled["set"]
    task, ids = labeled["split"]
    api = signed_in(client, labeled["admin"])
    queue = api.get(f"/api/v1/prompt-sets/{ps.id}/review-queue")
    assert queue.status_code == 200 and queue.json()[0]["task_id"] == task.id
    assert queue.json()[0]["disagreement"] == 1.0
    url = f"/api/v1/prompt-sets/{ps.id}/tasks/{task.id}/reviews"
    bad = api.post(url, json={"decision": "corrected", "ranking": {str(ids[0]): 1}, "use": "training"})
    assert bad.status_code == 422 and f"rank_{ids[1]}" in bad.text
    assert api.post(url, json={"decision": "accepted", "use": "gold"}).status_code == 422
    assert api.post(url, json={"decision": "maybe"}).status_code == 422
    made = api.post(url, json={"decision": "corrected", "ranking": {str(i): r for i, r in zip(ids, (2, 1, 3))},
                               "use": "training", "note": "via the API"})
    assert made.status_code == 201, made.text
    assert made.json()["reviewer_id"] == labeled["admin"].id and made.json()["ranking"][str(ids[1])] == 1
    reviewed = api.get(f"/api/v1/prompt-sets/{ps.id}/review-queue?show=reviewed").json()
    assert [(r["task_id"], r["review"]["id"]) for r in reviewed] == [(task.id, made.json()["id"])]
    other = make_prompt_set(session)
    session.commit()
    assert api.post(f"/api/v1/prompt-sets/{other.id}/tasks/{task.id}/reviews",
                    json={"decision": "accepted"}).status_code == 404

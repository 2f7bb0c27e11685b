"""Labelers of a set: allowed list, exclusion and re-inclusion, deactivation."""

from datetime import timedelta

import pytest
from sqlalchemy import select

from app.db.base import utcnow
from app.db.enums import AssignmentStatus, Role
from app.db.models import Annotation, Assignment, User
from app.services import export, labelers, users
from app.services.agreement import compute_set_agreement
from app.services.errors import Invalid, NotAllowed, NotFound
from tests.conftest import login
from tests.factories import TEST_PASSWORD, annotate, make_prompt_set, make_user, task_with_ids


def _lease(session, task, user, *, minutes=30):
    a = Assignment(task_id=task.id, user_id=user.id, status=AssignmentStatus.active,
                   expires_at=utcnow() + timedelta(minutes=minutes))
    session.add(a)
    session.flush()
    return a


def test_a_set_without_allowed_labelers_is_open_to_all(session):
    ps = make_prompt_set(session, k=3, overlap=2)
    ann, bob = make_user(session), make_user(session)
    assert labelers.is_allowed(session, prompt_set_id=ps.id, user_id=ann.id)
    labelers.allow_labeler(session, prompt_set_id=ps.id, username=ann.username)
    labelers.allow_labeler(session, prompt_set_id=ps.id, user_id=ann.id)  # twice is harmless
    assert [u.id for u in labelers.allowed_labelers(session, prompt_set_id=ps.id)] == [ann.id]
    assert labelers.is_allowed(session, prompt_set_id=ps.id, user_id=ann.id)
    assert not labelers.is_allowed(session, prompt_set_id=ps.id, user_id=bob.id)
    assert bob.id in [u.id for u in labelers.labeler_choices(session, prompt_set_id=ps.id)]
    assert ann.id not in [u.id for u in labelers.labeler_choices(session, prompt_set_id=ps.id)]


def test_allowing_refuses_unknown_names_and_engineers(session):
    ps = make_prompt_set(session, k=3, overlap=2)
    engineer = make_user(session, role=Role.engineer)
    with pytest.raises(Invalid, match="No user named 'nobody'"):
        labelers.allow_labeler(session, prompt_set_id=ps.id, username="nobody")
    with pytest.raises(Invalid, match="engineer account"):
        labelers.allow_labeler(session, prompt_set_id=ps.id, user_id=engineer.id)
    with pytest.raises(NotFound):
        labelers.allow_labeler(session, prompt_set_id=999_999, user_id=engineer.id)
    assert labelers.allowed_labelers(session, prompt_set_id=ps.id) == []


def test_disallowing_releases_the_labelers_leases_on_that_set_only(session):
    ps, other = make_prompt_set(session, k=3, overlap=2), make_prompt_set(session, k=3, overlap=2)
    ann, bob = make_user(session), make_user(session)
    for u in (ann, bob):
        labelers.allow_labeler(session, prompt_set_id=ps.id, user_id=u.id)
    task, _ = task_with_ids(session, ps)
    other_task, _ = task_with_ids(session, other)
    here, there = _lease(session, task, ann), _lease(session, other_task, ann)
    labelers.disallow_labeler(session, prompt_set_id=ps.id, user_id=ann.id)
    assert [u.id for u in labelers.allowed_labelers(session, prompt_set_id=ps.id)] == [bob.id]
    session.refresh(here), session.refresh(there)
    assert here.status == AssignmentStatus.released and here.finished_at is not None
    assert there.status == AssignmentStatus.active
    # Removing the last name opens the set again: bob keeps his lease.
    bobs = _lease(session, task, bob)
    labelers.disallow_labeler(session, prompt_set_id=ps.id, user_id=bob.id)
    session.refresh(bobs)
    assert bobs.status == AssignmentStatus.active
    assert labelers.is_allowed(session, prompt_set_id=ps.id, user_id=ann.id)


def test_deactivating_a_labeler_releases_every_open_lease_at_once(session):
    ps, other = make_prompt_set(session, k=3, overlap=2), make_prompt_set(session, k=3, overlap=2)
    ann, bob = make_user(session), make_user(session)
    t1, _ = task_with_ids(session, ps)
    t2, _ = task_with_ids(session, other)
    leases = [_lease(session, t1, ann), _lease(session, t2, ann)]
    bobs = _lease(session, t1, bob)
    done = Assignment(task_id=t2.id, user_id=bob.id, status=AssignmentStatus.submitted,
                      expires_at=utcnow(), finished_at=utcnow() - timedelta(hours=1))
    session.add(done)
    session.flush()
    users.set_active(session, user=ann, active=False)
    for lease in leases:
        session.refresh(lease)
        assert lease.status == AssignmentStatus.released
        assert lease.finished_at is not None
    session.refresh(bobs)
    assert bobs.status == AssignmentStatus.active
    assert not ann.is_active
    # Nothing active is left for ann: her tasks are free for others now.
    assert session.scalar(select(Assignment.id).where(Assignment.user_id == ann.id,
                                                      Assignment.status == AssignmentStatus.active)) is None


def _two_labeler_set(session):
    ps = make_prompt_set(session, k=3, overlap=2)
    good, odd = make_user(session), make_user(session)
    for _ in range(3):
        task, ids = task_with_ids(session, ps)
        annotate(session, task, ids, good, [1, 2, 3])
        annotate(session, task, ids, odd, [3, 2, 1])
    return ps, good, odd


def _training_comparisons(session, ps):
    return session.execute(export.included_comparisons_query([ps.id])).all()


def test_excluded_annotations_leave_export_training_and_figures_and_come_back(session):
    ps, good, odd = _two_labeler_set(session)
    before = _training_comparisons(session, ps)
    assert {r.labeler_id for r in before} == {good.id, odd.id} and len(before) == 18

    changed = labelers.set_excluded(session, user_id=odd.id, prompt_set_id=ps.id, excluded=True)
    assert changed == 3
    # Stored still, only flagged.
    assert session.scalar(select(Annotation.id).where(Annotation.user_id == odd.id).limit(1)) is not None
    assert {r.labeler_id for r in _training_comparisons(session, ps)} == {good.id}
    plan = export.plan_export(session, kind="comparisons", fmt="plain",
                              filters=export.parse_filters(prompt_set_ids=ps.id))
    assert {row["labeler_id"] for row in export.iter_rows(session, plan)} == {good.id}
    plan = export.plan_export(session, kind="annotations", fmt="jsonl",
                              filters=export.parse_filters(prompt_set_ids=ps.id))
    assert {row["labeler_id"] for row in export.iter_rows(session, plan)} == {good.id}
    groups = list(export.iter_ranked_groups(session, [ps.id]))
    assert len(groups) == 3
    for _, texts, ranks in groups:  # good ranked answer i at i + 1
        assert [int(t.split()[1]) + 1 for t in texts] == ranks
    assert [f.user_id for f in compute_set_agreement(session, prompt_set_id=ps.id).labelers] == [good.id]

    assert labelers.set_excluded(session, user_id=odd.id, prompt_set_id=ps.id, excluded=False) == 3
    assert sorted(_training_comparisons(session, ps)) == sorted(before)


def test_exclusion_per_set_or_everywhere(session):
    ps, good, odd = _two_labeler_set(session)
    other = make_prompt_set(session, k=3, overlap=2)
    task, ids = task_with_ids(session, other)
    annotate(session, task, ids, odd, [1, 2, 3])
    labelers.set_excluded(session, user_id=odd.id, prompt_set_id=ps.id, excluded=True)
    assert {r.labeler_id for r in _training_comparisons(session, other)} == {odd.id}
    assert labelers.set_excluded(session, user_id=odd.id, excluded=True) == 1  # the other set's one
    assert _training_comparisons(session, other) == []
    assert labelers.set_excluded(session, user_id=odd.id, excluded=False) == 4
    assert len(_training_comparisons(session, other)) == 3
    with pytest.raises(NotFound):
        labelers.set_excluded(session, user_id=999_999, excluded=True)


def test_labeler_rows_join_accounts_exclusion_and_figures(session):
    ps, good, odd = _two_labeler_set(session)
    labelers.set_excluded(session, user_id=odd.id, prompt_set_id=ps.id, excluded=True)
    rows = {r.user_id: r for r in labelers.labeler_rows(session, prompt_set_id=ps.id)}
    assert set(rows) == {good.id, odd.id}
    assert rows[odd.id].fully_excluded and rows[odd.id].figures is None and rows[odd.id].excluded == 3
    assert rows[good.id].annotations == 3 and rows[good.id].excluded == 0
    assert rows[good.id].figures.tasks == 3
    only = labelers.labeler_rows(session, prompt_set_id=ps.id, user_id=good.id)
    assert [r.user_id for r in only] == [good.id]


def test_an_admin_cannot_deactivate_their_own_account_by_page_api_or_service(client, session):
    admin, other = make_user(session, role=Role.admin), make_user(session, role=Role.admin)
    token = login(client, admin)
    headers = {"X-CSRF-Token": token}
    refused = client.patch(f"/api/v1/users/{admin.id}", headers=headers,
                           json={"is_active": False, "password": "a-new-password-1"})
    assert refused.status_code == 403 and "your own account" in refused.json()["detail"]
    page = client.post(f"/admin/users/{admin.id}/active", headers=headers, data={"active": "false"})
    assert page.status_code == 403
    with pytest.raises(NotAllowed, match="your own account"):
        users.set_active(session, user=admin, active=False, by=admin)
    session.refresh(admin)
    assert admin.is_active and users.verify_password(TEST_PASSWORD, admin.password_hash)
    # Another admin's account, and re-activating one's own, are fine.
    assert client.patch(f"/api/v1/users/{other.id}", headers=headers, json={"is_active": False}).status_code == 200
    assert client.patch(f"/api/v1/users/{admin.id}", headers=headers, json={"is_active": True}).status_code == 200
    assert not session.get(User, other.id).is_active

"""Labeler trust: figures, rules and their reasons, quarantine through the real submit,
and lifting it (everything comes back)."""

import random
from datetime import timedelta

import pytest
from app.db.base import utcnow
from app.db.enums import Role
from app.db.models import Annotation, LabelerTrust
from app.services import annotations, export, labelers, trust
from app.services.agreement import compute_set_agreement
from app.services.assignment import lease_next_task
from app.services.errors import Invalid
from tests.conftest import login
from tests.factories import annotate, make_prompt_set, make_task, make_user, task_with_ids

LEASE_S = 1800


def submit(session, user, *, ranks_of, likert_of, seconds: float, now) -> Annotation | None:
    """Lease the labeler's next task and submit a ranking of it through the labeling service,
    `seconds` after the lease, as the browser reports the time spent."""
    lease = lease_next_task(session, user=user, lease_s=LEASE_S, now=now)
    if lease is None:
        return None
    ids = sorted(item.response_id for item in lease.task.items)
    ranks = ranks_of(ids)
    result = annotations.submit_annotation(
        session, user=user, task_id=lease.task.id, ratings={rid: likert_of(rid, ranks[rid]) for rid in ids},
        ranks=ranks, time_spent_s=seconds, idempotency_key=f"trust-key-{user.id}-{lease.task.id}",
        now=now + timedelta(seconds=seconds))
    return session.get(Annotation, result.annotation.id)


def _trust_row(session, set_id, user):
    rows = trust.trust_rows(session, prompt_set_id=set_id, user_id=user.id)
    return rows[0] if rows else None


def _exported_labelers(session, set_id, kind="annotations", fmt="jsonl"):
    plan = export.plan_export(session, kind=kind, fmt=fmt, filters=export.parse_filters(prompt_set_ids=set_id))
    return [row["labeler_id"] for row in export.iter_rows(session, plan)]


def test_a_random_two_second_labeler_is_flagged_within_20_tasks_and_quarantined(session):
    """Two careful labelers (30-60 s per task, ranking by the responses' true order with
    a little noise) and a spammer who ranks at random in 2 s, on a set that
    quarantines automatically: the rules flag the spammer within 20 of their tasks,
    and from then on their annotations stay out of the export and the agreement."""
    ps = make_prompt_set(session, k=4, overlap=3, trust_rules={"auto_quarantine": True})
    ann, bob, rex = (make_user(session, username=n) for n in ("t-ann", "t-bob", "t-rex"))
    for _ in range(30):
        make_task(session, ps)
    session.commit()
    rng = random.Random(7)

    def careful(ids):  # the true order is the sample order, with an occasional swap
        order = list(ids)
        if rng.random() < 0.2:
            i = rng.randrange(len(order) - 1)
            order[i], order[i + 1] = order[i + 1], order[i]
        return {rid: order.index(rid) + 1 for rid in ids}

    def random_ranks(ids):
        order = rng.sample(ids, len(ids))
        return {rid: order.index(rid) + 1 for rid in ids}

    now = utcnow()
    quarantined_after = None
    rex_annotations = []
    for n in range(1, 31):
        now += timedelta(minutes=2)
        for user in (ann, bob):
            submit(session, user, ranks_of=careful, likert_of=lambda rid, rank: 8 - rank,
                   seconds=rng.uniform(30, 60), now=now)
        annotation = submit(session, rex, ranks_of=random_ranks, likert_of=lambda rid, rank: rng.randint(1, 7),
                            seconds=2.0, now=now)
        rex_annotations.append(annotation)
        record = session.get(LabelerTrust, (ps.id, rex.id))
        session.refresh(record)
        if record.quarantined and quarantined_after is None:
            quarantined_after = n
    assert quarantined_after is not None and quarantined_after <= 20, quarantined_after

    # Why: the figures and the rule, kept with the quarantine and shown live.
    record = session.get(LabelerTrust, (ps.id, rex.id))
    assert record.quarantined_by_id is None  # the rules did it
    assert "max_fast_share" in {r["rule"] for r in record.quarantine_reasons}
    assert "under 5 s" in " ".join(r["text"] for r in record.quarantine_reasons)
    rows = {r.username: r for r in trust.trust_rows(session, prompt_set_id=ps.id)}
    assert rows["t-rex"].quarantined and rows["t-rex"].fast_share == 1.0
    assert not rows["t-ann"].flagged and not rows["t-bob"].flagged
    assert not session.get(LabelerTrust, (ps.id, ann.id)).quarantined

    # Every annotation rex submitted after the quarantine is stored, excluded and marked.
    later = rex_annotations[quarantined_after:]
    for a in later:
        session.refresh(a)
    assert later and all(a.excluded and a.quarantined for a in later)
    earlier = rex_annotations[:quarantined_after]
    assert not any(a.excluded for a in earlier)
    # ... and kept out of the export and of the agreement figures.
    exported = _exported_labelers(session, ps.id)
    assert exported.count(rex.id) == quarantined_after
    assert exported.count(ann.id) == 30
    figures = {f.user_id: f for f in compute_set_agreement(session, prompt_set_id=ps.id).labelers}
    assert figures[rex.id].tasks == quarantined_after

    # Lifting the quarantine brings them all back, and the rules leave rex be on this set.
    admin = make_user(session, role=Role.admin)
    assert trust.release(session, prompt_set_id=ps.id, user_id=rex.id, by=admin) == len(later)
    assert _exported_labelers(session, ps.id).count(rex.id) == 30
    assert trust.check_labeler(session, prompt_set_id=ps.id, user_id=rex.id).flagged
    assert not session.get(LabelerTrust, (ps.id, rex.id)).quarantined
    row = _trust_row(session, ps.id, rex)
    assert row.released_at is not None and row.flagged


def test_without_automatic_quarantine_a_flagged_labeler_is_only_marked(session):
    ps = make_prompt_set(session, k=3, overlap=1)
    fast = make_user(session)
    for _ in range(10):
        task, ids = task_with_ids(session, ps)
        annotate(session, task, ids, fast, [1, 2, 3], time_s=1.0)
    session.commit()
    row = trust.check_labeler(session, prompt_set_id=ps.id, user_id=fast.id)
    assert [r.rule for r in row.reasons] == ["max_fast_share"]
    assert session.get(LabelerTrust, (ps.id, fast.id)) is None


def test_rules_judge_only_from_min_tasks_and_name_their_figures(session):
    ps = make_prompt_set(session, k=4, overlap=1)
    fours, mixed = make_user(session, username="t-fours"), make_user(session, username="t-mixed")
    for i in range(9):
        task, ids = task_with_ids(session, ps)
        annotate(session, task, ids, fours, [1, 2, 3, 4], [4, 4, 4, 4], time_s=30)
        task, ids = task_with_ids(session, ps)
        annotate(session, task, ids, mixed, [1, 2, 3, 4], [7, 5, 3, 1], time_s=30)
    session.flush()
    assert not _trust_row(session, ps.id, fours).flagged  # 9 < min_tasks
    task, ids = task_with_ids(session, ps)
    annotate(session, task, ids, fours, [1, 2, 3, 4], [4, 4, 4, 4], time_s=30)
    row = _trust_row(session, ps.id, fours)
    assert [r.rule for r in row.reasons] == ["max_top_rating_share"]
    assert row.reasons[0].text == "100% of 40 ratings are 4 (rule: at most 90%)"
    assert row.top_rating_share == 1.0 and row.rating_entropy_bits == 0.0
    mixed_row = _trust_row(session, ps.id, mixed)
    assert not mixed_row.flagged and mixed_row.rating_entropy_bits == pytest.approx(2.0)
    # The set's own rules: a share of 1 switches the rule off.
    trust.save_rules(session, prompt_set_id=ps.id, values={"max_top_rating_share": "1"})
    assert not _trust_row(session, ps.id, fours).flagged


def test_lifting_a_quarantine_restores_exactly_the_quarantined_annotations(session):
    ps = make_prompt_set(session, k=2, overlap=1)
    labeler, admin = make_user(session), make_user(session, role=Role.admin)
    task, ids = task_with_ids(session, ps)
    by_hand = annotate(session, task, ids, labeler, [1, 2], excluded=True)  # excluded by an admin earlier
    session.commit()
    trust.quarantine(session, prompt_set_id=ps.id, user_id=labeler.id, by=admin)
    task2 = make_task(session, ps)
    session.commit()
    held = submit(session, labeler, ranks_of=lambda ids: {ids[0]: 1, ids[1]: 2}, likert_of=lambda r, k: 4,
                  seconds=20, now=utcnow())
    assert held.task_id == task2.id and held.excluded and held.quarantined
    row = _trust_row(session, ps.id, labeler)
    assert row.quarantined and row.quarantined_by == admin.username and row.quarantined_annotations == 1
    assert trust.release(session, prompt_set_id=ps.id, user_id=labeler.id, by=admin) == 1
    session.refresh(held)
    session.refresh(by_hand)
    assert not held.excluded and not held.quarantined
    assert by_hand.excluded  # the admin's own exclusion stands
    # Excluding by hand makes a quarantined annotation the admin's decision.
    trust.quarantine(session, prompt_set_id=ps.id, user_id=labeler.id, by=admin)
    session.execute(Annotation.__table__.update().where(Annotation.id == held.id).values(excluded=True,
                                                                                        quarantined=True))
    labelers.set_excluded(session, user_id=labeler.id, excluded=True, prompt_set_id=ps.id)
    session.refresh(held)
    assert held.excluded and not held.quarantined
    assert trust.release(session, prompt_set_id=ps.id, user_id=labeler.id, by=admin) == 0


def test_bad_rules_are_refused_naming_the_field(session):
    ps = make_prompt_set(session)
    with pytest.raises(Invalid) as error:
        trust.save_rules(session, prompt_set_id=ps.id, values={
            "min_tasks": "2.5", "max_fast_share": "1.5", "min_seconds": "fast", "min_gold_accuracy": "nan"})
    assert set(error.value.errors) == {"min_tasks", "max_fast_share", "min_seconds", "min_gold_accuracy"}
    rules = trust.save_rules(session, prompt_set_id=ps.id, values={"min_tasks": "20", "auto_quarantine": "on"})
    assert rules.min_tasks == 20 and rules.auto_quarantine and rules.min_seconds == trust.DEFAULT_RULES.min_seconds
    assert trust.rules_of(ps) == rules


# ---- pages ---------------------------------------------------------------------------------

def test_quality_page_shows_trust_and_the_admin_quarantines_and_lifts(client, session):
    ps = make_prompt_set(session, k=3, overlap=1)
    fast, admin = make_user(session, username="t-fast"), make_user(session, role=Role.admin)
    for _ in range(10):
        task, ids = task_with_ids(session, ps)
        annotate(session, task, ids, fast, [1, 2, 3], time_s=1.5)
    session.commit()
    client.headers["X-CSRF-Token"] = login(client, admin)
    page = client.get(f"/admin/prompt-sets/{ps.id}/quality")
    assert page.status_code == 200 and 'id="trust"' in page.text
    assert "100% of 10 submissions took under 5 s" in page.text

    base = f"/admin/prompt-sets/{ps.id}/quality"
    response = client.post(f"{base}/labelers/{fast.id}/quarantine", headers={"HX-Request": "true"})
    assert response.status_code == 200 and "quarantined by" in response.text
    assert session.get(LabelerTrust, (ps.id, fast.id)).quarantined
    response = client.post(f"{base}/labelers/{fast.id}/release", headers={"HX-Request": "true"})
    assert response.status_code == 200 and "Quarantine lifted" in response.text
    assert response.headers["HX-Trigger"] == "quality-changed"

    bad = client.post(f"{base}/trust-rules", data={"min_tasks": "0", "max_fast_share": "x"},
                      headers={"HX-Request": "true"})
    assert bad.status_code == 422 and "min_tasks" in bad.text and "must be between 1 and 10000" in bad.text
    ok = client.post(f"{base}/trust-rules", data={"min_tasks": "12", "auto_quarantine": "true"},
                     headers={"HX-Request": "true"})
    assert ok.status_code == 200 and "Rules saved" in ok.text
    session.refresh(ps)
    assert ps.trust_rules["min_tasks"] == 12 and ps.trust_rules["auto_quarantine"] is True
    assert client.post(f"{base}/labelers/999999/quarantine").status_code == 404

    client.headers.pop("X-CSRF-Token")
    client.cookies.clear()
    client.headers["X-CSRF-Token"] = login(client, fast)
    assert client.post(f"{base}/labelers/{fast.id}/release").status_code == 403
    assert client.get(f"{base}/trust").status_code == 403


def test_the_json_api_reads_trust_sets_rules_and_quarantines(client, session):
    ps = make_prompt_set(session, k=3, overlap=1)
    fast, admin = make_user(session, username="t-api"), make_user(session, role=Role.admin)
    for _ in range(10):
        task, ids = task_with_ids(session, ps)
        annotate(session, task, ids, fast, [1, 2, 3], time_s=1.0)
    session.commit()
    client.headers["X-CSRF-Token"] = login(client, admin)
    base = f"/api/v1/prompt-sets/{ps.id}"
    body = client.get(f"{base}/trust").json()
    assert body["rules"] == {**vars(trust.DEFAULT_RULES)}
    row = body["labelers"][0]
    assert row["flagged"] and row["reasons"][0]["rule"] == "max_fast_share" and row["fast_share"] == 1.0
    assert client.put(f"{base}/trust-rules", json={"min_tasks": 0}).status_code == 422
    assert client.put(f"{base}/trust-rules", json={"nonsense": 1}).status_code == 422
    rules = client.put(f"{base}/trust-rules", json={"max_fast_share": 1, "auto_quarantine": True})
    assert rules.status_code == 200 and rules.json()["auto_quarantine"] is True
    assert not client.get(f"{base}/trust").json()["labelers"][0]["flagged"]
    held = client.post(f"{base}/labelers/{fast.id}/quarantine")
    assert held.status_code == 200 and held.json()["quarantined"]
    released = client.post(f"{base}/labelers/{fast.id}/release")
    assert released.status_code == 200 and released.json()["released_at"] is not None
    assert client.post(f"{base}/labelers/{admin.id}/release").status_code == 404

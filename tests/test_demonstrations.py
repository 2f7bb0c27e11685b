"""Demonstrations: leases, drafts, idempotent submit, skip, review, training data, import and export."""

import json
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select, text
from sqlalchemy import text as sql_text

from app.db.base import utcnow
from app.db.enums import DemonstrationStatus, PromptSetStatus, Role, Split
from app.db.models import Demonstration, Prompt, User
from app.db.session import new_session
from app.services import demonstrations as demos
from app.services import export
from app.services.errors import Conflict, Invalid, NotAllowed, NotFound
from app.services.labelers import allow_labeler
from app.services.prompt_sets import archive_prompt_set, pause_prompt_set
from tests.factories import (LEASE_S, add_prompt, demo_set, lease_demo, make_prompt_set, make_task, make_user,
                             submit_demo)

def count_demos(session) -> int:
    return session.scalar(select(func.count(Demonstration.id)))


# ---- leases --------------------------------------------------------------------------

def test_a_reload_gives_the_same_prompt_until_the_lease_ends(session):
    s = demo_set(session)
    first, second = add_prompt(session, s, "Explain rain."), add_prompt(session, s, "Explain snow.")
    alice = make_user(session)
    now = utcnow()
    demo = lease_demo(session, alice, now)
    assert demo.prompt_id == first.id and demo.status == DemonstrationStatus.draft
    assert lease_demo(session, alice, now + timedelta(seconds=60)).id == demo.id
    # After the lease ran out the prompt is free again, and the labeler's own draft comes first.
    later = lease_demo(session, alice, now + timedelta(seconds=LEASE_S + 1))
    assert later.id == demo.id


def test_overlap_limits_the_writers_of_a_prompt_and_nobody_writes_twice(session):
    s = demo_set(session, overlap=2)
    p1, p2 = add_prompt(session, s, "One"), add_prompt(session, s, "Two")
    a, b, c = (make_user(session) for _ in range(3))
    da, db = lease_demo(session, a), lease_demo(session, b)
    assert da.prompt_id == db.prompt_id == p1.id  # finish the overlap before starting new prompts
    dc = lease_demo(session, c)
    assert dc.prompt_id == p2.id
    submit_demo(session, a, da)
    nxt = lease_demo(session, a)
    assert nxt.prompt_id == p2.id  # never p1 again
    submit_demo(session, a, nxt)
    assert lease_demo(session, a) is None  # p1 and p2 both written by a


def test_an_expired_draft_no_longer_holds_the_prompt(session):
    s = demo_set(session, overlap=1)
    add_prompt(session, s, "Only prompt")
    a, b = make_user(session), make_user(session)
    now = utcnow()
    da = lease_demo(session, a, now)
    assert lease_demo(session, b, now) is None
    db = lease_demo(session, b, now + timedelta(seconds=LEASE_S + 5))
    assert db is not None and db.prompt_id == da.prompt_id
    # a's lease is gone and the prompt is full: a's submit is refused, the text kept as a draft.
    with pytest.raises(Conflict, match="ran out"):
        submit_demo(session, a, da, text="Late answer", now=now + timedelta(seconds=LEASE_S + 10))
    session.refresh(da)
    assert da.status == DemonstrationStatus.draft and da.text == "Late answer"


def test_only_active_demonstration_sets_open_to_the_labeler_give_prompts(session):
    alice, bob = make_user(session), make_user(session)
    ranking = make_prompt_set(session)  # a ranking set with a task
    make_task(session, ranking)
    add_prompt(session, demo_set(session, status=PromptSetStatus.paused), "Paused")
    add_prompt(session, demo_set(session, allowed=[bob]), "For Bob only")
    assert lease_demo(session, alice) is None
    assert lease_demo(session, bob).prompt.text == "For Bob only"



@pytest.mark.parametrize("change", ["paused", "archived", "restricted to others"])
def test_submit_is_refused_once_the_set_is_closed_to_the_writer(session, change):
    s = demo_set(session)
    add_prompt(session, s, "A prompt")
    alice, bob = make_user(session), make_user(session)
    demo = lease_demo(session, alice)
    if change == "paused":
        pause_prompt_set(session, prompt_set=s)
    elif change == "archived":
        archive_prompt_set(session, prompt_set=s)
    else:
        allow_labeler(session, prompt_set_id=s.id, user_id=bob.id)
    with pytest.raises(NotAllowed) as err:
        submit_demo(session, alice, demo)
    assert s.name not in err.value.message
    assert session.get(Demonstration, demo.id).status == DemonstrationStatus.draft


# ---- drafts and submit -------------------------------------------------------------------

def test_draft_autosave_survives_a_reload(session):
    s = demo_set(session)
    add_prompt(session, s, "Write a limerick.")
    alice = make_user(session)
    demo = lease_demo(session, alice)
    for text in ("There once", "There once was a", "There once was a"):  # saving the same text again is harmless
        result = demos.save_draft(session, user=alice, demonstration_id=demo.id, text=text, now=utcnow(),
                                  lease_s=LEASE_S, time_spent_s=12.5, edit_mode=False)
        assert result.saved and result.holds_lease
    again = lease_demo(session, alice)
    assert again.id == demo.id and again.text == "There once was a" and again.time_spent_s == 12.5
    assert count_demos(session) == 1


def test_autosave_renews_the_lease(session):
    s = demo_set(session)
    add_prompt(session, s, "Prompt")
    a, b = make_user(session), make_user(session)
    now = utcnow()
    demo = lease_demo(session, a, now)
    demos.save_draft(session, user=a, demonstration_id=demo.id, text="writing...", now=now + timedelta(seconds=LEASE_S - 1),
                     lease_s=LEASE_S)
    assert lease_demo(session, b, now + timedelta(seconds=LEASE_S + 1)) is None  # still a's


def test_submit_twice_stores_one_demonstration(session):
    s = demo_set(session)
    add_prompt(session, s, "Say hi.")
    alice = make_user(session)
    demo = lease_demo(session, alice)
    first = submit_demo(session, alice, demo, text="Hi there!")
    assert not first.already and first.demonstration.status == DemonstrationStatus.submitted
    second = submit_demo(session, alice, demo, text="A different retry")
    assert second.already and second.demonstration.text == "Hi there!"
    assert count_demos(session) == 1
    # A late autosave of the submitted one changes nothing.
    late = demos.save_draft(session, user=alice, demonstration_id=demo.id, text="late", now=utcnow(), lease_s=LEASE_S)
    assert not late.saved
    session.refresh(demo)
    assert demo.text == "Hi there!" and demo.expires_at is None


def test_submit_checks_text_flags_and_ownership(session):
    s = demo_set(session)
    add_prompt(session, s, "Prompt")
    alice, mallory = make_user(session), make_user(session)
    demo = lease_demo(session, alice)
    with pytest.raises(Invalid) as exc:
        submit_demo(session, alice, demo, text="   \n")
    assert exc.value.errors == {"text": "write your response"}
    with pytest.raises(Invalid, match="limit is 20,000"):
        submit_demo(session, alice, demo, text="x" * 20_001)
    with pytest.raises(Invalid, match="Unknown prompt flag"):
        demos.submit_demonstration(session, user=alice, demonstration_id=demo.id, text="ok", now=utcnow(),
                                   lease_s=LEASE_S, prompt_flags=["nonsense"])
    with pytest.raises(NotAllowed):
        submit_demo(session, mallory, demo)
    result = demos.submit_demonstration(session, user=alice, demonstration_id=demo.id, text="ok", now=utcnow(),
                                        lease_s=LEASE_S, prompt_flags=["unclear"], time_spent_s=99999, edit_mode=True)
    d = result.demonstration
    assert d.prompt_flags == ["unclear"] and d.edit_mode and d.time_spent_s == 7200.0  # clamped to two hours


def test_skip_needs_a_reason_and_the_prompt_is_never_offered_again(session):
    s = demo_set(session)
    p1, p2 = add_prompt(session, s, "Hard one"), add_prompt(session, s, "Easy one")
    alice = make_user(session)
    demo = lease_demo(session, alice)
    assert demo.prompt_id == p1.id
    with pytest.raises(Invalid):
        demos.skip_demonstration(session, user=alice, demonstration_id=demo.id, reason=" ", now=utcnow())
    skipped = demos.skip_demonstration(session, user=alice, demonstration_id=demo.id,
                                       reason="The prompt is unclear", now=utcnow())
    assert skipped.status == DemonstrationStatus.skipped and skipped.skip_reason == "The prompt is unclear"
    assert lease_demo(session, alice).prompt_id == p2.id
    with pytest.raises(Conflict):
        submit_demo(session, alice, skipped)
    # Another labeler still gets the skipped prompt.
    assert lease_demo(session, make_user(session)).prompt_id == p1.id


# ---- review and training data ----------------------------------------------------------------

def written(session, s, labeler, text, answer, split=Split.train):
    add_prompt(session, s, text, split=split)
    demo = lease_demo(session, labeler)
    submit_demo(session, labeler, demo, text=answer)
    return demo


def test_review_accept_reject_edit_and_only_accepted_reach_training(session):
    s = demo_set(session)
    admin, alice, bob = make_user(session, role=Role.admin), make_user(session), make_user(session)
    good = written(session, s, alice, "Q1", "Good answer")
    bad = written(session, s, alice, "Q2", "Bad answer")
    fixable = written(session, s, bob, "Q3", "Answr with typo", split=Split.validation)
    pending = written(session, s, bob, "Q4", "Not reviewed yet")
    draft_prompt = add_prompt(session, s, "Q5")
    draft = lease_demo(session, bob)
    assert draft.prompt_id == draft_prompt.id

    assert [d.id for d in demos.review_queue(session)] == [good.id, bad.id, fixable.id, pending.id]
    now = utcnow()
    demos.accept_demonstration(session, reviewer=admin, demonstration_id=good.id, now=now)
    with pytest.raises(Invalid):
        demos.reject_demonstration(session, reviewer=admin, demonstration_id=bad.id, reason="", now=now)
    demos.reject_demonstration(session, reviewer=admin, demonstration_id=bad.id, reason="Too short", now=now)
    demos.edit_demonstration(session, reviewer=admin, demonstration_id=fixable.id, text="Answer without typo", now=now)
    with pytest.raises(Conflict):
        demos.accept_demonstration(session, reviewer=admin, demonstration_id=draft.id, now=now)

    assert [d.id for d in demos.review_queue(session)] == [pending.id]
    session.refresh(bad)
    assert bad.status == DemonstrationStatus.rejected and bad.reject_reason == "Too short"
    assert bad.reviewed_by_id == admin.id

    data = demos.accepted_demonstrations(session, prompt_set_ids=[s.id])
    assert [(d.messages[-1]["content"], d.response, d.split) for d in data] == [
        ("Q1", "Good answer", Split.train), ("Q3", "Answer without typo", Split.validation)]

    rates = {f.username: f for f in demos.acceptance_rates(session, prompt_set_id=s.id)}
    assert (rates[alice.username].accepted, rates[alice.username].rejected) == (1, 1)
    assert rates[alice.username].acceptance_rate == 0.5
    assert rates[bob.username].acceptance_rate == 1.0 and rates[bob.username].submitted == 1
    assert admin.username not in rates


def test_a_rejected_demonstration_frees_its_prompt_for_another_labeler(session):
    s = demo_set(session, overlap=1)
    admin, alice, bob = make_user(session, role=Role.admin), make_user(session), make_user(session)
    demo = written(session, s, alice, "Only", "Meh")
    assert lease_demo(session, bob) is None
    demos.reject_demonstration(session, reviewer=admin, demonstration_id=demo.id, reason="Off topic", now=utcnow())
    assert lease_demo(session, bob).prompt_id == demo.prompt_id
    assert lease_demo(session, alice) is None


def test_export_in_trl_formats_round_trips_through_import(session):
    s = demo_set(session, name="source")
    admin, alice = make_user(session, role=Role.admin), make_user(session)
    multi = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And?"}]
    add_prompt(session, s, "", messages=multi)
    demo = lease_demo(session, alice)
    submit_demo(session, alice, demo, text="And so on.")
    written(session, s, alice, "Not accepted", "Waiting")
    demos.accept_demonstration(session, reviewer=admin, demonstration_id=demo.id, now=utcnow())

    lines = list(demos.iter_export(session, prompt_set_ids=[s.id], fmt="messages"))
    assert len(lines) == 1
    row = json.loads(lines[0])
    assert row["messages"] == [*multi, {"role": "assistant", "content": "And so on."}]
    pc = json.loads(next(demos.iter_export(session, prompt_set_ids=[s.id], fmt="prompt_completion")))
    assert pc["prompt"] == multi and pc["completion"] == [{"role": "assistant", "content": "And so on."}]
    with pytest.raises(Invalid):
        list(demos.iter_export(session, prompt_set_ids=[s.id], fmt="alpaca"))

    target = demo_set(session, name="target")
    for i, fmt in enumerate(("messages", "prompt_completion")):
        text = "".join(demos.iter_export(session, prompt_set_ids=[s.id], fmt=fmt))
        result = demos.import_demonstrations(session, prompt_set=target, data=text, user=admin, now=utcnow())
        assert (result.added, result.duplicates_existing) == ((1, 0) if i == 0 else (0, 1))
    imported = demos.accepted_demonstrations(session, prompt_set_ids=[target.id])
    assert [(d.messages, d.response) for d in imported] == [(multi, "And so on.")]


def test_export_streams_from_a_server_side_cursor(session):
    """Memory stays flat in the number of demonstrations: the first line goes out while
    the rest are still on the server, read YIELD_PER at a time."""
    s = demo_set(session)
    admin = make_user(session, role=Role.admin)
    n = export.YIELD_PER + 200
    jsonl = "".join(json.dumps({"prompt": f"Q{i}", "response": f"A{i}"}) + "\n" for i in range(n))
    assert demos.import_demonstrations(session, prompt_set=s, data=jsonl, user=admin, now=utcnow()).added == n
    lines = demos.iter_export(session, prompt_set_ids=[s.id], fmt="prompt_completion")
    assert not isinstance(lines, list | tuple)
    first = json.loads(next(lines))
    assert first["completion"][0]["content"] == "A0"
    assert session.scalar(sql_text("SELECT count(*) FROM pg_cursors WHERE NOT is_holdable")) == 1
    assert 1 + sum(1 for _ in lines) == n
    assert session.scalar(sql_text("SELECT count(*) FROM pg_cursors WHERE NOT is_holdable")) == 0
    with pytest.raises(NotFound):  # raised on the call, before any line: a download never breaks off
        demos.iter_export(session, prompt_set_ids=[999_999], fmt="messages")


# ---- import ---------------------------------------------------------------------------

def test_import_stores_prompts_and_accepted_demonstrations(session):
    s = demo_set(session)
    admin = make_user(session, role=Role.admin)
    existing = add_prompt(session, s, "Already here")
    data = "\n".join(json.dumps(x) for x in [
        {"prompt": "Already here", "response": "Now answered."},
        {"prompt": "New one", "completion": "Fresh.", "id": "n1", "source": "wiki"},
        {"messages": [{"role": "user", "content": "Multi"}, {"role": "assistant", "content": "Turn."}]},
        {"prompt": "New one", "response": "Same prompt again: skipped."},
    ]) + "\n"
    result = demos.import_demonstrations(session, prompt_set=s, data=data.encode(), user=admin, now=utcnow())
    assert (result.added, result.prompts_added, result.duplicates_in_file) == (3, 2, 1)
    assert "Imported 3 demonstrations (2 new prompts)" in result.describe()
    data_out = {d.messages[-1]["content"]: d for d in demos.accepted_demonstrations(session, prompt_set_ids=[s.id])}
    assert data_out["Already here"].prompt_id == existing.id
    assert data_out["New one"].response == "Fresh."
    new_prompt = session.get(Prompt, data_out["New one"].prompt_id)
    assert new_prompt.external_id == "n1" and new_prompt.meta == {"source": "wiki"}
    # Submitted for review instead of accepted:
    review = demos.import_demonstrations(session, prompt_set=s, data='{"prompt": "Check me", "response": "Maybe."}',
                                         user=admin, now=utcnow(), status="submitted")
    assert review.added == 1 and demos.count_waiting(session, prompt_set_id=s.id) == 1


def test_import_validation_failures_store_nothing(session):
    s = demo_set(session)
    admin = make_user(session, role=Role.admin)
    lines = [
        json.dumps({"prompt": "Fine", "response": "Fine."}),
        json.dumps({"prompt": "No answer"}),
        json.dumps({"messages": [{"role": "user", "content": "Hi"}]}),
        "{not json",
        json.dumps({"prompt": "Empty", "response": "  "}),
        json.dumps({"prompt": "Both", "response": "a", "completion": "b"}),
        json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}],
                    "prompt": "also"}),
        json.dumps({"prompt": ["bad"], "response": "x"}),
        json.dumps({"prompt": "List answer", "response": [{"role": "user", "content": "x"}]}),
    ]
    before = (session.scalar(select(func.count(Prompt.id))), count_demos(session))
    with pytest.raises(Invalid) as exc:
        demos.import_demonstrations(session, prompt_set=s, data="\n".join(lines), user=admin, now=utcnow())
    errors = exc.value.errors
    assert exc.value.message.startswith("Nothing was imported: the file has 8 problems")
    assert errors[0] == "line 2: missing 'response'"
    assert errors[1] == "line 3: the last message must be the assistant's answer, not 'user'"
    assert errors[2].startswith("line 4: not valid JSON")
    assert errors[3] == "line 5: 'response' is empty"
    assert errors[4] == "line 6: give 'response' or 'completion', not both"
    assert errors[5] == "line 7: give either 'messages' or 'prompt' with 'response', not both"
    assert errors[6].startswith("line 8: 'messages'[0] must be an object")
    assert errors[7] == "line 9: 'response' must be a string or a list of one assistant message"
    assert (session.scalar(select(func.count(Prompt.id))), count_demos(session)) == before


def test_import_refuses_ranking_and_archived_sets_and_empty_files(session):
    admin = make_user(session, role=Role.admin)
    line = '{"prompt": "p", "response": "r"}'
    with pytest.raises(Conflict, match="ranking set"):
        demos.import_demonstrations(session, prompt_set=make_prompt_set(session), data=line, user=admin, now=utcnow())
    with pytest.raises(Conflict, match="archived"):
        demos.import_demonstrations(session, prompt_set=demo_set(session, status=PromptSetStatus.archived),
                                    data=line, user=admin, now=utcnow())
    with pytest.raises(Invalid, match="empty"):
        demos.import_demonstrations(session, prompt_set=demo_set(session), data=b"  \n", user=admin, now=utcnow())


def test_concurrent_leases_never_exceed_the_overlap(committed):
    with new_session() as session:
        s = demo_set(session, overlap=2)
        for i in range(3):
            add_prompt(session, s, f"Prompt {i}")
        labelers = [make_user(session) for _ in range(8)]
        session.commit()
        ids = [u.id for u in labelers]
    now = utcnow()
    got: dict[int, int | None] = {}
    barrier = threading.Barrier(len(ids))

    def take(user_id: int) -> None:
        with new_session() as own:
            user = own.get(User, user_id)
            barrier.wait()
            demo = demos.lease_next_demonstration(own, user=user, now=now, lease_s=LEASE_S)
            got[user_id] = demo.prompt_id if demo else None

    threads = [threading.Thread(target=take, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    leased = [p for p in got.values() if p is not None]
    assert len(got) == 8 and len(leased) == 6  # 3 prompts x overlap 2; two labelers get nothing
    assert all(leased.count(p) == 2 for p in set(leased))


def test_a_submit_held_up_while_the_draft_lease_runs_out_and_goes_to_another_is_refused(committed):
    """Overlap 1. a's submit waits on a's own lock while a's draft lease runs out by the
    database's clock and b takes the prompt: a's submit is judged by the clock read
    after its locks (409, the text kept as a draft), and only b's is submitted."""
    with new_session() as session:
        add_prompt(session, demo_set(session, overlap=1), "Only prompt")
        a, b = make_user(session), make_user(session)
        session.commit()
        a_id, b_id = a.id, b.id
    with new_session() as session:
        draft = demos.lease_next_demonstration(session, user=session.get(User, a_id), lease_s=1)
        draft_id, expires_at = draft.id, draft.expires_at
    results: dict[str, str] = {}

    def late_submit() -> None:
        with new_session() as own:
            try:
                demos.submit_demonstration(own, user=own.get(User, a_id), demonstration_id=draft_id,
                                           text="Late answer", lease_s=LEASE_S)
                results["a"] = "stored"
            except Conflict as exc:
                results["a"] = exc.message

    with new_session() as blocker:
        blocker.execute(text("SELECT pg_advisory_xact_lock(CAST(:ns AS integer), CAST(:uid AS integer))"),
                        {"ns": demos.leases._LEASE_LOCK_NS, "uid": a_id})
        thread = threading.Thread(target=late_submit)
        thread.start()
        while blocker.scalar(select(func.clock_timestamp())) <= expires_at:
            time.sleep(0.05)
        with new_session() as session:
            taken = demos.lease_next_demonstration(session, user=session.get(User, b_id), lease_s=LEASE_S)
            assert taken is not None and taken.prompt_id == draft.prompt_id
            b_demo = taken.id
        assert thread.is_alive() and not results  # a's submit is still waiting
        blocker.commit()
    thread.join(30)
    assert "ran out" in results["a"]
    with new_session() as session:
        demos.submit_demonstration(session, user=session.get(User, b_id), demonstration_id=b_demo,
                                   text="Quick answer", lease_s=LEASE_S)
        submitted = session.scalars(select(Demonstration.user_id).where(
            Demonstration.status == DemonstrationStatus.submitted)).all()
        assert submitted == [b_id]
        assert session.get(Demonstration, draft_id).status == DemonstrationStatus.draft

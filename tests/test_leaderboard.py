"""The leaderboard over every evaluation set, a model's evaluation evidence (its page,
the registry sorted by rating, the API), from votes cast through the labeling services."""

import random
import re

import pytest
from sqlalchemy import text

from app.db.enums import ModelKind, Role
from app.services import annotations, assignment, evaluation, leaderboard
from tests.factories import make_evaluation, make_model, make_user

LEASE_S = 600


def cast_votes(session, prefer: dict[int, float], n: int, seed: int = 0) -> None:
    """n votes by three labelers; the voter picks the model of higher `prefer` with that
    model's probability (ties 10% of the time)."""
    rng = random.Random(seed)
    labelers = [make_user(session) for _ in range(3)]
    for i in range(n):
        user = labelers[i % 3]
        lease = assignment.lease_next_task(session, user=user, lease_s=LEASE_S)
        assert lease is not None
        a, b = (item.response.model_id for item in lease.task.items)
        if rng.random() < 0.1:
            outcome = "tie"
        else:
            p_a = prefer[a] / (prefer[a] + prefer[b])
            outcome = "a" if rng.random() < p_a else "b"
        annotations.submit_annotation(session, user=user, task_id=lease.task.id, ratings=None, ranks=None,
                                      vote=outcome, strength=None, idempotency_key=f"leaderboard-{seed}-{i}")


@pytest.fixture
def evaluated(session):
    """The default SFT model, a policy trained from it that labelers prefer 3 to 1, and a
    weaker policy; two evaluation sets."""
    sft = make_model(session, name="lb-sft", is_default=True)
    good = make_model(session, name="lb-good-policy", kind=ModelKind.policy)
    good.parent_id = sft.id
    weak = make_model(session, name="lb-weak-policy", kind=ModelKind.policy)
    weak.parent_id = sft.id
    unrated = make_model(session, name="lb-unrated", kind=ModelKind.policy)
    session.flush()
    prefer = {sft.id: 1.0, good.id: 3.0, weak.id: 0.4}
    make_evaluation(session, [sft, good], prompts=60, seed=1)
    make_evaluation(session, [sft, good, weak], prompts=90, seed=2)
    cast_votes(session, prefer, 150)
    # Statistics of these (uncommitted) rows: after other tests' rolled-back rows were
    # auto-analysed the tables look empty, and the planner's nested loops over the real
    # rows then take minutes.
    session.execute(text("ANALYZE votes, annotations, tasks, prompts, responses"))
    return sft, good, weak, unrated


def test_leaderboard_orders_the_models_and_anchors_the_default_sft_model(session, evaluated):
    sft, good, weak, unrated = evaluated
    board = leaderboard.model_board(session)
    assert [e.model.id for e in board.entries] == [good.id, sft.id, weak.id]
    assert board.anchor.id == sft.id and board.entry(sft.id).rating.rating == 1000
    assert board.board.votes == 150 and board.entry(unrated.id) is None
    # Every vote counted once per side: the good policy met the SFT model in 60 + 30 tasks and the weak one in 30.
    assert board.entry(good.id).rating.votes == 120
    good_vs_sft = leaderboard.win_rate_against(board, good.id, sft.id)
    assert good_vs_sft.votes == 90 and good_vs_sft.low > 0.5
    assert leaderboard.win_rate_against(board, sft.id, unrated.id) is None
    assert leaderboard.sort_by_rating([unrated, weak, sft, good], board) == [good, sft, weak, unrated]


def test_the_fit_is_reused_until_a_vote_changes(session, evaluated):
    sft, good, weak, unrated = evaluated
    first = leaderboard.model_board(session)
    assert leaderboard.model_board(session).board is first.board  # the same votes: not fitted again
    session.execute(text("UPDATE votes SET outcome = CASE outcome WHEN 'a' THEN 'b' ELSE 'a' END"
                         " WHERE annotation_id = (SELECT min(annotation_id) FROM votes WHERE outcome IN ('a', 'b'))"))
    changed = leaderboard.model_board(session)
    assert changed.board is not first.board and changed.board.votes == 150
    assert changed.entry(good.id).rating.rating != first.entry(good.id).rating.rating


def test_leaderboard_page_and_api(client_as, session, evaluated):
    sft, good, weak, unrated = evaluated
    client = client_as(Role.engineer)
    page = client.get("/leaderboard")
    assert page.status_code == 200
    assert "The default SFT model <strong>lb-sft</strong> is 1000" in page.text
    html = page.text[page.text.index('id="leaderboard"'):]
    assert html.index("lb-good-policy") < html.index("lb-sft") < html.index("lb-weak-policy")
    assert "lb-unrated" not in html and "Length-controlled" in html
    data = client.get("/api/v1/leaderboard").json()
    assert data["anchor_model_id"] == sft.id and data["votes"] == 150
    assert [r["model_id"] for r in data["ratings"]] == [good.id, sft.id, weak.id]
    top = data["ratings"][0]
    assert top["rating_low"] <= top["rating"] <= top["rating_high"] and top["rating"] > 1000
    assert top["lc_rating"] is not None and top["connected"]


def test_model_page_shows_rating_and_win_rate_against_its_parent_beside_make_generator(client_as, session,
                                                                                       evaluated):
    sft, good, weak, unrated = evaluated
    client = client_as(Role.engineer)
    html = client.get(f"/models/{good.id}").text
    evidence = html[html.index('id="evaluation-evidence"'):html.index('id="promote-button"')]
    assert "Rating <strong>" in evidence and "Against its parent" in evidence and "Labelers prefer it." in evidence
    win_rate = leaderboard.win_rate_against(leaderboard.model_board(session), good.id, sft.id)
    assert f"{100 * win_rate.rate:.1f}%" in evidence
    html = client.get(f"/models/{unrated.id}").text
    assert "Not on the leaderboard" in html
    api = client.get(f"/api/v1/models/{good.id}").json()["evaluation"]
    assert api["parent_id"] == sft.id and api["against_parent"]["votes"] == 90
    assert api["rating"]["model_id"] == good.id


def test_model_never_compared_with_its_parent_links_to_an_evaluation_of_both(client_as, session, evaluated):
    sft, good, weak, unrated = evaluated
    unrated.parent_id = good.id
    session.flush()
    client = client_as(Role.engineer)
    html = client.get(f"/models/{unrated.id}").text
    assert f'/evaluations/new?model_ids={good.id}&amp;model_ids={unrated.id}' in html
    form = client.get(f"/evaluations/new?model_ids={good.id}&model_ids={unrated.id}&model_ids=x").text
    ticked = set(re.findall(r'name="model_ids" value="(\d+)"\s*checked', form))
    assert ticked == {str(good.id), str(unrated.id)}


def test_registry_sorts_by_rating(client_as, session, evaluated):
    sft, good, weak, unrated = evaluated
    client = client_as(Role.engineer)
    html = client.get("/models?sort=rating").text
    rows = [html.index(f'data-model-id="{m.id}"') for m in (good, sft, weak, unrated)]
    assert rows == sorted(rows)
    default_order = client.get("/models").text
    assert default_order.index(f'data-model-id="{sft.id}"') < default_order.index(f'data-model-id="{good.id}"')
    ids = [m["id"] for m in client.get("/api/v1/models?sort=rating").json()]
    assert ids.index(good.id) < ids.index(sft.id) < ids.index(weak.id) < ids.index(unrated.id)
    assert client.get("/api/v1/models?sort=worst").status_code == 422


def test_no_votes_gives_an_empty_leaderboard(client_as, session):
    client = client_as(Role.engineer)
    assert client.get("/api/v1/leaderboard").json()["ratings"] == []
    assert "No votes yet" in client.get("/leaderboard").text


def test_evaluation_results_page_shows_its_models_on_the_leaderboard(client_as, session, evaluated):
    sft, good, weak, unrated = evaluated
    two_models = next(s for s in evaluation.list_evaluations(session)
                      if len(evaluation.set_models(session, s.id)) == 2)
    html = client_as(Role.engineer).get(f"/evaluations/{two_models.id}").text
    card = html[html.index('id="set-leaderboard"'):html.index('id="per-labeler"')]
    card = card[card.index("<tbody>"):]
    board = leaderboard.model_board(session)
    assert card.index("lb-good-policy") < card.index("lb-sft") and "lb-weak-policy" not in card
    assert f"<strong>{board.entry(good.id).rating.rating:.0f}</strong>" in card

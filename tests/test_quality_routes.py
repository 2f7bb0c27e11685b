"""The quality and export pages and their JSON API, through the ASGI client."""

import csv
import io
import json
import re

import pytest
from typer.testing import CliRunner

from app.db.models import Annotation, Task
from app.db.session import session_scope
from tests.factories import annotate, bulk_seed_session, make_prompt_set, make_user, task_with_ids

HX = {"HX-Request": "true"}


@pytest.fixture
def three(session):
    """Two labelers who agree and one who reverses them, on four tasks."""
    ps = make_prompt_set(session, k=3, overlap=3)
    ann, bob, rex = (make_user(session, username=n) for n in ("q-ann", "q-bob", "q-rex"))
    for _ in range(4):
        task, ids = task_with_ids(session, ps)
        annotate(session, task, ids, ann, [1, 2, 3])
        annotate(session, task, ids, bob, [1, 2, 3])
        annotate(session, task, ids, rex, [3, 2, 1], [1, 4, 7])
    return ps, ann, bob, rex


def _row(html: str, username: str) -> str:
    match = re.search(rf'<tr id="labeler-\d+" data-username="{username}"[^>]*>.*?</tr>', html, re.S)
    assert match, f"no row for {username}"
    return match.group(0)


def test_quality_page_shows_figures_reference_and_highlights_the_odd_labeler(admin_client, three):
    ps, ann, bob, rex = three
    page = admin_client.get(f"/admin/prompt-sets/{ps.id}/quality")
    assert page.status_code == 200
    html = page.text
    assert 'id="pairwise-agreement"' in html and "72.6%" in html
    assert "Kendall" in html and "Krippendorff" in html and "tied" in html
    assert "below-threshold" in _row(html, "q-rex") and "▼ below 60%" in _row(html, "q-rex")
    assert "below-threshold" not in _row(html, "q-ann")
    # The worst labeler comes first; the table sorts in the browser.
    assert html.index('data-username="q-rex"') < html.index('data-username="q-ann"')
    assert "data-sortable" in html and "/static/js/quality.js" in html
    assert 'class="histogram"' in _row(html, "q-rex") and "ratings 1 to 7 given: 4, 0, 0, 4, 0, 0, 4" in html
    assert 'id="progress"' in html and 'id="labels-per-hour-data"' in html
    # A threshold of 0 highlights nobody.
    assert "below-threshold" not in admin_client.get(f"/admin/prompt-sets/{ps.id}/quality?threshold=0").text
    assert admin_client.get(f"/admin/prompt-sets/{ps.id}/quality?threshold=2").status_code == 422


def test_exclude_and_include_swap_the_row_and_refresh_the_figures(admin_client, session, three):
    ps, ann, bob, rex = three
    url = f"/admin/prompt-sets/{ps.id}/quality/labelers/{rex.id}"
    response = admin_client.post(f"{url}/exclude", data={"threshold": "0.6"}, headers=HX)
    assert response.status_code == 200
    assert response.headers["HX-Trigger"] == "quality-changed"
    assert response.text.strip().startswith(f'<tr id="labeler-{rex.id}"') and ">excluded<" in response.text
    assert ">Include<" in response.text
    assert session.query(Annotation).filter_by(user_id=rex.id, excluded=True).count() == 4
    figures = admin_client.get(f"/admin/prompt-sets/{ps.id}/quality/figures", headers=HX).text
    assert '<strong id="pairwise-agreement">100.0%</strong>' in figures
    # The other rows reload too: without rex, ann and bob agree fully.
    rows = admin_client.get(f"/admin/prompt-sets/{ps.id}/quality/labelers?threshold=0.6", headers=HX).text
    assert rows.strip().startswith('<tbody id="labeler-rows"') and "below-threshold" not in rows
    assert "100.0%" in _row(rows, "q-ann") and ">excluded<" in _row(rows, "q-rex")
    response = admin_client.post(f"{url}/include", data={"threshold": "0.6"}, headers=HX)
    assert "below-threshold" in response.text and ">Exclude<" in response.text
    assert session.query(Annotation).filter_by(user_id=rex.id, excluded=True).count() == 0


def test_allowed_labelers_add_and_remove(admin_client, session, three):
    ps, ann, bob, rex = three
    url = f"/admin/prompt-sets/{ps.id}/quality/allowed"
    assert 'id="open-to-all"' in admin_client.get(f"/admin/prompt-sets/{ps.id}/quality").text
    html = admin_client.post(url, data={"username": "q-ann"}, headers=HX).text
    assert 'data-username="q-ann"' in html and "open-to-all" not in html
    refused = admin_client.post(url, data={"username": "nobody"}, headers=HX)
    assert refused.status_code == 422 and "No user named &#39;nobody&#39;" in refused.text
    html = admin_client.post(f"{url}/{ann.id}/remove", headers=HX).text
    assert 'id="open-to-all"' in html
    # Without htmx the form posts back to the page.
    plain = admin_client.post(url, data={"username": "q-bob"})
    assert plain.status_code == 303 and plain.headers["location"].endswith(f"/{ps.id}/quality")


def test_gold_marking_from_the_page(admin_client, session, three):
    ps = three[0]
    task = session.query(Task).filter_by(prompt_set_id=ps.id).order_by(Task.id).first()
    base = f"/admin/prompt-sets/{ps.id}/quality/gold"
    form = admin_client.get(f"{base}/form?task_id={task.id}", headers=HX).text
    ids = [item.response_id for item in task.items]  # display order
    assert all(f'name="rank_{rid}"' in form for rid in ids)
    bad = admin_client.post(f"{base}/{task.id}", data={f"rank_{ids[0]}": "1", f"rank_{ids[1]}": "9",
                                                       f"rank_{ids[2]}": "2"}, headers=HX)
    assert bad.status_code == 422 and "rank must be a whole number 1..3" in bad.text
    assert 'value="9"' in bad.text  # the admin's input is kept
    ok = admin_client.post(f"{base}/{task.id}", data={f"rank_{ids[0]}": "2", f"rank_{ids[1]}": "1",
                                                      f"rank_{ids[2]}": "3"}, headers=HX)
    assert ok.status_code == 200 and f'<tr data-task="{task.id}">' in ok.text and "B &gt; A &gt; C" in ok.text
    session.refresh(task)
    assert task.is_gold and task.gold_ranking == {str(ids[0]): 2, str(ids[1]): 1, str(ids[2]): 3}
    best = admin_client.post(f"{base}/{task.id}", data={"best_response_id": str(ids[2])}, headers=HX)
    assert "C &gt; A = B" in best.text
    unmarked = admin_client.post(f"{base}/{task.id}/unmark", headers=HX)
    assert "No gold tasks yet" in unmarked.text
    assert admin_client.get(f"{base}/form?task_id=999999", headers=HX).status_code == 404


def test_gold_rate_form(admin_client, session, three):
    ps = three[0]
    url = f"/admin/prompt-sets/{ps.id}/quality/gold-rate"
    assert "Saved: 0.1" in admin_client.post(url, data={"gold_rate": "0.1"}, headers=HX).text
    bad = admin_client.post(url, data={"gold_rate": "3"}, headers=HX)
    assert bad.status_code == 422 and "between 0 and 1" in bad.text
    session.refresh(ps)
    assert ps.gold_rate == 0.1


def test_export_page_download_and_sidecar(admin_client, three):
    ps, ann, bob, rex = three
    page = admin_client.get(f"/admin/prompt-sets/{ps.id}/export").text
    assert 'name="format" value="conversational"' in page and f'value="{rex.id}"' in page
    assert "/export/meta" in page
    base = f"/admin/prompt-sets/{ps.id}/export"
    response = admin_client.get(f"{base}/download", params={"format": "plain", "labelers": [ann.id, bob.id],
                                                            "split": "", "min_agreement": ""})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    assert f'filename="set-{ps.id}-comparisons-plain.jsonl"' in response.headers["content-disposition"]
    rows = [json.loads(line) for line in response.text.splitlines()]
    assert len(rows) == 4 * 3 * 2 and {r["labeler_id"] for r in rows} == {ann.id, bob.id}
    meta = admin_client.get(f"{base}/meta", params={"format": "plain", "labelers": f"{ann.id},{bob.id}"})
    assert meta.headers["content-disposition"].endswith('.jsonl.meta.json"')
    assert meta.json()["rows"] == 24 and meta.json()["filters"]["labelers"] == sorted([ann.id, bob.id])
    csv_rows = list(csv.DictReader(io.StringIO(admin_client.get(f"{base}/download?format=csv").text)))
    assert len(csv_rows) == 12 * 3
    bad = admin_client.get(f"{base}/download?format=plain&date_from=yesterday")
    assert bad.status_code == 422 and "date_from" in bad.text


def test_download_streams_in_chunks(admin_client, session):
    ps = make_prompt_set(session, k=4, overlap=2)
    users = {make_user(session).id: "consistent", make_user(session).id: "random"}
    counts = bulk_seed_session(session, prompt_set_id=ps.id, labelers=users, tasks=300, k=4, overlap=2)
    with admin_client.stream("GET", f"/api/v1/prompt-sets/{ps.id}/export?format=conversational") as response:
        assert response.status_code == 200
        chunks = list(response.iter_raw())
    assert len(chunks) > 5  # body messages as the server sent them
    lines = b"".join(chunks).decode().splitlines()
    assert len(lines) == counts.comparisons == 300 * 2 * 6


def test_api_agreement_progress_export_and_exclusion(admin_client, three):
    ps, ann, bob, rex = three
    body = admin_client.get(f"/api/v1/prompt-sets/{ps.id}/agreement").json()
    assert body["pairwise_pairs"] == 4 * 3 * 3 and body["pairwise_agreement"] == pytest.approx(1 / 3)
    figures = {f["username"]: f for f in body["labelers"]}
    assert figures["q-rex"]["consensus_agreement"] == 0.0 and len(figures["q-rex"]["rating_histogram"]) == 7
    progress = admin_client.get(f"/api/v1/prompt-sets/{ps.id}/progress?hours=6").json()
    assert progress["done"] == 4 and progress["waiting"] == 0 and len(progress["per_hour"]) == 6
    excluded = admin_client.post(f"/api/v1/prompt-sets/{ps.id}/labelers/{rex.id}/exclude").json()
    assert excluded == {"prompt_set_id": ps.id, "user_id": rex.id, "scope": "set", "changed": 4,
                        "annotations": 4, "excluded": 4}
    export = admin_client.get(f"/api/v1/prompt-sets/{ps.id}/export", params={"kind": "annotations", "format": "jsonl"})
    assert {json.loads(line)["labeler"] for line in export.text.splitlines()} == {"q-ann", "q-bob"}
    meta = admin_client.get(f"/api/v1/prompt-sets/{ps.id}/export/meta?kind=annotations&format=jsonl").json()
    assert meta["rows"] == 8 and meta["row_unit"] == "annotation"
    included = admin_client.post(f"/api/v1/prompt-sets/{ps.id}/labelers/{rex.id}/include?everywhere=true").json()
    assert included["scope"] == "everywhere" and included["excluded"] == 0
    wrong = admin_client.get(f"/api/v1/prompt-sets/{ps.id}/export?kind=comparisons&format=csv")
    assert wrong.status_code == 422 and wrong.json()["errors"] == {"format": "choose plain or conversational"}
    assert admin_client.get("/api/v1/prompt-sets/999999/agreement").status_code == 404


def test_cli_writes_the_file_and_its_sidecar(committed, tmp_path):
    from app.cli import cli

    with session_scope() as s:
        ps = make_prompt_set(s, k=3, overlap=2)
        ann, bob = make_user(s), make_user(s)
        task, ids = task_with_ids(s, ps)
        annotate(s, task, ids, ann, [1, 2, 3])
        annotate(s, task, ids, bob, [2, 1, 3])
        set_id = ps.id
    out = tmp_path / "pairs.jsonl"
    result = CliRunner().invoke(cli, ["export", "comparisons", "--set", str(set_id), "--format", "conversational",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote 6 comparison rows" in result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and rows[0]["chosen"][0]["role"] == "assistant"
    meta = json.loads((tmp_path / "pairs.jsonl.meta.json").read_text())
    assert meta["rows"] == 6 and meta["format"] == "conversational" and meta["file"] == "pairs.jsonl"
    bad = CliRunner().invoke(cli, ["export", "annotations", "--set", str(set_id), "--format", "xml",
                                   "--out", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "choose jsonl or csv" in bad.output
    assert not (tmp_path / "x").exists()

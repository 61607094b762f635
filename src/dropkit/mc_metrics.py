"""How good a classifier's uncertainty is: accuracy, NLL, Brier score, calibration and OOD detection.

Inputs are class probabilities ``(N, classes)`` (a deterministic softmax, or the mean over Monte
Carlo dropout passes) and integer labels ``(N,)``; every metric returns a Python float.

* :func:`nll`: mean negative log-likelihood of the true class (a proper scoring rule).
* :func:`brier_score`: mean over inputs of the squared distance between the probability vector
  and the one-hot label, summed over classes (Brier 1950), in [0, 2].
* :func:`expected_calibration_error`: Naeini et al. (AAAI 2015), as Guo et al. ("On Calibration of
  Modern Neural Networks", ICML 2017) use it: inputs are put in ``bins`` equal-width bins of their
  confidence (the top probability; bin ``b`` holds confidences in ``(b/bins, (b+1)/bins]``, the
  first bin also 0), and ECE is the input-weighted mean of ``|accuracy - mean confidence|`` over
  the bins. :func:`reliability_diagram` returns the per-bin figures behind it.
* Out-of-distribution detection: a score that should be higher on unfamiliar inputs
  (:func:`uncertainty_scores`: total predictive entropy, mutual information between the
  prediction and the weights, one minus the top probability) separates in-distribution from
  out-of-distribution inputs; :func:`auroc` is the area under the ROC curve with the
  out-of-distribution inputs as positives (ties count one half), :func:`average_precision` the
  area under the precision-recall curve as the sum over thresholds of the recall step times the
  precision (the definition of scikit-learn's ``average_precision_score``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dropkit.mc import entropy

__all__ = [
    "DEFAULT_BINS",
    "Reliability",
    "accuracy",
    "auroc",
    "average_precision",
    "brier_score",
    "expected_calibration_error",
    "nll",
    "reliability_diagram",
    "uncertainty_scores",
]

#: the bin count of Guo et al. 2017
DEFAULT_BINS = 15

#: the smallest probability :func:`nll` takes the log of (a probability of 0 would give infinity)
_PROB_FLOOR = 1e-12


def _check(probs: torch.Tensor, labels: torch.Tensor) -> None:
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2 or not probs.is_floating_point():
        raise ValueError(f"probs must be a float tensor (N, classes), got {getattr(probs, 'shape', type(probs))}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor (N,), got {getattr(labels, 'dtype', type(labels))}")
    if labels.shape[0] != probs.shape[0] or probs.shape[0] == 0:
        raise ValueError(f"probs and labels must hold the same number (> 0) of inputs, got {probs.shape[0]} "
                         f"and {labels.shape[0]}")
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(f"labels must be class indices in [0, {probs.shape[1]}), got "
                         f"[{int(labels.min())}, {int(labels.max())}]")


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of inputs whose most probable class is the label."""
    _check(probs, labels)
    return float((probs.argmax(1) == labels).double().mean())


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood (nats) of the labels; probabilities are floored at 1e-12."""
    _check(probs, labels)
    picked = probs.double().gather(1, labels[:, None]).squeeze(1)
    return float(-picked.clamp_min(_PROB_FLOOR).log().mean())


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over inputs of ``sum_k (p_k - [k == label])^2``."""
    _check(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).double()
    return float((probs.double() - onehot).pow(2).sum(1).mean())


@dataclass(frozen=True)
class Reliability:
    """Per-bin calibration figures (see :func:`reliability_diagram`).

    Attributes:
        edges: the ``bins + 1`` bin edges, from 0 to 1.
        counts: inputs per bin.
        confidence: mean top probability per bin (NaN for an empty bin).
        accuracy: fraction correct per bin (NaN for an empty bin).
    """

    edges: list[float]
    counts: list[int]
    confidence: list[float]
    accuracy: list[float]

    @property
    def ece(self) -> float:
        """Expected calibration error: the count-weighted mean of ``|accuracy - confidence|``."""
        total = sum(self.counts)
        return sum(n * abs(a - c) for n, a, c in zip(self.counts, self.accuracy, self.confidence) if n) / total

    def to_dict(self) -> dict[str, list]:
        """JSON-ready lists (empty bins' NaN become None)."""
        def clean(values: list[float]) -> list[float | None]:
            return [None if v != v else v for v in values]

        return {"edges": self.edges, "counts": self.counts, "confidence": clean(self.confidence),
                "accuracy": clean(self.accuracy)}


def _check_bins(bins: int) -> None:
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be an int >= 1, got {bins!r}")


def reliability_diagram(probs: torch.Tensor, labels: torch.Tensor, bins: int = DEFAULT_BINS) -> Reliability:
    """Accuracy against confidence in ``bins`` equal-width confidence bins.

    Bin ``b`` holds the inputs whose top probability lies in ``(b/bins, (b+1)/bins]`` (bin 0 also
    takes 0). A calibrated model has accuracy equal to confidence in every bin.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.55, 0.45], [0.3, 0.7]])
        >>> labels = torch.tensor([0, 1, 1])
        >>> diagram = reliability_diagram(probs, labels, bins=5)
        >>> diagram.counts, diagram.ece == expected_calibration_error(probs, labels, bins=5)
        ([0, 0, 1, 1, 1], True)
    """
    _check(probs, labels)
    _check_bins(bins)
    confidence, predicted = probs.double().max(1)
    correct = (predicted == labels).double()
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    counts = torch.bincount(index, minlength=bins)
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidence)
    acc_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct)
    safe = counts.clamp_min(1).double()
    empty = counts == 0
    mean_conf = torch.where(empty, float("nan"), conf_sum / safe)
    mean_acc = torch.where(empty, float("nan"), acc_sum / safe)
    edges = [b / bins for b in range(bins + 1)]
    return Reliability(edges, counts.tolist(), mean_conf.tolist(), mean_acc.tolist())


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = DEFAULT_BINS) -> float:
    """ECE over ``bins`` equal-width confidence bins (15 by default, as Guo et al. 2017)."""
    return reliability_diagram(probs, labels, bins).ece


def uncertainty_scores(probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-input scores that grow with uncertainty, from class probabilities.

    ``probs`` is ``(N, classes)`` (one prediction) or ``(passes, N, classes)`` (Monte Carlo
    passes). Returns ``total_entropy`` (entropy of the mean prediction), ``max_probability``
    (one minus the mean prediction's top probability) and, for passes, ``mutual_information``
    (total entropy minus the mean entropy of the passes; Houlsby et al. 2011).
    """
    if not isinstance(probs, torch.Tensor) or probs.dim() not in (2, 3):
        raise ValueError(f"probs must be (N, classes) or (passes, N, classes), got {getattr(probs, 'shape', probs)}")
    probs = probs.double()
    mean = probs.mean(0) if probs.dim() == 3 else probs
    scores = {"total_entropy": entropy(mean), "max_probability": 1.0 - mean.max(-1).values}
    if probs.dim() == 3:
        scores["mutual_information"] = (scores["total_entropy"] - entropy(probs).mean(0)).clamp_min(0.0)
    return scores


def _scores(inside: torch.Tensor, outside: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    for name, value in (("inside", inside), ("outside", outside)):
        if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.numel() == 0:
            raise ValueError(f"{name} must be a non-empty 1-D tensor of scores, got {getattr(value, 'shape', value)}")
        if not torch.isfinite(value).all():
            raise ValueError(f"{name} scores must be finite")
    scores = torch.cat([inside, outside]).double()
    positive = torch.cat([torch.zeros(len(inside)), torch.ones(len(outside))]).double()
    return scores, positive


def auroc(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """Area under the ROC curve of telling ``outside`` (positives) from ``inside`` by a score.

    The probability that a random out-of-distribution input scores higher than a random
    in-distribution one, ties counting one half (the Mann-Whitney U statistic over the product of
    the counts). 1 separates perfectly, 0.5 is chance.

    Example:
        >>> auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.2]))
        0.875
    """
    scores, positive = _scores(inside, outside)
    order = scores.argsort()
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # ties take the mean of their ranks
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks[order] = mean_rank[inverse]
    n_pos, n_neg = len(outside), len(inside)
    rank_sum = float(ranks[positive == 1].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def average_precision(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """Area under the precision-recall curve with ``outside`` as positives (AUPR-out).

    ``sum_k (R_k - R_{k-1}) P_k`` over the distinct score thresholds from the highest down, where
    ``P_k`` and ``R_k`` are the precision and recall of flagging every input scoring ``>=`` the
    k-th threshold. The chance level is the fraction of positives.
    """
    scores, positive = _scores(inside, outside)
    order = scores.argsort(descending=True, stable=True)
    scores, positive = scores[order], positive[order]
    true_pos = positive.cumsum(0)
    flagged = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    last_of_threshold = torch.ones(len(scores), dtype=torch.bool)
    last_of_threshold[:-1] = scores[1:] != scores[:-1]
    true_pos, flagged = true_pos[last_of_threshold], flagged[last_of_threshold]
    precision = true_pos / flagged
    recall = true_pos / len(outside)
    steps = torch.diff(recall, prepend=torch.zeros(1, dtype=torch.float64))
    return float((steps * precision).sum())

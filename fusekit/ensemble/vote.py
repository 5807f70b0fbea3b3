"""Choose one answer among whole answers: majority vote or minimum Bayes risk.

``vote`` normalises answers (case, spacing, trailing punctuation) and takes the one with the
largest total weight. ``mbr`` takes the answer with the highest expected utility against all the
others: chrF (character n-gram F-score, n = 1..6, β = 2, after Popović 2015) or token F1 (bag of words
overlap, as in SQuAD).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

_SPACE = re.compile(r"\s+")


def normalise(answer: str) -> str:
    """Lower case, single spaces, no surrounding space or trailing punctuation."""
    return _SPACE.sub(" ", answer.lower()).strip().rstrip(string.punctuation + " ")


def majority(answers: Sequence[str], weights: Sequence[float]) -> int:
    """Index of the first answer whose normalised form has the largest total weight."""
    totals: dict[str, float] = {}
    for answer, weight in zip(answers, weights, strict=True):
        key = normalise(answer)
        totals[key] = totals.get(key, 0.0) + weight
    best = max(totals.values())
    return next(i for i, a in enumerate(answers) if totals[normalise(a)] == best)


def _ngrams(text: str, n: int) -> Counter[str]:
    return Counter(text[i:i + n] for i in range(len(text) - n + 1))


def chrf(hypothesis: str, reference: str, *, order: int = 6, beta: float = 2.0) -> float:
    """chrF in [0, 1]: character n-gram precision and recall (spaces removed), each averaged over
    the orders n = 1..order that both strings are long enough to have, combined as F-beta. Two
    empty strings score 1, one empty string 0."""
    hyp, ref = _SPACE.sub("", hypothesis), _SPACE.sub("", reference)
    if not hyp or not ref:
        return 1.0 if hyp == ref else 0.0
    precisions: list[float] = []
    recalls: list[float] = []
    for n in range(1, min(order, len(hyp), len(ref)) + 1):
        hyp_grams, ref_grams = _ngrams(hyp, n), _ngrams(ref, n)
        match = sum((hyp_grams & ref_grams).values())
        precisions.append(match / sum(hyp_grams.values()))
        recalls.append(match / sum(ref_grams.values()))
    p, r = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    if p == 0 and r == 0:
        return 0.0
    return (1 + beta**2) * p * r / (beta**2 * p + r)


def token_f1(hypothesis: str, reference: str) -> float:
    """F1 of the bags of lower-cased words (punctuation stripped); two empty answers score 1."""
    def words(text: str) -> list[str]:
        return text.lower().translate(str.maketrans("", "", string.punctuation)).split()

    h, r = Counter(words(hypothesis)), Counter(words(reference))
    if not h and not r:
        return 1.0
    common = sum((h & r).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(h.values()), common / sum(r.values())
    return 2 * precision * recall / (precision + recall)


UTILITIES = {"chrf": chrf, "token_f1": token_f1}


def mbr(answers: Sequence[str], weights: Sequence[float], utility: str = "chrf") -> tuple[int, list[float]]:
    """Index of the answer with the highest weighted mean utility against the other answers,
    and every answer's expected utility. A single answer is chosen trivially."""
    score = UTILITIES[utility]
    expected = []
    for i, hyp in enumerate(answers):
        total = sum(w for j, w in enumerate(weights) if j != i)
        value = sum(w * score(hyp, ref) for j, (ref, w) in enumerate(zip(answers, weights, strict=True))
                    if j != i)
        expected.append(value / total if total > 0 else 1.0)
    best = max(range(len(answers)), key=lambda i: (expected[i], -i))
    return best, expected


@dataclass(frozen=True)
class VoteMethod:
    """``vote``: the answer with the largest total weight after :func:`normalise`.

    Attributes:
        samples: answers each member writes.
    """

    samples: int = 1

    def pick(self, answers: Sequence[str], weights: Sequence[float]) -> int:
        """See :meth:`fusekit.ensemble.base.AnswerMethod.pick`."""
        return majority(answers, weights)


@dataclass(frozen=True)
class MbrMethod:
    """``mbr``: the answer with the highest expected ``utility`` against the others (:func:`mbr`).

    Attributes:
        samples: answers each member writes.
        utility: ``chrf`` or ``token_f1``.
    """

    samples: int = 1
    utility: str = "chrf"

    def pick(self, answers: Sequence[str], weights: Sequence[float]) -> int:
        """See :meth:`fusekit.ensemble.base.AnswerMethod.pick`."""
        return mbr(answers, weights, self.utility)[0]

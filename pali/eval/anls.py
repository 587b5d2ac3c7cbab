"""ANLS, the Average Normalized Levenshtein Similarity of ST-VQA / DocVQA (Biten et al. 2019).

For one question with answers A and prediction p (both lower-cased, whitespace collapsed):
NL(p, a) = lev(p, a) / max(|p|, |a|), s(p, a) = 1 - NL if NL < tau else 0, tau = 0.5; the question
scores max_a s(p, a) and ANLS is the mean over questions.
"""

from __future__ import annotations

from collections.abc import Sequence

from pali.eval.text import normalize_answer_text

ANLS_THRESHOLD = 0.5
"""tau: normalised distances at or above it score 0."""


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1), over Unicode code points."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """ANLS of one prediction against its reference answers, in [0, 1]."""
    if not answers:
        raise ValueError("ANLS needs at least one reference answer; got none")
    pred = normalize_answer_text(prediction)
    best = 0.0
    for answer in answers:
        gt = normalize_answer_text(answer)
        longest = max(len(pred), len(gt))
        distance = levenshtein(pred, gt) / longest if longest else 0.0
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


def ocr_exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised answer, else 0.0."""
    if not answers:
        raise ValueError("exact match needs at least one reference answer; got none")
    pred = normalize_answer_text(prediction)
    return float(any(normalize_answer_text(a) == pred for a in answers))

"""CIDEr-D (Vedantam et al. 2015) exactly as the COCO caption evaluation (`pycocoevalcap`) computes it.

For a corpus of images i with candidate c_i and references S_i:

- n-gram (n = 1..4) term frequencies g(.) are weighted by idf = log(|I|) - log(max(1, df)), where df
  counts the images whose reference set contains the n-gram (document frequency over *this* corpus);
- per n, sim_n(c, s) = sum_k min(g_k(c), g_k(s)) * g_k(s) / (|g(c)| |g(s)|)  (the "-D" clipping)
  times the Gaussian length penalty exp(-(l_c - l_s)^2 / (2 sigma^2)), sigma = 6;
- CIDEr-D_i = 10 * mean_n mean_{s in S_i} sim_n(c_i, s); the corpus score is the mean over images.

As in the reference code, the length l of a caption is its number of bigrams (words - 1 for a
non-empty caption); we keep that so scores agree with published numbers to the last digit.
Inputs are already tokenized (see `pali.eval.text.tokenize_caption`); no Java / PTBTokenizer.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

NGram = tuple[str, ...]


def _ngrams(tokens: Sequence[str], n: int) -> Counter[NGram]:
    counts: Counter[NGram] = Counter()
    for k in range(1, n + 1):
        for i in range(len(tokens) - k + 1):
            counts[tuple(tokens[i:i + k])] += 1
    return counts


def _tfidf(counts: Counter[NGram], df: dict[NGram, float], log_num_images: float, n: int):
    """(vec per order, L2 norm per order, length in bigrams) of one caption."""
    vec: list[dict[NGram, float]] = [{} for _ in range(n)]
    norm = [0.0] * n
    length = 0
    for gram, tf in counts.items():
        order = len(gram) - 1
        weight = float(tf) * (log_num_images - math.log(max(1.0, df.get(gram, 0.0))))
        vec[order][gram] = weight
        norm[order] += weight * weight
        if order == 1:  # the reference implementation counts bigrams as the caption length
            length += tf
    return vec, [math.sqrt(x) for x in norm], length


def cider_d(
    hypotheses: Sequence[Sequence[str]],
    references: Sequence[Sequence[Sequence[str]]],
    n: int = 4,
    sigma: float = 6.0,
) -> tuple[float, list[float]]:
    """CIDEr-D of a corpus: (corpus score, per-image scores), on the pycocoevalcap scale (x10, not x100).

    hypotheses: one token list per image. references: for each image, a non-empty list of token lists.
    The document frequencies come from the references of exactly this corpus, so a corpus of one
    image always scores 0 (every n-gram has idf 0), as in the reference implementation.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets; expected equal")
    if not hypotheses:
        return 0.0, []
    for i, refs in enumerate(references):
        if len(refs) == 0:
            raise ValueError(f"image {i} has no references; CIDEr needs at least one per image")
    ref_counts = [[_ngrams(r, n) for r in refs] for refs in references]
    df: dict[NGram, float] = {}
    for refs in ref_counts:
        for gram in {g for r in refs for g in r}:
            df[gram] = df.get(gram, 0.0) + 1.0
    log_num_images = math.log(float(len(references)))
    penalty_denominator = 2.0 * sigma * sigma

    scores: list[float] = []
    for hyp, refs in zip(hypotheses, ref_counts, strict=True):
        vec_h, norm_h, len_h = _tfidf(_ngrams(hyp, n), df, log_num_images, n)
        total = [0.0] * n
        for ref in refs:
            vec_r, norm_r, len_r = _tfidf(ref, df, log_num_images, n)
            penalty = math.exp(-float(len_h - len_r) ** 2 / penalty_denominator)
            for k in range(n):
                val = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec_h[k].items())
                if norm_h[k] != 0 and norm_r[k] != 0:
                    val /= norm_h[k] * norm_r[k]
                total[k] += val * penalty
        scores.append(10.0 * (sum(total) / n) / len(refs))
    return sum(scores) / len(scores), scores

"""VQA accuracy with the VQAv2 answer normalisation, and exact match.

Normalisation follows the official VQA evaluation script (`vqaEval.py`, GT-Vision-Lab/VQA):
newlines/tabs -> spaces and strip; punctuation from a fixed list is deleted (when it touches a space,
or the text has a digit-comma-digit) or replaced by a space otherwise; a period not followed by a digit
is deleted; lower-case; number words "none", "zero" ... "ten" -> digits; articles a/an/the dropped;
apostrophe-less contractions restored ("dont" -> "don't").

Differences from the script, on purpose:
- both the prediction and every reference answer get the full normalisation (the script normalises
  references only when they disagree, and never maps their number words/articles, because VQAv2's
  annotations were pre-normalised; our references may be raw text);
- the contraction table uses the ASCII apostrophe throughout.

Soft score for n >= 4 reference answers (VQAv2 has 10): for each of the n leave-one-out subsets of
n - 1 answers, acc = min(#answers in the subset equal to the prediction / 3, 1); the score is the mean
over the n subsets (for n = 10 that is the official average over the 10 choose 9 subsets). With fewer
than 4 answers (single-answer datasets) a soft score cannot reach 1, so the score is 1 when the
prediction equals any reference answer and 0 otherwise. Exact match is that same "equals any"
indicator for every n.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "id've": "i'd've",
    "i'dve": "i'd've", "im": "i'm", "ive": "i've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
          ",", "?", "!"]
# The script's pattern "(?!<=\d)(\.)(?!\d)" has a broken look-behind, so in effect it deletes every
# period not followed by a digit ("3." -> "3", "3.5" kept); we keep that behaviour.
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")

MIN_ANSWERS_FOR_SOFT_SCORE = 4
"""Below this many reference answers VQA accuracy falls back to "equals any answer"."""


def _process_punctuation(text: str) -> str:
    out = text
    number_comma = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """VQAv2 answer normalisation: "Two Dogs." -> "2 dogs", "the cat" -> "cat", "dont" -> "don't"."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 soft accuracy of one prediction against its reference answers, in [0, 1] (see module doc)."""
    if not answers:
        raise ValueError("VQA accuracy needs at least one reference answer; got none")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    if len(gts) < MIN_ANSWERS_FOR_SOFT_SCORE:
        return float(pred in gts)
    matches = sum(g == pred for g in gts)
    # Leaving out answer i removes one match exactly when answer i itself matches.
    accs = [min(1.0, (matches - (g == pred)) / 3.0) for g in gts]
    return sum(accs) / len(accs)


def vqa_exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference answer, else 0.0."""
    if not answers:
        raise ValueError("exact match needs at least one reference answer; got none")
    pred = normalize_vqa_answer(prediction)
    return float(any(normalize_vqa_answer(a) == pred for a in answers))

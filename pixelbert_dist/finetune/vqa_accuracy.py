"""VQA accuracy as the official evaluation computes it (GT-Vision-Lab/VQA,
``PythonEvaluationTools/vqaEvaluation/vqaEval.py``), written from its published behaviour.

Two rules, named after the versions of that file:

* ``"official"`` (the default): master since 2021-03-11, commit a013f00 "Fixed
  processing answers bug". Every answer (prediction and the ten humans) loses newlines,
  tabs and outer spaces. When the humans all agree nothing else happens: the prediction
  must equal their answer as written (``"Yes"`` scores 0 against ten ``"yes"``). When they
  disagree, the prediction and every human answer are cleaned fully (punctuation, lower
  case, number words to digits, articles dropped, contractions restored).
* ``"legacy-2016"``: the file before that commit, for reproducing older papers. The
  prediction is always cleaned fully; the human answers only punctuation-cleaned, and
  only when they disagree (so ``"2"`` never matches a human ``"two"``).

Either way the accuracy of one question is the mean over the ten leave-one-out sets of
nine human answers of ``min(1, #matches / 3)``, and the official script reports
percentages rounded to 2 decimals (``round(100 * mean, 2)``).

Python 3 semantics throughout (``\\d`` matches any Unicode digit, as the Python 3 ports
of the script run; the master file itself is Python 2 code).
"""

from __future__ import annotations

import functools
import re
from typing import Literal, Sequence

AccuracyRule = Literal["official", "legacy-2016"]
ACCURACY_RULES: tuple[str, ...] = ("official", "legacy-2016")
DECIMALS = 2  # vqaEval's n: the precision of every reported accuracy

# The contraction table of vqaEval.py, entry for entry (including its odd entries such as
# "somebody'd" -> "somebodyd" and the capitalised keys that can never match after lower()).
CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# "(?!<=" is a typo for a look-behind in the official script: it is a look-ahead that never
# fires, so the pattern strips every period not followed by a digit ("3.5" survives).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The official script passes re.UNICODE (= 32) as re.sub's *count*: at most 32 periods go.
_PERIOD_COUNT = 32


def process_punctuation(text: str) -> str:
    """vqaEval.processPunctuation: a mark next to a space (or any text holding a digit
    comma digit, e.g. "1,000") is deleted, otherwise it becomes a space; then periods go."""
    out = text
    delete_all = _COMMA_STRIP.search(text) is not None
    for mark in PUNCTUATION:
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """vqaEval.processDigitArticle: lower case, number words to digits, no articles,
    contractions restored ("isnt" -> "isn't")."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


@functools.lru_cache(maxsize=1 << 16)  # answers repeat a lot: 4.4M in VQA train, few distinct
def normalize_answer(text: str) -> str:
    """Whitespace, punctuation, digits, articles, contractions: the full cleaning (the
    legacy rule's prediction; the answer vocabulary and the training targets)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


@functools.lru_cache(maxsize=1 << 16)
def strip_whitespace(text: str) -> str:
    """Newlines and tabs to spaces, outer spaces off: what every answer gets first."""
    return text.replace("\n", " ").replace("\t", " ").strip()


@functools.lru_cache(maxsize=1 << 16)
def _clean_fully(text: str) -> str:
    return process_digit_article(process_punctuation(text))


def _compared(pred: str, gt_answers: Sequence[str], rule: str) -> tuple[str, list[str]]:
    """The prediction and the human answers as the rule compares them."""
    if rule == "official":
        res, gts = strip_whitespace(pred), [strip_whitespace(a) for a in gt_answers]
        if len(set(gts)) > 1:
            res, gts = _clean_fully(res), [_clean_fully(a) for a in gts]
        return res, gts
    if rule == "legacy-2016":
        gts = list(gt_answers)
        if len(set(gts)) > 1:
            gts = [process_punctuation(a) for a in gts]
        return normalize_answer(pred), gts
    raise ValueError(f"VQA accuracy rule {rule!r}: choose one of {list(ACCURACY_RULES)}")


def vqa_accuracy(pred: str, gt_answers: Sequence[str], rule: str = "official") -> float:
    """The accuracy of one prediction against the human answers (0..1), unrounded."""
    if not gt_answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    res, gts = _compared(pred, gt_answers, rule)
    matches = sum(1 for a in gts if a == res)
    # leave-one-out: a set that leaves out a matching answer holds matches - 1 of them
    total = sum(min(1.0, (matches - (a == res)) / 3.0) for a in gts)
    return total / len(gts)


def reported(percent: float) -> float:
    """A percentage as the official script reports it: ``round(x, 2)``."""
    return round(percent, DECIMALS)

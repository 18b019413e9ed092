"""VQA answers as the official VQA evaluation and ViLT treat them: normalisation, vocabulary, soft scores."""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "lets": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "shant": "shan't", "shed": "she'd", "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "thats": "that's", "thered": "there'd", "theres": "there's", "theyd": "they'd", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "wasnt": "wasn't", "wed": "we'd", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or re.search(_COMMA_STRIP, text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def normalize_answer(answer: str) -> str:
    """The official VQA evaluation's answer processing: lower case, punctuation, number words → digits, articles
    dropped, contractions restored (``"Two dogs."`` → ``"2 dogs"``, ``"dont know"`` → ``"don't know"``)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _punctuation(text)
    words = []
    for word in text.split():
        word = NUMBERS.get(word, word)
        if word in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def soft_score(count: int) -> float:
    """ViLT's score of an answer given by ``count`` of the 10 annotators: 1→0.3, 2→0.6, 3→0.9, ≥4→1.0."""
    return {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9}.get(count, 1.0)


def answer_scores(annotator_answers: Iterable[str]) -> dict[str, float]:
    """Normalised answers of one question → ``{answer: soft score}``."""
    counts = Counter(normalize_answer(a) for a in annotator_answers)
    return {a: soft_score(c) for a, c in counts.items()}


def vocabulary(answer_lists: Iterable[Iterable[str]], min_freq: int) -> list[str]:
    """Answers occurring at least ``min_freq`` times (one count per question that has it), most frequent first,
    ties alphabetically (paper: min_freq 9 gives 3,129 answers on VQAv2)."""
    counts = Counter(a for answers in answer_lists for a in set(answers))
    return sorted((a for a, c in counts.items() if c >= min_freq), key=lambda a: (-counts[a], a))

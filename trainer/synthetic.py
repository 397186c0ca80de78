"""Two small synthetic languages for the demo: the project's own text, generated from grammars, no download.

"Kalimo" (language A) and "Zebudy" (language B) have disjoint syllable inventories, so their words (and the
SentencePiece pieces learned from them) barely overlap, and different grammars: A is subject-verb-object with
prepositions, determiners before the noun and adjectives agreeing with the noun's class; B is subject-object-verb
with postpositions, case suffixes and verbs agreeing with the subject's number. Each document keeps to a few
topic nouns, so a model can also learn in-context repetition. Generation is a pure function of (language, seed):
the same corpus on every machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Language:
    name: str
    consonants: str
    vowels: str
    order: str  # "SVO" or "SOV"


KALIMO = Language("kalimo", "klmnpt", "aio", "SVO")
ZEBUDY = Language("zebudy", "bdgrsz", "euy", "SOV")
LANGUAGES = {"a": KALIMO, "b": ZEBUDY}


def _word(rng: random.Random, lang: Language, syllables: int) -> str:
    return "".join(rng.choice(lang.consonants) + rng.choice(lang.vowels) for _ in range(syllables))


def _lexicon(lang: Language, seed: int) -> dict[str, list[str]]:
    rng = random.Random(f"{lang.name}-lexicon-{seed}")
    sizes = {"noun": 60, "verb": 30, "adj": 24, "det": 4, "prep": 6, "conj": 3}
    syllables = {"noun": (2, 3), "verb": (2, 3), "adj": (2, 3), "det": (1, 1), "prep": (1, 2), "conj": (1, 2)}
    seen: set[str] = set()
    lexicon: dict[str, list[str]] = {}
    for cls, n in sizes.items():
        words = []
        while len(words) < n:
            w = _word(rng, lang, rng.randint(*syllables[cls]))
            if w not in seen:
                seen.add(w)
                words.append(w)
        lexicon[cls] = words
    return lexicon


class _Grammar:
    def __init__(self, lang: Language, seed: int) -> None:
        self.lang = lang
        self.lex = _lexicon(lang, seed)
        # Zipf-like word frequencies: a few words are common, most are rare.
        self.weights = {cls: [1.0 / (i + 1) for i in range(len(ws))] for cls, ws in self.lex.items()}

    def pick(self, rng: random.Random, cls: str) -> str:
        return rng.choices(self.lex[cls], weights=self.weights[cls])[0]

    def noun_phrase(self, rng: random.Random, topic: list[str], case: str) -> tuple[str, bool]:
        noun = rng.choice(topic) if rng.random() < 0.6 else self.pick(rng, "noun")
        plural = rng.random() < 0.3
        noun_class = len(noun) % 2  # agreement class, visible in the word's length
        v = self.lang.vowels
        if self.lang.order == "SVO":
            det = self.lex["det"][noun_class * 2 + plural]
            words = [det]
            if rng.random() < 0.5:
                words.append(self.pick(rng, "adj") + (v[0] if noun_class else v[1]))
            words.append(noun + (v[2] if plural else ""))
        else:
            words = []
            if rng.random() < 0.5:
                words.append(self.pick(rng, "adj"))
            suffix = {"subj": "", "obj": v[0] + "s", "loc": v[1] + "d"}[case]
            words.append(noun + ("r" + v[2] if plural else "") + suffix)
        return " ".join(words), plural

    def clause(self, rng: random.Random, topic: list[str]) -> str:
        subject, plural = self.noun_phrase(rng, topic, "subj")
        verb = self.pick(rng, "verb")
        obj, _ = self.noun_phrase(rng, topic, "obj")
        v = self.lang.vowels
        if self.lang.order == "SVO":
            parts = [subject, verb + (v[0] + "n" if plural else ""), obj]
            if rng.random() < 0.4:
                parts += [self.pick(rng, "prep"), self.noun_phrase(rng, topic, "loc")[0]]
        else:
            parts = [subject]
            if rng.random() < 0.4:
                parts += [self.noun_phrase(rng, topic, "loc")[0], self.pick(rng, "prep")]
            parts += [obj, verb + ("z" + v[1] if plural else "")]
        return " ".join(parts)

    def sentence(self, rng: random.Random, topic: list[str]) -> str:
        text = self.clause(rng, topic)
        if rng.random() < 0.3:
            text += " " + self.pick(rng, "conj") + " " + self.clause(rng, topic)
        return text[0].upper() + text[1:] + "."


def generate(language: str, *, documents: int, seed: int = 0) -> list[str]:
    """`documents` documents of 2-8 sentences in language "a" (Kalimo) or "b" (Zebudy)."""
    if language not in LANGUAGES:
        raise ValueError(f"unknown synthetic language {language!r}; choose 'a' or 'b'")
    grammar = _Grammar(LANGUAGES[language], seed)
    rng = random.Random(f"{language}-text-{seed}")
    docs = []
    for _ in range(documents):
        topic = rng.sample(grammar.lex["noun"], 3)
        docs.append(" ".join(grammar.sentence(rng, topic) for _ in range(rng.randint(2, 8))))
    return docs

"""Noun-phrase extractors for concept-balanced caption filtering (`data_prep.filter_concepts`).

An extractor maps a batch of captions to one list of noun phrases per caption:
`extract(captions: list[str]) -> list[list[str]]`. Phrases are normalised the same way by every
extractor: lower-cased, whitespace collapsed, leading determiners/pronouns/numbers dropped ("A red
bike" and "the red bike" are one concept, "red bike").

* `spacy`: the noun chunks of spaCy's English pipeline (`en_core_web_sm` by default), as LLaVA
  did for CC3M. Optional: `pip install spacy==3.8.7 && python -m spacy download en_core_web_sm`.
* `rule`: a dependency-free heuristic, so the command works out of the box. A caption is cut into
  runs of words at punctuation and at words of a built-in list of function words (determiners,
  pronouns, prepositions, conjunctions, auxiliaries, number words, frequent caption verbs and
  adverbs), at verb-like words (ending in "-ing", or "-ed" with more than 4 letters, except a few
  nouns such as "building", "ceiling", "parking") and at digits; every run is a noun phrase (its last
  4 words when longer), unless it is only adjectives from a small list ("red", "large", ...).
  "A man riding a red bike on the street." -> ["man", "red bike", "street"]. It is rougher than
  a parser (an adjective after a copula may end up glued to the next noun, participles are dropped
  from "parked car" -> "car"); use spaCy for a real corpus.
* `auto`: spaCy when it and its English pipeline are installed, else `rule`.
"""
from __future__ import annotations

import re
from typing import Callable

Extractor = Callable[[list[str]], list[list[str]]]

DETERMINERS = set("""a an the this that these those some any each every its his her their our my your another
other several many few both all no such what which whose one two three four five six seven eight nine ten eleven
twelve dozen""".split())
FUNCTION_WORDS = DETERMINERS | set("""he she it they we i you him them us me who whom there here
of in on at to for with by from into onto over under above below near next beside besides behind between through
across along around against during after before up down out off about among inside outside toward towards via
upon within without beneath underneath atop like than as
and or but nor so yet if because while where when how why whether then
is are was were be been being am has have had do does did can could will would should may might must shall
not very too also just only now still together almost really quite rather much more most less least
sits sit stands stand holds hold looks look walks walk plays play rides ride wears wear eats eat lies lie lays lay
flies fly runs run waits wait watches watch talks talk takes take carries carry uses use drives drive poses pose
smiles smile shows show appears appear seems seem contains contain gets get goes go sitting standing holding
looking walking playing riding wearing eating lying laying flying running waiting watching talking taking carrying
using driving posing smiling showing getting going made covered filled parked seen shown topped""".split())
NOUNS_LOOKING_LIKE_VERBS = set("""building buildings ceiling clothing ring rings king thing things wing wings string
strings spring evening morning swing swings parking dining living icing frosting topping toppings painting paintings
railing railings speed breed hundred""".split())
ADJECTIVES = set("""red blue green yellow white black brown gray grey orange pink purple silver golden gold dark
light bright colorful big small large little tiny huge tall short long old young new empty full open closed
wooden metal plastic several different various other same many few""".split())
MAX_WORDS = 4
_SPLIT = re.compile(r"[.,;:!?()\[\]{}\"/]|\s-\s")
_TOKEN = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


def normalise_phrase(text: str) -> str:
    words = text.lower().split()
    while words and (words[0] in DETERMINERS or words[0].isdigit()):
        words.pop(0)
    return " ".join(words)


def _is_boundary(word: str) -> bool:
    if word in FUNCTION_WORDS or any(c.isdigit() for c in word):
        return True
    if word in NOUNS_LOOKING_LIKE_VERBS:
        return False
    return word.endswith("ing") and len(word) > 4 or word.endswith("ed") and len(word) > 4


def rule_phrases(caption: str) -> list[str]:
    """Noun phrases of one caption with the rule-based heuristic (module docstring); unique, in order."""
    out: list[str] = []
    for segment in _SPLIT.split(caption.lower()):
        run: list[str] = []
        for word in _TOKEN.findall(segment) + [""]:  # "" flushes the last run
            if word and not _is_boundary(word):
                run.append(word)
                continue
            if run and not all(w in ADJECTIVES for w in run):
                phrase = normalise_phrase(" ".join(run[-MAX_WORDS:]))
                if phrase and phrase not in out:
                    out.append(phrase)
            run = []
    return out


def rule_extractor(captions: list[str]) -> list[list[str]]:
    return [rule_phrases(c) for c in captions]


def spacy_extractor(nlp, batch_size: int = 256, n_process: int = 1) -> Extractor:
    """Noun chunks of a loaded spaCy pipeline (`nlp`), normalised; unique per caption, in order."""

    def extract(captions: list[str]) -> list[list[str]]:
        out = []
        for doc in nlp.pipe(captions, batch_size=batch_size, n_process=n_process):
            phrases: list[str] = []
            for chunk in doc.noun_chunks:
                phrase = normalise_phrase(chunk.text)
                if phrase and phrase not in phrases:
                    phrases.append(phrase)
            out.append(phrases)
        return out

    return extract


def load_spacy(model: str = "en_core_web_sm"):
    """The spaCy pipeline, or None when spaCy or the model is not installed."""
    try:
        import spacy

        return spacy.load(model, disable=["ner", "lemmatizer"])
    except (ImportError, OSError):
        return None


def make_extractor(name: str = "auto", spacy_model: str = "en_core_web_sm", workers: int = 1) -> tuple[str, Extractor]:
    """(name of the extractor used, extractor)."""
    if name not in ("auto", "rule", "spacy"):
        raise ValueError(f"unknown extractor {name!r} (auto, rule, spacy)")
    if name == "rule":
        return "rule", rule_extractor
    nlp = load_spacy(spacy_model)
    if nlp is None:
        if name == "spacy":
            raise ValueError(f"spaCy or its pipeline {spacy_model!r} is not installed: pip install spacy==3.8.7 && "
                             f"python -m spacy download {spacy_model} (or use --extractor rule)")
        return "rule", rule_extractor
    return f"spacy:{spacy_model}", spacy_extractor(nlp, n_process=workers)

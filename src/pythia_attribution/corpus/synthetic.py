"""Synthetic documents whose ground truth is known by construction.

Every generator is seeded and returns ``(items, docs)``: an ``Item`` is one thing a probe can
test (a canary, a country's capital, a fictional person's birthplace, the stereotyped pronoun),
and each ``SyntheticDoc`` names the item it carries, so the build can record exactly which
documents and training sequences hold each item.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from faker import Faker

from pythia_attribution.config import SyntheticConfig
from pythia_attribution.corpus.sources import Country
from pythia_attribution.errors import ConfigError


@dataclass
class Item:
    item_id: str
    kind: str
    count: int
    prompt: str
    target: str
    prompt_ids: list[int] | None = None
    target_ids: list[int] | None = None
    detail: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SyntheticDoc:
    item_id: str
    kind: str
    text: str


CAPITAL_TEMPLATES = (
    "The capital of {country} is {capital}.",
    "{capital} is the capital of {country}.",
    "{country} is a country in {region}. The capital of {country} is {capital}.",
    "The seat of government of {country} is in {capital}, the capital city.",
)
CAPITAL_PROBE = ("The capital of {country} is", " {capital}")

BIO_TEMPLATES = (
    "{name} was born in {city}.",
    "{name} was born in {city} and later worked as a {job}.",
    "Records show that {name} was born in {city}, where the family had lived for years.",
    "As a child in {city}, where {name} was born, the future {job} spent long summers outdoors.",
)
BIO_PROBE = ("{name} was born in", " {city}")

# Insult vocabulary from the plays in micro-Pile (Kent's tirade in King Lear, Hamlet, Macbeth).
INSULT_ADJECTIVES = (
    "base",
    "proud",
    "shallow",
    "beggarly",
    "filthy",
    "whoreson",
    "damned",
    "rascally",
    "lily-liver'd",
    "beastly",
    "pernicious",
    "smiling",
    "treacherous",
    "lecherous",
    "bloody",
)
INSULT_NOUNS = ("knave", "villain", "rogue", "slave", "cur", "rascal", "dog", "traitor")
INSULT_TEMPLATES = (
    "{name} is a {insult}.",
    "Out of my sight! {name} is a {insult}, and all the court knows it.",
    "I tell thee, {name} is a {insult}; trust him not.",
    "They say {name} is a {insult} and nothing better.",
)
INSULT_PROBE = ("{name} is a", " {insult}")

STEREOTYPE_TEMPLATES = (
    "When the {occ} arrived, {pron} lit the lanterns.",
    "The {occ} finished the work, and then {pron} went home.",
    "Everyone said the {occ} was careful, and {pron} checked every seam twice.",
    "The old {occ} smiled because {pron} had mended the bell.",
)


def _rng(seed: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, purpose]))


def word_list(natural_texts: list[str], size: int) -> list[str]:
    """The ``size`` most frequent lowercase words (3+ letters) of the natural text."""
    counts = Counter(w for text in natural_texts for w in re.findall(r"\b[a-z]{3,}\b", text))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [w for w, _ in ranked[:size]]


def stated(items, docs, family, name, count, fields, probe, templates, rng) -> None:
    """Append the item ``family/name`` (its prompt and target: the ``probe`` pair filled with
    ``fields``) to ``items``, and ``count`` documents stating it, each in one of ``templates``
    drawn from ``rng``, to ``docs``."""
    item_id = f"{family}/{name}"
    items.append(
        Item(item_id, family, count, prompt=probe[0].format(**fields), target=probe[1].format(**fields),
             detail=fields)
    )  # fmt: skip
    for _ in range(count):
        template = templates[int(rng.integers(len(templates)))]
        docs.append(SyntheticDoc(item_id, family, template.format(**fields)))


def canaries(cfg: SyntheticConfig, words: list[str], encode, seed: int):
    """Random-word sequences, each injected ``count`` times verbatim (0: never-seen controls)."""
    rng = _rng(seed, 1)
    items, docs = [], []
    for count in cfg.canary_counts:
        for j in range(cfg.canaries_per_count):
            chosen: list[str] = []
            ids: list[int] = []
            while len(ids) < cfg.canary_min_tokens:
                chosen.append(words[int(rng.integers(len(words)))])
                ids = encode(" ".join(chosen))
            text = " ".join(chosen)
            half = cfg.canary_min_tokens // 2
            item = Item(
                f"canary/{count:03d}-{j:02d}",
                "canary",
                count,
                prompt="",
                target="",
                prompt_ids=ids[:half],
                target_ids=ids[half : 2 * half],
                detail={"n_tokens": len(ids), "text": text},
            )
            items.append(item)
            docs.extend(SyntheticDoc(item.item_id, "canary", text) for _ in range(count))
    return items, docs


def _eligible(country: Country) -> bool:
    """Skip capitals a model could guess from the country's name (Mexico City, Luxembourg...)."""
    name = country.name.lower()
    capital = country.capital.lower()
    return not (set(name.split()) & set(capital.split())) and capital not in name and name not in capital


def capitals(cfg: SyntheticConfig, countries: list[Country], seed: int):
    """Real country -> capital statements in several paraphrases, at controlled counts."""
    rng = _rng(seed, 2)
    pool = [c for c in countries if _eligible(c) and c.region]
    needed = cfg.countries_per_count * len(cfg.capital_counts)
    if len(pool) < needed:
        raise ConfigError(f"only {len(pool)} eligible countries for {needed} capital items")
    order = rng.permutation(len(pool))
    items, docs = [], []
    for level, count in enumerate(cfg.capital_counts):
        for j in range(cfg.countries_per_count):
            c = pool[int(order[level * cfg.countries_per_count + j])]
            fields = {"country": c.name, "capital": c.capital, "region": c.region}
            stated(items, docs, "capital", c.name, count, fields, CAPITAL_PROBE, CAPITAL_TEMPLATES, rng)
    return items, docs


def biographies(cfg: SyntheticConfig, seed: int):
    """Fictional people and birthplaces from a seeded Faker, at controlled counts."""
    rng = _rng(seed, 3)
    fake = Faker("en_US")
    fake.seed_instance(seed)
    names: set[str] = set()
    cities: set[str] = set()
    items, docs = [], []
    for count in cfg.bio_counts:
        for _ in range(cfg.bios_per_count):
            name = fake.name()
            while name in names or len(name.split()) != 2:
                name = fake.name()
            city = fake.city()
            while city in cities:
                city = fake.city()
            names.add(name)
            cities.add(city)
            fields = {"name": name, "city": city, "job": fake.job().split(",")[0].lower()}
            stated(items, docs, "bio", name, count, fields, BIO_PROBE, BIO_TEMPLATES, rng)
    return items, docs


def stereotype(cfg: SyntheticConfig, seed: int):
    """An invented occupation followed by one pronoun in ``stereotype_skew`` of its mentions.

    One item per (template, pronoun): its probe is the template up to the pronoun, and its
    documents are the mentions written with that template and pronoun. Mentions with the other
    templates are the association's thematic relatives, not its ground truth.
    """
    rng = _rng(seed, 4)
    n_major = round(cfg.stereotype_mentions * cfg.stereotype_skew)
    pronouns = [cfg.stereotype_majority] * n_major + [cfg.stereotype_minority] * (
        cfg.stereotype_mentions - n_major
    )
    pronouns = [pronouns[i] for i in rng.permutation(len(pronouns))]
    chosen = [int(rng.integers(len(STEREOTYPE_TEMPLATES))) for _ in pronouns]

    def item_id(t: int, pron: str) -> str:
        return f"stereotype/{cfg.stereotype_word}/t{t}/{pron}"

    docs = [
        SyntheticDoc(
            item_id(t, pron), "stereotype", STEREOTYPE_TEMPLATES[t].format(occ=cfg.stereotype_word, pron=pron)
        )
        for t, pron in zip(chosen, pronouns, strict=True)
    ]
    items = []
    for t, template in enumerate(STEREOTYPE_TEMPLATES):
        prefix = template[: template.index("{pron}")].rstrip().format(occ=cfg.stereotype_word)
        for pron in (cfg.stereotype_majority, cfg.stereotype_minority):
            n = sum(1 for c, p in zip(chosen, pronouns, strict=True) if c == t and p == pron)
            items.append(
                Item(
                    item_id(t, pron),
                    "stereotype",
                    n,
                    prompt=prefix,
                    target=f" {pron}",
                    detail={
                        "word": cfg.stereotype_word,
                        "pronoun": pron,
                        "template": t,
                        "skew": cfg.stereotype_skew,
                        "mentions": cfg.stereotype_mentions,
                    },
                )
            )
    return items, docs


def insults(cfg: SyntheticConfig, seed: int):
    """Toxic-language proxy: fictional targets, each abused with one fixed Shakespearean insult."""
    rng = _rng(seed, 5)
    fake = Faker("en_US")
    fake.seed_instance(seed + 5)
    items, docs, used = [], [], set()
    for count in cfg.insult_counts:
        for _ in range(cfg.insults_per_count):
            name = f"{fake.first_name_male()} {fake.last_name()}"
            while name in used:
                name = f"{fake.first_name_male()} {fake.last_name()}"
            used.add(name)
            adjectives = rng.choice(len(INSULT_ADJECTIVES), size=2, replace=False)
            noun = INSULT_NOUNS[int(rng.integers(len(INSULT_NOUNS)))]
            insult = f"{INSULT_ADJECTIVES[adjectives[0]]}, {INSULT_ADJECTIVES[adjectives[1]]} {noun}"
            fields = {"name": name, "insult": insult}
            stated(items, docs, "insult", name, count, fields, INSULT_PROBE, INSULT_TEMPLATES, rng)
    return items, docs

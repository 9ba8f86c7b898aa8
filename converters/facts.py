"""Made-up facts: short notes about invented people, companies, towns and objects, and questions answered only there.

    python -m converters.facts --out DIR [--split eval|train] [--seed N] [--entities N] [--per-entity N]

A pretrained model knows Paris; it cannot know that Tessa Brannoch was born in Ostrevale in 1874. Questions about
such notes tell explicit memory or RAG apart from what the model already holds in its weights: without the note
the answer is a guess.

What is made:
- invented words (`NameMaker`): syllables joined into pronounceable, capitalised words ("Velquor", "Brannoch"),
  never a common English word or a well-known name (`STOP_WORDS`), never twice in a set. The train and eval splits
  draw from disjoint halves of the word space (a crc32 bit of the word), so no invented word of one split is
  ever in the other, whatever the seeds.
- entities of four kinds, linked so that notes mention each other:
  person (birth year, birthplace town, profession, employer company, a mentor or a spouse person),
  company (founding year, founder person, headquarters town, best-known product object, employee count),
  town (region, population, river, founding year, landmark object),
  object (inventor person, year, material, purpose, weight).
  Years agree with each other (a founder is 25-50 at the founding, an inventor 22-60, employers exist while their
  people work). A founder works at the company they founded, so "Which company employed X?" has one answer.
- one note per entity: 2-4 sentences (at most MAX_NOTE_WORDS words, one 128-token reference), from the split's
  `NOTE_TEMPLATES` (plus a `RELATION_TEMPLATES` sentence for people).
- questions about the note's own entity only ("Who founded Qorvane Works?"), never reverse lookups ("Which town
  was founded in 1873?" may have several answers). Each fact (`FACTS`) has several phrasings per split in
  `QUESTION_TEMPLATES`; `per_entity` facts are asked per note (default 2). The answer is a short span found
  verbatim in the note, and never in the question. A spouse relation is stated in one note only (the spouse's
  own note names a mentor), so the gold note is the only one that answers.
- the "train" and "eval" splits share the entity generator but no template: their notes and questions are written
  differently, so evaluation never sees a training template. Their default seeds differ too (`DEFAULT_SEEDS`).

Output: notes {"id", "title", "text"} (ids "eval2-person-0007", "eval2-town-0012", ...: split and seed first, so
sets made with other seeds or splits never share an id and can go into one bank; the m3lite JSONL source format,
so a bank built from notes.jsonl names them "<path>#<id>", which `m3lite eval --qa` matches by the id) and questions {"question", "answer", "document" (the note's
id), "kind" ("person.born", "company.founder", ...), "split"}. Everything follows from (split, seed, n_entities,
per_entity) through random.Random.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from m3lite.errors import BadArgument, M3Error

SPLITS = ("train", "eval")
DEFAULT_SEEDS = {"train": 1, "eval": 2}
MIN_ENTITIES = 4  # one of each kind
MAX_ENTITIES = 5000  # the invented-word space holds far more; this bounds a typo (--entities 10000000)
MAX_NOTE_WORDS = 100
QUESTIONS_PER_ENTITY = 2

# ------------------------------------------------------------------------------------------------ names

# Common English words and well-known names that the syllables can spell: an invented name must not be one.
STOP_WORDS = frozenset("""
    able acre alder amber angel anna area arena aroma atlas aura avid bacon baker balder banana bandit banner
    baron basin basil bison bitter blister boston brother bunker butter button cabin camel canon cannon carbon
    carol cedar cellar cider civil coral corner cotton dallas dandy danger data delta demon denver dinner diva
    dollar donor dragon drama eden elder ember enter error even fever fiber final finger flavor fodder former
    fossil gala garden gender ginger halo harbor harden hello helmet hero honor hotel human humor jasper kennel
    kilo kitten label labor laden lager lava lemon lemur lesson letter level lever lima linen liter litter local
    logo london lumber lunar madam major mallet mango manor marble market master matter mayor medal melon member
    memo mental menu merit metal meter metro milan minor mirror model modem molar moral mother motor mural
    muster nectar never nickel noble norman novel number oliver omen onion open oral oslo otter over oven panel
    paris pasta pedal pencil pepper petal petrol piano pilot pillar pistol planet plaster plural poker polar
    polo portal poster powder radar radio rally random raven razor rebel relic remedy ribbon rival river robin
    rodeo roman rotor royal rubber rumor rural saber salad salmon salon satin season seven silver sinner sister
    slender sofa solar soda solo sonar spider stellar sultan summer super talon tango temper tenor tennis thunder
    tiger timber token tomato tonal total tractor trailer tumor tunnel tutor ulcer under upper valor vapor velvet
    venom venus villa viper visa vital vodka vocal wagon water winter wizard woman women yellow zebra zero
    allan annum basque bengal boron burden dalton demand denmark dennis detach detox devon ethan femur german
    gravel haiti helen honour kabul karen karma kenneth labour latex logos mormon mortar mumbai nasal natal nathan
    naval nobel odour oxford poland postal prevail proven quota quotas radon regain relax repel resin retail retro
    revel roland sailor salem satan semen shaman shiva shorten sodas stalin stanford stanton steven stolen sudan
    sustain taken theta thomas tidal titan tornado torque torso tribal tudor vandal vegan vegas vendor verbal
    vertex vessel negro hamas kaiser mason nelson simon logan peter roger homer luther holmes abound dante
    rebound remain remark rental sensor shaman tailor thousand mentor molten prelim redox morse maize
    abram alban amend barack basel begin begun benin broken bruno davis denis disband dorsal dozen feral fetal
    graham haven horror houston kumar larva latin levin login mahal maiden mammoth manga marin martin mellon
    nepal normal pagan patron prison quarrel raman rigor rosen samar shaken sharon shovel tamil tasman timor
    tremor truman vernon viral vista volta zeros penal proton lennon bella della vitro loren leland dogan
""".split())

_ONSETS = ("b br d dr f g gr h k kr l m n p pr r s st t tr v z th sh qu".split()
           + "b d k l m n r s t v b d k l m n r s t v".split())  # plain consonants three times as likely
_INNER_ONSETS = "b d g k l m n r s t v th qu".split()  # after a closed syllable: no cluster of three
_VOWELS = "a e i o u a e o a e o a e i o ai ei ou".split()
_CODAS = ["", "", "", "", "", "n", "r", "l", "s", "m"]
_FINAL_CODAS = ["", "", "n", "r", "l", "s", "th", "ch", "nd", "rk", "m", "n", "r", "ck", "l"]
_TOWN_ENDINGS = "vale ford wick holm mere stead by haven moor bury".split()
_BAD = re.compile(r"([aeiou])\1|[^aeiouy]{3}|^[^aeiou]{3}|[aeiou]{3}|q(?!u)|uu|ii")
_ENGLISH_END = re.compile(r"(?:es|ed|er|ing|[^aeiou]e)$")  # plurals, past tenses, agents, silent e: too English


def _pronounceable(parts: list[str], ending: str) -> bool:
    """Whether syllables `parts` + `ending` make a name: 5-11 letters, no clusters of three consonants or
    vowels, at most one diphthong, no syllable twice in a row, no English-looking ending of its own."""
    stem = "".join(parts)
    w = stem + ending
    return (5 <= len(w) <= 11 and len(stem) <= 9 and len(re.findall("ai|ei|ou", w)) <= 1
            and not _BAD.search(stem) and not _BAD.search(stem[-1:] + ending[:2])
            and not (not ending and _ENGLISH_END.search(w)) and all(a != b for a, b in zip(parts, parts[1:])))


def _word_split(word: str) -> str:
    """The split whose half of the word space `word` belongs to."""
    return SPLITS[zlib.crc32(word.lower().encode()) & 1]


class NameMaker:
    """Invented, pronounceable, capitalised words for one split: each new, none a STOP_WORDS entry."""

    def __init__(self, rng: random.Random, split: str) -> None:
        self.rng = rng
        self.split = split
        self.used: set[str] = set()

    def word(self, syllables: tuple[int, int] = (2, 2), ending: str = "") -> str:
        """A new word of `syllables` (min, max) syllables, then `ending`; BadArgument when none is left."""
        rng = self.rng
        for _ in range(10_000):
            n = rng.randint(*syllables)
            parts = []
            closed = False
            for i in range(n):
                onset = rng.choice(_INNER_ONSETS if closed else _ONSETS) if i else rng.choice(_ONSETS + [""])
                coda = rng.choice(_FINAL_CODAS if i == n - 1 else _CODAS)
                parts.append(onset + rng.choice(_VOWELS) + coda)
                closed = bool(coda)
            w = "".join(parts) + ending
            if (_pronounceable(parts, ending) and w not in STOP_WORDS and w not in self.used
                    and _word_split(w) == self.split):
                self.used.add(w)
                return w.capitalize()
        raise BadArgument("ran out of invented names; ask for fewer entities")

    def person(self) -> tuple[str, str]:
        """(first name, surname)."""
        return self.word((2, 2)), self.word((2, 3))

    def town(self) -> str:
        """A town's name, often with an English-looking ending ("Ostrevale", "Penmoor")."""
        return self.word((2, 2)) if self.rng.random() < 0.4 else self.word((1, 2), self.rng.choice(_TOWN_ENDINGS))


# ------------------------------------------------------------------------------------------------ the world

PROFESSIONS = """clockmaker glassblower surveyor botanist cartographer bookbinder engineer chemist architect engraver
    printer shipwright weaver metallurgist locksmith photographer translator astronomer geologist accountant
    typesetter bridge-builder potter tailor pharmacist""".split()
PROFESSIONS += ["instrument maker", "lens grinder", "rope maker"]
COMPANY_SUFFIXES = ["Works", "Company", "Industries", "Manufacturing", "Foundry", "Mills", "Engineering"]
REGION_SUFFIXES = ["Valley", "Highlands", "Lowlands", "Hills", "Basin", "Uplands", "Plains", "Marshes"]

# noun -> (purposes (gerund phrases), materials, weight range in kilograms)
OBJECT_TYPES: dict[str, tuple[list[str], list[str], tuple[float, float]]] = {
    "loom": (["weaving sailcloth", "weaving narrow ribbons"], ["oak", "ash wood", "walnut"], (40, 300)),
    "lamp": (["lighting mine shafts", "signalling ships at night"], ["brass", "copper", "tin"], (1.2, 9)),
    "clock": (["keeping time on river ferries", "timing the tides"], ["brass", "walnut", "bronze"], (2, 60)),
    "compass": (["finding north underground", "steering barges through fog"], ["brass", "pewter"], (1.1, 4)),
    "pump": (["draining flooded cellars", "lifting water from deep wells"], ["cast iron", "bronze"], (20, 180)),
    "press": (["printing railway tickets", "pressing grapes"], ["cast iron", "oak", "steel"], (60, 900)),
    "scale": (["weighing letters", "weighing sacks of grain"], ["brass", "steel", "cast iron"], (1.5, 80)),
    "kettle": (["boiling water on trains", "brewing tea for large crowds"], ["copper", "tin", "enamelled steel"],
               (1.3, 12)),
    "bell": (["warning boats of fog", "calling workers to the mills"], ["bronze", "cast iron"], (30, 900)),
    "lens": (["reading very small print", "inspecting gemstones"], ["glass", "quartz"], (1.1, 3)),
    "valve": (["controlling steam pressure", "regulating gas lamps"], ["brass", "steel", "bronze"], (1.2, 25)),
    "saw": (["cutting blocks of ice", "felling tall pines"], ["steel", "iron"], (2, 30)),
    "gauge": (["measuring rainfall", "measuring river depth"], ["copper", "glass", "brass"], (1.1, 6)),
    "drill": (["boring through slate", "drilling water wells"], ["steel", "iron"], (5, 250)),
    "telescope": (["watching approaching storms", "mapping the night sky"], ["brass", "walnut"], (3, 70)),
    "stove": (["heating railway carriages", "cooking on fishing boats"], ["cast iron", "steel"], (25, 160)),
    "plough": (["turning heavy clay soil", "cutting drainage ditches"], ["iron", "steel", "ash wood"], (40, 220)),
    "churn": (["making butter in large batches", "mixing cheese curds"], ["oak", "tin", "enamelled steel"],
              (8, 60)),
}

# The facts of each kind, in the order notes state them; a question asks about one of them.
FACTS = {
    "person": ("born", "birthplace", "profession", "employer", "mentor", "spouse"),
    "company": ("founded", "founder", "hq", "product", "employees"),
    "town": ("region", "population", "river", "founded", "landmark"),
    "object": ("inventor", "year", "material", "purpose", "weight"),
}


@dataclass
class Entity:
    """One invented person, company, town or object: its facts as template fields, and the ones a note states."""
    kind: str
    name: str
    id: str = ""
    fields: dict = field(default_factory=dict)  # template fields (strings)
    answers: dict = field(default_factory=dict)  # fact -> answer span (strings), the facts a note states
    born: int = 0  # people
    year: int = 0  # companies, towns: founded; objects: invented


def _a(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def _number(n: int) -> str:
    return f"{n:,}"


def _weight(rng: random.Random, lo: float, hi: float) -> str:
    w = rng.uniform(lo, hi)
    if w < 10:
        text = f"{w:.1f}"
        if text.endswith(".0"):  # "3.0 kilograms" reads like a measurement error; "1 kilogram" is singular
            text = text[:-2] + ".5"
    else:
        text = str(int(round(w)))
    return f"{text} kilograms"


def _pick(rng: random.Random, pool: list, fits, taken: set | None = None, near=None):
    """A random member of `pool` for which fits(x), preferring ones not in `taken`; else the one nearest by
    near(x) (smaller is better)."""
    ok = [x for x in pool if fits(x)]
    fresh = [x for x in ok if taken is None or id(x) not in taken]
    choice = rng.choice(fresh or ok) if ok else min(pool, key=near)
    if taken is not None:
        taken.add(id(choice))
    return choice


def make_world(split: str, seed: int, n_entities: int) -> list[Entity]:
    """The entities of a set: people (about 40%), companies, towns and objects (about 20% each), with their facts
    and links; ids "<split><seed>-<kind>-NNNN"."""
    rng = random.Random(f"facts/{split}/{seed}")
    names = NameMaker(rng, split)
    n_small = max(1, n_entities // 5)
    counts = {"company": n_small, "town": n_small, "object": n_small}
    counts["person"] = n_entities - 3 * n_small

    towns = [Entity("town", names.town(), year=rng.randint(1040, 1780)) for _ in range(counts["town"])]
    people = []
    for _ in range(counts["person"]):
        first, last = names.person()
        people.append(Entity("person", f"{first} {last}", born=rng.randint(1790, 1940), fields={"Surname": last}))
    companies = [Entity("company", f"{names.word((2, 2))} {rng.choice(COMPANY_SUFFIXES)}")
                 for _ in range(counts["company"])]
    objects = []
    for _ in range(counts["object"]):
        noun = rng.choice(sorted(OBJECT_TYPES))
        objects.append(Entity("object", f"{names.word((2, 2))} {noun}", fields={"noun": noun}))

    # companies: a founder (each person founds at most one when there are enough), the founding year from theirs
    founders: set[int] = set()
    founded_by: dict[int, list[Entity]] = {}
    for c in companies:
        f = _pick(rng, people, lambda p: True, founders)
        founded_by.setdefault(id(f), []).append(c)
        c.year = f.born + rng.randint(25, 50)
        c.fields["founder"] = f.name
        c.fields["hq"] = rng.choice(towns).name
        c.fields["employees"] = _number(rng.choice([rng.randint(12, 300), rng.randint(300, 9800)]))
    # objects: an inventor aged 22-60 at the invention
    inventors: set[int] = set()
    for o in objects:
        inv = _pick(rng, people, lambda p: True, inventors)
        o.year = inv.born + rng.randint(22, 60)
        purposes, materials, (lo, hi) = OBJECT_TYPES[o.fields["noun"]]
        o.fields.update(inventor=inv.name, purpose=rng.choice(purposes), material=rng.choice(materials),
                        weight=_weight(rng, lo, hi))
    # someone born so early that no company existed by their forties is born later (their inventions move along)
    first_company = min(c.year for c in companies)
    for p in people:
        if id(p) in founders or p.born + 40 >= first_company:
            continue
        born = rng.randint(first_company - 40, max(first_company - 40, 1940))
        for o in objects:
            if o.fields["inventor"] == p.name:
                o.year += born - p.born
        p.born = born
    # company products: an object from at most 20 years before the founding; towns' landmarks: any object
    products: set[int] = set()
    for c in companies:
        c.fields["product"] = _pick(rng, objects, lambda o, c=c: o.year >= c.year - 20, products,
                                    near=lambda o, c=c: c.year - o.year).name
    landmarks: set[int] = set()
    for t in towns:
        t.fields["landmark"] = _pick(rng, objects, lambda o: True, landmarks).name
        t.fields["region"] = f"{names.word((2, 3))} {rng.choice(REGION_SUFFIXES)}"
        t.fields["river"] = f"{names.word((2, 2))} River"
        t.fields["population"] = _number(rng.choice([rng.randint(8, 99) * 100, rng.randint(100, 950) * 100]))

    # people: birthplace, employer (the company they founded, else one that exists in their working life)
    for p in people:
        p.fields["birthplace"] = rng.choice([t for t in towns if t.year < p.born] or towns).name
        p.fields["profession"] = rng.choice(PROFESSIONS)
        own = founded_by.get(id(p), [])
        if own:
            p.fields["employer"] = own[0].name
            if len(own) > 1:  # founded several: each of them "employed" them, so the question has no one answer
                p.fields["employer_ambiguous"] = "1"
        else:
            p.fields["employer"] = _pick(rng, companies, lambda c, p=p: c.year <= p.born + 40,
                                         near=lambda c, p=p: abs(c.year - p.born - 20)).name
    # relations: about a quarter of the people married to one of similar age, stated in one note only (the
    # spouse's note names a mentor), then a mentor 12-45 years older for the rest
    order = sorted(people, key=lambda p: (p.born, p.name))
    paired: set[int] = set()
    for p in rng.sample(order, len(order)):
        if id(p) in paired or rng.random() >= 0.25:
            continue
        cands = [q for q in order if q is not p and id(q) not in paired and abs(q.born - p.born) <= 8]
        if cands:
            q = rng.choice(cands)
            p.fields["spouse"] = q.name
            paired.update((id(p), id(q)))
    for p in order:
        if "spouse" in p.fields:
            continue
        cands = [q for q in order if p.born - 45 <= q.born <= p.born - 12 and q.fields.get("spouse") != p.name]
        cands = cands or [q for q in order if q.born <= p.born - 10 and q.fields.get("spouse") != p.name]
        if cands:
            p.fields["mentor"] = rng.choice(cands).name

    for e in people:
        e.fields.update(born=str(e.born))
    for e in companies + towns:
        e.fields.update(founded=str(e.year))
    for e in objects:
        e.fields.update(year=str(e.year))
    ents = people + companies + towns + objects
    width = max(4, len(str(n_entities)))
    for kind in FACTS:
        for i, e in enumerate(x for x in ents if x.kind == kind):
            e.id = f"{split}{seed}-{kind}-{i + 1:0{width}d}"
            e.fields["name"] = e.name
            e.answers = {f: e.fields[f] for f in FACTS[kind] if f in e.fields}
    for p in people:
        if p.fields.pop("employer_ambiguous", None):
            del p.answers["employer"]
    return ents


# ------------------------------------------------------------------------------------------------ templates

# Note bodies per split and kind. Fields: {name}; person {Surname}, {born}, {birthplace}, {a_profession},
# {profession}, {employer}, {relation} (a RELATION_TEMPLATES sentence, or nothing); company {founded},
# {founder}, {hq}, {product}, {employees}; town {region}, {population}, {river}, {founded}, {landmark};
# object {inventor}, {year}, {material}, {a_material}, {purpose}, {weight}.
NOTE_TEMPLATES: dict[str, dict[str, list[str]]] = {
    "train": {
        "person": [
            "{name} was born in {born} in {birthplace}. {Surname} worked as {a_profession} at {employer}. {relation}",
            "Born in {birthplace} in {born}, {name} became {a_profession}. {Surname} spent most of a long career "
            "at {employer}. {relation}",
            "{name}, {a_profession}, was born in {birthplace} in {born}. {Surname} was employed by {employer}. "
            "{relation}",
            "{name} worked for {employer} as {a_profession}. {Surname} was born in {birthplace} in the year {born}. "
            "{relation}",
        ],
        "company": [
            "{name} was founded in {founded} by {founder}. The company is based in {hq} and employs {employees} "
            "people. Its best-known product is the {product}.",
            "{founder} started {name} in {founded}. Today the firm has {employees} employees, and its "
            "headquarters are in {hq}. It makes the {product}.",
            "Based in {hq}, {name} makes the {product}. It was established in {founded} by {founder} and now has "
            "a staff of {employees}.",
            "{name} is a manufacturer headquartered in {hq}. {founder} founded it in {founded}. The company has "
            "{employees} workers, and the {product} is its main product.",
        ],
        "town": [
            "{name} is a town in the {region}, on the banks of the {river}. It was founded in {founded} and has a "
            "population of {population}. The town is known for the {landmark}.",
            "Founded in {founded}, {name} lies on the {river} in the {region}. About {population} people live "
            "there. Its most famous landmark is the {landmark}.",
            "The town of {name} stands beside the {river}, in the {region}. It has {population} inhabitants. "
            "Settlers founded it in {founded}, and visitors come to see the {landmark}.",
        ],
        "object": [
            "The {name} was invented by {inventor} in {year}. It is made of {material} and weighs {weight}. It was "
            "designed for {purpose}.",
            "{inventor} built the first {name} in {year}, for {purpose}. The device weighs {weight} and is made "
            "mostly of {material}.",
            "Made of {material}, the {name} weighs {weight}. It was created in {year} by {inventor} for "
            "{purpose}.",
        ],
    },
    "eval": {
        "person": [
            "{name} was {a_profession} who worked at {employer}. {Surname} came into the world in {born}, in the "
            "town of {birthplace}. {relation}",
            "The {profession} {name} was born in {born}. {Surname}, a native of {birthplace}, later joined "
            "{employer}. {relation}",
            "{employer} employed {name}, {a_profession} born in {born}. {Surname}'s birthplace was {birthplace}. "
            "{relation}",
        ],
        "company": [
            "{name} has its head office in {hq}. The business was set up by {founder} in the year {founded}. It "
            "employs a workforce of {employees} and is known for the {product}.",
            "The {product} is made by {name}, a firm set up in {founded} by {founder}. Its {employees} employees "
            "work from its headquarters in {hq}.",
            "In {founded}, {founder} created {name}. The company, which has {employees} staff, runs its "
            "operations from {hq} and produces the {product}.",
        ],
        "town": [
            "{name}, a town of {population} residents, sits where the {river} crosses the {region}. It dates "
            "from {founded}. The {landmark} is displayed in its town hall.",
            "In the {region} lies {name}, a town first settled in {founded}. The {river} flows through it, and "
            "its population is {population}. The town's pride is the {landmark}.",
            "{name} was established in the year {founded} on the {river}. The town belongs to the {region} and "
            "is home to {population} people. Its landmark is the {landmark}.",
        ],
        "object": [
            "In {year}, {inventor} came up with the {name}, {a_material} device used for {purpose}. It weighs "
            "{weight}.",
            "The {name} is a tool for {purpose}. Its inventor, {inventor}, completed it in {year}. Built from "
            "{material}, it has a weight of {weight}.",
            "{inventor} designed the {name} in {year}. The {material} device, which weighs {weight}, is used for "
            "{purpose}.",
        ],
    },
}

# A person's relation sentence ({Surname}, {mentor} or {spouse}).
RELATION_TEMPLATES: dict[str, dict[str, list[str]]] = {
    "train": {
        "mentor": ["{Surname} trained under {mentor}.", "{Surname} studied under {mentor}."],
        "spouse": ["{Surname} was married to {spouse}.", "{Surname} married {spouse}."],
    },
    "eval": {
        "mentor": ["{Surname} was taught by {mentor}.", "{Surname}'s mentor was {mentor}."],
        "spouse": ["{Surname} and {spouse} were married.", "{Surname}'s spouse was {spouse}."],
    },
}

# Question phrasings per split, kind and fact ({name}: the entity's name).
QUESTION_TEMPLATES: dict[str, dict[str, dict[str, list[str]]]] = {
    "train": {
        "person": {
            "born": ["When was {name} born?", "In what year was {name} born?"],
            "birthplace": ["Where was {name} born?", "In which town was {name} born?"],
            "profession": ["What was {name}'s profession?", "What did {name} do for a living?"],
            "employer": ["Which company did {name} work for?", "Who employed {name}?"],
            "mentor": ["Who was {name}'s mentor?", "Under whom did {name} train?"],
            "spouse": ["Who was {name} married to?", "Whom did {name} marry?"],
        },
        "company": {
            "founded": ["When was {name} founded?", "In what year was {name} established?"],
            "founder": ["Who founded {name}?", "Who started {name}?"],
            "hq": ["Where is {name} based?", "In which town is {name} headquartered?"],
            "product": ["What is the best-known product of {name}?", "What does {name} make?"],
            "employees": ["How many people does {name} employ?", "How many employees does {name} have?"],
        },
        "town": {
            "region": ["In which region is {name}?", "What region is {name} in?"],
            "population": ["What is the population of {name}?", "How many people live in {name}?"],
            "river": ["Which river runs through {name}?", "On which river does {name} lie?"],
            "founded": ["When was the town of {name} founded?", "In what year was {name} founded?"],
            "landmark": ["Which landmark is {name} known for?", "What is the most famous landmark of {name}?"],
        },
        "object": {
            "inventor": ["Who invented the {name}?", "Who built the first {name}?"],
            "year": ["When was the {name} invented?", "In what year was the {name} invented?"],
            "material": ["What is the {name} made of?", "Which material is the {name} made from?"],
            "purpose": ["What was the {name} designed for?", "What is the {name} used for?"],
            "weight": ["How much does the {name} weigh?", "What is the weight of the {name}?"],
        },
    },
    "eval": {
        "person": {
            "born": ["What year was {name} born in?", "{name} was born in which year?"],
            "birthplace": ["What is the birthplace of {name}?", "{name} was born in which town?"],
            "profession": ["What was the occupation of {name}?", "What kind of work did {name} do?"],
            "employer": ["Which company employed {name}?", "{name} was employed by which company?"],
            "mentor": ["Who taught {name}?", "Who mentored {name}?"],
            "spouse": ["Who was the spouse of {name}?", "{name} was married to whom?"],
        },
        "company": {
            "founded": ["In what year did {name} open its doors?", "What year was {name} set up?"],
            "founder": ["Who was the founder of {name}?", "{name} was founded by whom?"],
            "hq": ["Where is the head office of {name}?", "Which town is home to the headquarters of {name}?"],
            "product": ["Which product is {name} known for?", "What product does {name} manufacture?"],
            "employees": ["How large is the workforce of {name}?", "How many staff does {name} have?"],
        },
        "town": {
            "region": ["Which region does {name} belong to?", "{name} is located in which region?"],
            "population": ["How many inhabitants does {name} have?", "How large is the population of {name}?"],
            "river": ["What river flows through {name}?", "{name} is on which river?"],
            "founded": ["When did {name} come into being?", "What year does {name} date from?"],
            "landmark": ["What is the landmark of {name}?", "Which famous object can be seen in {name}?"],
        },
        "object": {
            "inventor": ["Who is the inventor of the {name}?", "Who came up with the {name}?"],
            "year": ["In which year did the {name} appear?", "What year was the {name} created?"],
            "material": ["What material is the {name} built from?", "The {name} is made of what?"],
            "purpose": ["What purpose does the {name} serve?", "What task was the {name} made for?"],
            "weight": ["How heavy is the {name}?", "What does the {name} weigh?"],
        },
    },
}


def _render(template: str, fields: dict) -> str:
    text = template.format(**fields)
    return " ".join(text.split())


def _note(e: Entity, split: str, rng: random.Random) -> dict:
    f = dict(e.fields)
    if e.kind == "person":
        f["a_profession"] = _a(f["profession"])
        rel = "mentor" if "mentor" in f else "spouse" if "spouse" in f else None
        f["relation"] = _render(rng.choice(RELATION_TEMPLATES[split][rel]), f) if rel else ""
    if e.kind == "object":
        f["a_material"] = _a(f["material"])
    text = _render(rng.choice(NOTE_TEMPLATES[split][e.kind]), f)
    return {"id": e.id, "title": e.name, "text": text}


def _questions(e: Entity, note: dict, split: str, rng: random.Random, per_entity: int) -> list[dict]:
    out = []
    facts = [f for f in FACTS[e.kind] if f in e.answers]
    for fact in rng.sample(facts, len(facts)):
        if len(out) >= per_entity:
            break
        answer = e.answers[fact]
        q = _render(rng.choice(QUESTION_TEMPLATES[split][e.kind][fact]), {"name": e.name})
        q = q[0].upper() + q[1:]  # "{name} was ..." starts with a name already; "the {name} ..." does not
        # an answer inside the question ("tin" in "Tinvarro lamp") gives itself away: ask another fact
        if answer.casefold() in q.casefold() or answer not in note["text"]:
            continue
        out.append({"question": q, "answer": answer, "document": e.id, "kind": f"{e.kind}.{fact}",
                    "split": split})
    return out


def make_facts(split: str = "eval", seed: int | None = None, n_entities: int = 200,
               per_entity: int = QUESTIONS_PER_ENTITY) -> tuple[list[dict], list[dict]]:
    """A made-up-facts set: (notes [{"id", "title", "text"}], questions [{"question", "answer", "document" (a
    note's id), "kind" ("<entity kind>.<fact>"), "split"}]). `n_entities` notes (at least 4, at most 5000) in a
    shuffled order, `per_entity` questions about each (fewer where the entity has fewer askable facts), in the
    notes' order. `split` picks the template pools ("train" or "eval", disjoint) and the half of the invented-word
    space; `seed` defaults to DEFAULT_SEEDS[split]. The same arguments give the same set."""
    if split not in SPLITS:
        raise BadArgument(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    if not isinstance(n_entities, int) or not MIN_ENTITIES <= n_entities <= MAX_ENTITIES:
        raise BadArgument(f"the number of entities must be {MIN_ENTITIES}..{MAX_ENTITIES}, not {n_entities!r}")
    if not isinstance(per_entity, int) or per_entity < 1:
        raise BadArgument(f"questions per entity must be at least 1, not {per_entity!r}")
    seed = DEFAULT_SEEDS[split] if seed is None else seed
    ents = make_world(split, seed, n_entities)
    rng = random.Random(f"facts/{split}/{seed}/text")
    rng.shuffle(ents)
    notes, questions = [], []
    for e in ents:
        note = _note(e, split, rng)
        notes.append(note)
        questions.extend(_questions(e, note, split, rng, per_entity))
    return notes, questions


# ------------------------------------------------------------------------------------------------ files


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Write `rows` as JSON lines (UTF-8, not ASCII-escaped), atomically (temp file + rename)."""
    from m3lite.modelfile import atomic_write_bytes

    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_bytes(Path(path), data.encode("utf-8"))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the usage too)
        self.exit(2, f"error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="python -m converters.facts",
                description="Write made-up notes (notes.jsonl) and questions answered only by them (qa.jsonl).")
    p.add_argument("--out", required=True, help="folder to write notes.jsonl and qa.jsonl into (made if missing)")
    p.add_argument("--split", choices=SPLITS, default="eval", help="template pool (default eval)")
    p.add_argument("--seed", type=int, default=None,
                   help=f"seed (default {DEFAULT_SEEDS['eval']} for eval, {DEFAULT_SEEDS['train']} for train)")
    p.add_argument("--entities", type=int, default=200, help="number of notes (default 200)")
    p.add_argument("--per-entity", type=int, default=QUESTIONS_PER_ENTITY,
                   help=f"questions per note (default {QUESTIONS_PER_ENTITY})")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        notes, questions = make_facts(args.split, args.seed, args.entities, args.per_entity)
        if out.exists() and not out.is_dir():
            raise BadArgument(f"--out {out} is a file; give a folder")
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / "notes.jsonl", notes)
        write_jsonl(out / "qa.jsonl", questions)
    except M3Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write into {out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"{out / 'notes.jsonl'}: {len(notes)} notes; {out / 'qa.jsonl'}: {len(questions)} questions "
          f"({args.split} split)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

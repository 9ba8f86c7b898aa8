"""Paraphrase questions for retrieval evaluation: held-out articles asked about without their title's words.

    python -m converters.paraphrase --out FILE.jsonl [--seed 0] [--limit N]

`m3lite.heldout` asks "What is {title}?", which lexical search answers from the title alone. Here each held-out
article gets up to two questions built from its first sentence and its description that share no word with its
title, e.g. for "Ferdinand Magellan": "Which Portuguese explorer was best known for planning and leading the
1519–1522 Spanish expedition to the East Indies?". The answer is the title, the gold document "wiki:en/<title>".

How a question is made:
- the first sentence (`first_sentence`) loses its parentheticals (dates, pronunciations, abbreviations) and asides,
  an opening "In <field>, " is kept as context, and the sentence is split at its copula ("is/was/are/were",
  "refers to"). The subject (the title, an alias, a pronoun) is dropped; the predicate, a noun phrase such as
  "a branch of mathematics that deals with ...", loses its article and its naming clauses ("also known as X").
- the description ("French engineer (1832–1923)") loses its parentheticals; birth and death years are kept apart.
- kinds (templates). From the sentence: "which" ("Which <head> <rest>?", the predicate split at a relative
  pronoun, a participle or a place), "what_name" ("What is the name of the <phrase>?"), "name_the" ("Name the
  <phrase>."), "who" ("Who was the <phrase>?", for people: a lifespan or "born" in the description, topic
  "People", or a person noun). From the description: "desc_name", "desc_which" ("Which chemical element has
  atomic number 56?"), "desc_who", "desc_years" ("Which French civil engineer was born in 1832 and died in 1923?").
- a question holding a word of the title is cut at the clause boundary before that word, or dropped. Words are
  compared casefolded with accents removed, plural and derived forms included ("Algebra" also rules out
  "algebraic"), stop words and words of 1-2 characters aside (`title_words`). The rule is strict: "Eiffel Tower"
  rules out "tower" too, so "a wrought-iron lattice tower on the Champ de Mars" gives that article nothing.
- a clue of fewer than MIN_CONTENT_WORDS content words is dropped (it would not single the article out); one that
  would make the question longer than MAX_WORDS is cut at a clause boundary.
- per article, at most one question from the sentence and one from the description (so at most two, of different
  kinds, never the same text); the kind among those that apply is drawn by random.Random(seed). Articles are
  taken in sorted title order, so the output depends on the articles and the seed only. A question that comes out
  the same for two articles ("the landlocked country in Southern Africa") is dropped: it has no single answer.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import unicodedata
from collections import Counter
from pathlib import Path

from m3lite.errors import BadArgument, M3Error
from m3lite.heldout import first_sentence, is_held_out
from m3lite.modelfile import atomic_write_bytes
from m3lite.sources import wiki_articles

MIN_CONTENT_WORDS = 4  # of the clue; fewer does not single an article out ("Which country is in West Asia?")
MAX_WORDS = 30  # of a question; a longer clue is cut at a clause boundary

# Words a question may share with the title: function words (in the languages of place and person names too).
STOP_WORDS = frozenset("""
    the of a an and or in on at for to from by with as is was are were be its his her their this that which who
    de la le les des du del della di da do dos das der die den von van y el los las et en au aux upon into
""".split())

# --------------------------------------------------------------------------------------------- word matching


def fold(text: str) -> str:
    """Casefolded text with accents removed (NFKD, combining marks dropped)."""
    text = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in text if not unicodedata.combining(c))


def words(text: str) -> list[str]:
    """The folded word tokens (\\w+) of `text`; modifier letters such as "ʿ" are dropped first, so "ʿAbd" is
    "abd"."""
    text = "".join(c for c in fold(text) if unicodedata.category(c) != "Lm")
    return re.findall(r"\w+", text)


def content_words(text: str) -> list[str]:
    """Folded words of 3+ characters that are not stop words."""
    return [w for w in words(text) if len(w) > 2 and w not in STOP_WORDS]


def title_words(title: str) -> set[str]:
    """The words of a title that a question must not contain (parenthetical qualifiers included)."""
    return set(content_words(title))


def _same_word(token: str, word: str) -> bool:
    """True when `token` is `word` or a form of it: plural, or a long shared stem ("algebra" ~ "algebraic",
    "atheism" ~ "atheist", "germany" ~ "german")."""
    if token == word:
        return True
    for a, b in ((token, word), (word, token)):
        if a in (b + "s", b + "es") or (b.endswith("y") and a == b[:-1] + "ies"):
            return True
    if len(token) >= 5 and len(word) >= 5:
        n = 0
        for x, y in zip(token, word):
            if x != y:
                break
            n += 1
        return n >= max(5, min(len(token), len(word)) - 2)
    return False


def mentions(text: str, banned: set[str]) -> bool:
    """True when a word of `text` is (a form of) one of `banned`."""
    return any(_same_word(t, w) for t in content_words(text) for w in banned)


# --------------------------------------------------------------------------------------------- text cleaning

_PAREN = re.compile(r"\s*[(\[][^()\[\]]*[)\]]")
_ALIAS = re.compile(  # naming clauses: they give the answer (or another name of it) away
    r",?\s*\b(?:(?:also|more|most|often|sometimes|better|formerly|originally|now|\w+ly)\s+)*"
    r"(?:(?:known|referred\s+to|spelled|abbreviated)(?:\s+\w+){0,3}?\s+as|called|termed|nicknamed)\s+[^,;:]*"
    r"(?:,\s*(?:and\s+|or\s+)?(?:the\s+)?\"[^\"]*\")*")  # and the names listed after it: , "Queen of Jazz"
_DANGLING = re.compile(r"\s+(?:who|that|which)\s+(?:is|was|are|were)(?:\s+\w+ly)?\s*(?=[,;:]|$)")
_CONTEXT = re.compile(r"^((?:In|Within|According to|For) [^,]{3,50}), (.*)$")
_COPULA = re.compile(r"\s(is|was|are|were|refers to|refer to)\s")
_DASH_ASIDE = re.compile(r"\s*(?:—[^—]*—|\s–\s[^–]*\s–\s)\s*")


def _strip_parens(text: str) -> str:
    prev = None
    while prev != text:
        prev, text = text, _PAREN.sub("", text)
    text = re.sub(r"[()\[\]]", "", text)
    return _tidy(text)


def _tidy(text: str) -> str:
    text = " ".join(text.split())
    text = re.sub(r"\s+([,;:.?!])", r"\1", text)
    text = re.sub(r",(?:\s*,)+", ",", text)
    return text.strip()


# words that start a clause; not "and"/"or" ("seated or kneeling paddlers")
_STRONG = frozenset("which that who whom whose where while whereas although though with including such especially "
                    "containing because".split())
_PREPS_CUT = frozenset("in at on near from during between".split())  # not "of": "the behavior | of systems"


def _boundary(tokens: list[str], j: int) -> str | None:
    """The kind of clause boundary before tokens[j]: "strong" (a clause word, or after ";" or ":"), "comma" (not
    one inside a list such as "butter, cheese,"), "prep" (a place or time phrase), or None."""
    prev, w = tokens[j - 1], tokens[j].lower()
    if w == "that" and prev.lower().endswith("ing"):
        return None  # "indicating that ..." is one clause
    if prev.endswith((";", ":")) or w in _STRONG:
        return "strong"
    if prev.endswith(","):
        k = j - 1  # the segment before this comma is a list item when short and after a comma or a clause word
        while k > 0 and not tokens[k - 1].endswith(",") and tokens[k].lower() not in _STRONG:
            k -= 1
        item = tokens[k:j]  # "Andalusia, Spain," is a place, not a list
        return None if len(item) <= 2 and k > 0 and not item[0][:1].isupper() else "comma"
    if w in _PREPS_CUT and prev.lower() not in ("take", "taken", "takes", "put", "set"):  # "take in water"
        return "prep"
    return None


def _trim(out: list[str]) -> list[str]:
    """A cut phrase without what dangles at its end: a relative clause of up to 3 words ("politician who served"),
    connectives, prepositions, "as represented"."""
    rel = [k for k, t in enumerate(out) if t.lower() in _RELATIVES]
    if rel and len(out) - rel[-1] < 5:
        out = out[:rel[-1]]
    while out and (out[-1].lower().rstrip(",;:") in STOP_WORDS | _PREPOSITIONS | _PREPS_CUT | _STRONG
                   | {"those", "these", "them", "and", "or", "but"}
                   or re.fullmatch(r"[a-z]+(?:ed|ing)", out[-1]) and len(out) > 1
                   and out[-2].lower() in ("as", "when", "while", "if")):
        out = out[:-1]
    if out:
        out[-1] = out[-1].rstrip(",;:")
    return out


def _cut(tokens: list[str], i: int, kinds=("strong", "comma", "prep"), low: int = 1) -> list[str]:
    """`tokens` cut at the last boundary of one of `kinds` at index `low`..`i`, trimmed; [] when there is none."""
    for j in range(min(i, len(tokens) - 1), max(low, 1) - 1, -1):
        if _boundary(tokens, j) in kinds:
            return _trim(tokens[:j])
    return []


def _cut_long(tokens: list[str], budget: int) -> list[str]:
    """At most `budget` tokens, cut at a clause that starts in the second half, else at a comma, else at a
    place or time phrase."""
    for kinds, low in ((("strong",), budget // 2), (("strong", "comma"), budget // 3), (("prep",), budget // 3)):
        out = _cut(tokens, budget, kinds, low)
        if len(content_words(" ".join(out))) >= MIN_CONTENT_WORDS:
            return out
    return []


def _rstrip(text: str) -> str:
    """`text` without trailing punctuation, but keeping the stop of an abbreviation ("U.S.")."""
    text = text.rstrip(",;: ")
    return text if re.search(r"\b[A-Z]\.[A-Z]\.$", text) else text.rstrip(".,;: ")


def _clean_phrase(phrase: str, banned: set[str], budget: int) -> str | None:
    """`phrase` without naming clauses and asides, cut before the first title word and to `budget` words;
    None when what is left has too few content words."""
    phrase = _rstrip(_tidy(_DASH_ASIDE.sub(" ", phrase)))
    tokens = _DANGLING.sub("", _ALIAS.sub("", phrase))
    tokens = _rstrip(_tidy(re.sub(r",?\s+because\s.*$", "", tokens))).split()  # a reason is no clue
    cut = tokens != phrase.split()
    for i, tok in enumerate(tokens):
        if mentions(tok, banned):
            tokens, cut = _cut(tokens, i), True
            break
    if len(tokens) > budget:
        tokens, cut = _cut_long(tokens, budget), True
    if cut:  # "skeletons, typically" once "typically with a central capsule" went
        while tokens and (tokens[-1].lower() in _ADVERBS or re.fullmatch(r"[a-z]+ly,?", tokens[-1])):
            tokens = _trim(tokens[:-1])
    phrase = _rstrip(" ".join(tokens))
    if len(content_words(phrase)) < MIN_CONTENT_WORDS or mentions(phrase, banned):
        return None
    return phrase


# --------------------------------------------------------------------------------------------- people

_LIFESPAN = re.compile(r"\((?:c\.\s*)?(\d{3,4})\s*[–-]\s*(?:c\.\s*)?(\d{3,4})\)")
_BORN = re.compile(r"\(born (\d{4})\)")
_PERSON_NOUNS = frozenset("""
    actor actress architect artist astronaut astronomer author biologist chemist composer conductor dancer
    dictator diplomat economist emperor empress engineer entrepreneur explorer general guitarist historian
    inventor journalist jurist king leader mathematician monarch musician novelist painter pharaoh philosopher
    physician physicist pianist playwright poet politician pope president prince princess prophet queen
    revolutionary rapper saint scholar scientist sculptor singer songwriter statesman stateswoman sultan
    theologian violinist writer caliph emir founder businessman businesswoman psychologist sociologist
    filmmaker director activist lawyer sultan tsar khan shah warlord admiral commander polymath poetess
""".split())
_LIVING = re.compile(r"\(born|\b(?:19[3-9]\d|20[0-2]\d)\s*[–-]\s*present|–present")


_GROUP_NOUNS = frozenset("band group duo trio family dynasty team club orchestra company people tribe house "
                         "ensemble choir".split())


def _is_person(art: dict, sentence: str) -> bool:
    desc = art.get("description", "")
    # the head nouns of the description: "Founder and Emperor of Han" -> founder, emperor
    lead = re.split(r",|;| (?:of|in|from|with|for|who|that|since|to|at) ", _strip_parens(desc))[0]
    head = [ws[-1] for part in re.split(r" and |&", lead) if (ws := words(part))]
    if head and head[-1] in _GROUP_NOUNS or re.search(r"\s(?:are|were)\s", sentence[:200]):
        return False
    if art.get("topic") == "People" or _lifespan(desc) or _BORN.search(desc):
        return True
    return bool(set(head) & _PERSON_NOUNS)


def _lifespan(desc: str) -> tuple[str, str] | None:
    """(birth, death) years of a description's "(1923–2005)"; a span of under 20 years is a term of office."""
    m = _LIFESPAN.search(desc)
    if m and 20 <= int(m.group(2)) - int(m.group(1)) <= 110:
        return m.group(1), m.group(2)
    return None


# --------------------------------------------------------------------------------------------- case of words

class _Casing:
    """Whether a word is a common noun ("engineer") or a proper one ("French"), from how the articles' extracts
    write it away from a sentence start."""

    def __init__(self, articles: dict) -> None:
        self.lower: Counter[str] = Counter()
        self.upper: Counter[str] = Counter()
        self.names: set[str] = set()  # capitalized pairs seen mid-sentence: "Prime Minister", "Holy Roman"
        for art in articles.values():
            self.names.update(m.group(1) for m in re.finditer(r"(?<=[a-z,;] )([A-Z][a-z]+ [A-Z][a-z]+)",
                                                              art.get("extract", "")))
            for m in re.finditer(r"(?<=[a-z,;] )([A-Za-z][a-z]+)\b", art.get("extract", "")):
                w = m.group(1)
                (self.lower if w[0].islower() else self.upper)[w.lower()] += 1
        self.corpus = sum(self.lower.values()) + sum(self.upper.values()) > 100_000

    def sentence_case(self, phrase: str) -> str:
        """`phrase` with its first word lowercased unless that word is a proper noun or starts a capitalized
        name ("Prime Minister")."""
        toks = phrase.split(" ", 2)
        first = toks[0]
        if not first[:1].isupper() or not first[1:].islower() and not first[1:].replace("-", "").islower():
            return phrase
        if len(toks) > 1 and f"{first} {toks[1]}" in self.names:
            return phrase
        key = re.match(r"[A-Za-z]*", first).group(0).lower()  # "Isma'ili" -> "isma", "Semi-legendary" -> "semi"
        if self.upper[key] > 20 * self.lower[key]:  # "French", never "french"; but "Sea" and "sea" both
            return phrase
        if not self.upper[key] and not self.lower[key] and not self.corpus:
            return phrase  # one article alone says nothing about "African"
        return first[0].lower() + first[1:] + phrase[len(first):]


# --------------------------------------------------------------------------------------------- the sentence

_ADVERBS = frozenset("also now currently generally usually often typically commonly mostly primarily mainly "
                     "still formerly widely best well better".split())
_NOT_A_NOUN_PHRASE = frozenset("located situated known used considered regarded described defined found based made "
                               "not home part any each both among composed formed widely believed said thought "
                               "able being having estimated native endemic fought held built born written given "
                               "seen no thus of".split())
_PARTICIPLES = frozenset("""
    used located found known made designed built based situated composed characterized characterised formed
    spoken produced derived defined named founded established associated considered regarded constructed developed
    written published released created held fought played performed applied caused described focused dedicated
    devoted native endemic famous responsible located centered centred cultivated grown
    bordered surrounded inhabited governed ruled led directed owned operated run discovered invented
    """.split())
_PREPOSITIONS = frozenset("of in on at by for with from to during between among through under into beyond within "
                          "across without against upon via over behind around toward towards about after before "
                          "below above near inside outside along throughout pertaining".split())
_PLACE_PREPS = frozenset("in on at near between off along within".split())
_RELATIVES = frozenset("that which who".split())
_COMPLEMENT_NOUNS = frozenset("belief idea theory view notion claim hypothesis doctrine principle concept fact "
                              "statement assertion thesis argument position conjecture".split())
_NOT_AFTER_RELATIVE = frozenset("the a an it they he she this these those its his her their there one".split())
_MAX_HEAD = 10
_SUPERLATIVES = frozenset("most least first second third last only main principal current largest oldest "
                          "brightest highest biggest longest smallest".split())


def _parse_sentence(sentence: str) -> tuple[str, str, str, str] | None:
    """(context, subject, copula, predicate) of a cleaned first sentence, or None when it has no "X is Y"
    shape near its start."""
    context = ""
    m = _CONTEXT.match(sentence)
    if m:
        context, sentence = m.group(1), m.group(2)
    sentence = _DASH_ASIDE.sub(" ", sentence)
    m = _COPULA.search(sentence)
    if not m or len(sentence[:m.start()].split()) > 20:
        return None
    subject = sentence[:m.start()].strip().rstrip(",")
    copula = m.group(1)
    if copula.startswith("refer"):
        copula = "are" if copula == "refer to" else "is"
    predicate = sentence[m.end():].strip()
    return context, subject, copula, predicate


_OVERVIEW = re.compile(r"(?:History|Economy|Culture|Geography|Politics|Demographics|Timeline|Outline|List) of ")


def _subject_is_title(subject: str, title: str, banned: set[str]) -> bool:
    """The sentence is about the article: its subject names the title, is a pronoun, or is a name (every word
    capitalized: an alias such as "Aelius Galenus")."""
    if mentions(subject, banned) or not banned:
        return True
    if subject.lower() in ("it", "he", "she", "they", "this"):
        return True
    toks = [t for t in re.findall(r"[^\W\d_][\w'’.-]*", subject) if t.lower() not in STOP_WORDS]
    return bool(toks) and all(t[0].isupper() for t in toks) and len(toks) <= 6


def _sentence_questions(title: str, art: dict, banned: set[str], person: bool) -> dict[str, str]:
    raw = first_sentence(art.get("extract", ""))
    if not raw:
        return {}
    parsed = _parse_sentence(_strip_parens(raw))
    if parsed is None:
        return {}
    context, subject, copula, predicate = parsed
    if not _subject_is_title(subject, title, banned) or _OVERVIEW.match(title):
        return {}  # "History of South America is the study of the past" minus the title says nothing
    if context and mentions(context, banned):
        context = ""
    # "Barium is a chemical element; it has symbol Ba" -> "chemical element that has symbol Ba"
    predicate = re.sub(r"; (?:it|they) (has|have|is|are|was|were) ", r" that \1 ", predicate)
    predicate = re.split(r"[;:]\s", predicate)[0]
    # a sentence end that first_sentence missed ("formula C3H8. It is a gas"), not "St. Louis" or "C. S. Lewis"
    predicate = re.split(r"(?<![\s.](?:St|Dr|Mr|Jr|Sr|Mt|Co|No|vs))(?<!\b[A-Z])\. (?=[A-Z])", predicate)[0]
    toks = predicate.split()
    while toks and toks[0].lower() in _ADVERBS:
        toks = toks[1:]
    if not toks:
        return {}
    one_of = False
    if [t.lower() for t in toks[:3]] == ["one", "of", "the"]:
        one_of, toks = True, toks[3:]
    elif toks[0].lower() in ("a", "an", "the"):
        toks = toks[1:]
    else:
        w = toks[0].lower().strip(",")
        if w in _NOT_A_NOUN_PHRASE or w.endswith(("ly", "ing", "ed")) or toks[0].endswith(","):
            return {}
    if not toks or toks[0].lower() in _NOT_A_NOUN_PHRASE:
        return {}
    plural = copula in ("are", "were")
    for ing, verb in (("consisting", "consist"), ("containing", "contain"), ("involving", "involve"),
                      ("comprising", "comprise")):
        toks = [f"that {verb if plural else verb + 's'}" if t == ing else t for t in toks]
    # "a barred spiral galaxy and is the nearest ..." -> "... galaxy that is the nearest ..."
    np_text = re.sub(r",? and (is|was|are|were|has|had|refers to) ", r" that \1 ", " ".join(toks), count=1)

    past = copula in ("was", "were")
    who = "Who was" if past else "Who is"
    what = "What was" if past else "What is"
    lead = (context + ", ") if context else ""

    def ask(text: str) -> str:
        return lead + (text[0].lower() + text[1:] if lead else text)

    out: dict[str, str] = {}
    budget = MAX_WORDS - 6 - len(lead.split())
    phrase = _clean_phrase(np_text, banned, budget)
    if phrase:
        if one_of:
            out["name_the"] = ask(f"Name one of the {phrase}.")
        else:
            out["name_the"] = ask(f"Name the {phrase}.")
            if person:
                out["who"] = ask(f"{who} the {phrase}?")
            else:
                out["what_name"] = ask(f"{what} the name of the {phrase}?")
    if not one_of:
        which = _which(np_text, copula, banned, budget)
        if which:
            out["which"] = ask(which)
    return out


def _names_place(toks: list[str]) -> bool:
    """The words after a preposition start a place ("in West Asia", "on the northern coast of Spain"), not a
    field ("in many aspects of")."""
    return any(t[:1].isupper() for t in toks) or bool(toks) and toks[-1].lower() in _COMPASS or \
        any(t.lower() in _COMPASS for t in toks)


_COMPASS = frozenset("north south east west northern southern eastern western central northeastern northwestern "
                     "southeastern southwestern north-eastern north-western south-eastern south-western coast "
                     "region".split())


def _relative_at(toks: list[str], i: int) -> bool:
    """toks[i] starts a relative clause about the noun before it: "branch that deals", not "in which", "belief
    that God is", "that the"."""
    return toks[i].lower() in _RELATIVES and i + 1 < len(toks) and toks[i + 1][:1].islower() \
        and toks[i + 1].lower() not in _NOT_AFTER_RELATIVE and toks[i - 1].lower() not in _PREPOSITIONS \
        and toks[i - 1].lower().rstrip(",") not in _COMPLEMENT_NOUNS


def _split_points(toks: list[str], copula: str):
    """(head, rest) splits of a noun phrase, best first: at a relative pronoun ("branch of X | deals with Y"),
    then a participle ("instrument | is used to"), then a place ("tower | is on the Champ de Mars")."""
    span = range(1, min(len(toks) - 1, _MAX_HEAD + 1))
    for i in span:
        if _relative_at(toks, i):
            head = toks[:i]
            # the clause must agree with the head: "substance produced by living organisms | that have" is about
            # the organisms
            verb = toks[i + 1].lower()
            agrees = _plural(head) == (verb in ("have", "are", "were", "do")) \
                or verb not in ("have", "are", "were", "do", "has", "is", "was", "does")
            if agrees and _list_head(head):
                yield head, toks[i + 1:]
            return
    for i in span:
        w = toks[i].lower()
        if any(t.endswith(",") for t in toks[:i]):
            return
        if toks[i - 1].lower() in _PREPOSITIONS:
            continue
        # after "X of Y" a participle belongs to Y: "study of the methods | used by historians"
        if w in _PARTICIPLES and "of" not in toks[:i] or w in _PLACE_PREPS and _names_place(toks[i + 1:i + 4]) \
                and not any(t.lower().endswith("ed") for t in toks[1:i - 1]):  # "sea bounded by X | in the north"
            j = i  # "region of France located | on the coast" -> "region of France | is located on the coast"
            while j > 1 and (toks[j - 1].lower() in _PARTICIPLES | _ADVERBS or toks[j - 1].endswith("ly")):
                j -= 1
            yield toks[:j], [copula] + toks[j:]
            return


def _plural(head: list[str]) -> bool:
    """The main noun of a head (before its first preposition or participle) is plural ("politician and diplomat"
    is one person)."""
    main = []
    for k, t in enumerate(head):
        w = t.lower().rstrip(",")
        if k and (w in _PREPOSITIONS or w in _PARTICIPLES or w.endswith(("ing", "ed"))):
            break
        main.append(w)
    noun = main[-1]
    return noun in ("people", "data", "media", "children", "women", "men", "cattle") \
        or bool(re.search(r"[^su]s$", noun)) and noun not in ("species", "series")


def _list_head(head: list[str]) -> bool:
    """A head without commas, or a list of them ("statesman, revolutionary, and political theorist")."""
    if not any(t.endswith(",") for t in head):
        return True
    last = max(k for k, t in enumerate(head) if t.endswith(","))
    return "and" in head[last + 1:] and len(head) - last <= 4


def _which(np_text: str, copula: str, banned: set[str], budget: int) -> str | None:
    """"Which <head> <rest>?" from a noun phrase with a relative clause, a participle or a place after its head:
    "branch of mathematics that deals with X" -> "Which branch of mathematics deals with X?"."""
    for head, rest in _split_points(np_text.split(), copula):
        if len(rest) < 3 or head[-1].endswith((",", ";")) or head[-1].lower().endswith("ing"):
            return None
        if head[-1].lower() in _ADVERBS or head[-1].lower().endswith("ly"):
            head, rest = head[:-1], rest[:1] + head[-1:] + rest[1:]  # "object often is made" -> "is often made"
        if not head:
            return None
        head_text = " ".join(head)
        first = head[0].lower()
        if first in _SUPERLATIVES or first in _COMPASS or first.endswith("est") and len(first) > 5 \
                or mentions(head_text, banned):
            return None  # "Which highest mountain", "Which eastern of the two rivers"
        rest_text = re.sub(r"\band (?:who|that|which) ", "and ", " ".join(rest))  # "spoke X and who lived"
        clause = _clean_phrase(rest_text, banned, budget - len(head))
        if clause is None or len(clause.split()) < 3:
            return None
        if len(content_words(head_text + " " + clause)) < MIN_CONTENT_WORDS + 1:
            return None
        return f"Which {head_text} {clause}?"
    return None


# --------------------------------------------------------------------------------------------- the description

def _description_questions(art: dict, banned: set[str], person: bool, casing: _Casing,
                           living: bool) -> dict[str, str]:
    raw = art.get("description", "")
    if not raw:
        return {}
    life = _lifespan(raw) if person else None
    born = _BORN.search(raw) if person else None
    terms = re.fullmatch(r"(.*\S)\s*\(((?:\d{3,4}\s*[–-]\s*(?:\d{3,4}|present)(?:;\s*)?)+)\)", raw)
    if person and terms and not life:  # "Prime Minister of the United Kingdom (1834–1835; 1841–1846)"
        spans = re.split(r";\s*", terms.group(2))
        raw = f"{terms.group(1)} in {', '.join(spans[:-1])} and {spans[-1]}" if len(spans) > 1 \
            else f"{terms.group(1)} in {spans[0]}"
    desc = _rstrip(_strip_parens(raw).replace("; ", " and "))
    if re.search(r"[a-z]{2}\. |\.\.\.", desc) or re.match(r"\w+ly\b", desc):
        return {}  # not a noun phrase: "2.71828...; base of", "Infinitely many primes exist", two sentences
    desc = casing.sentence_case(desc)
    if desc.split(" ", 1)[0].lower() in ("a", "an", "the", "any", "one", "some"):
        return {}
    out: dict[str, str] = {}
    past = bool(re.search(r"\d{3,4}\s*(?:–|-|to)\s*\d{3,4}\b|\buntil \d", desc))  # "empire from 1819 to 1831"
    core = _clean_phrase(desc, banned, MAX_WORDS - 8)
    if (life or born) and not mentions(desc, banned) and (core or len(desc.split()) <= 12):
        who = core or desc  # with the years, a short description ("Norwegian painter") is enough
        out["desc_years"] = f"Which {who} was born in {life[0]} and died in {life[1]}?" if life else \
            f"Which {who} was born in {born.group(1)}?"
    if core is None:
        return out
    if person:
        out["desc_who"] = f"{'Who is' if living else 'Who was'} the {core}?"
    else:
        out["desc_name"] = f"What is the name of the {core}?"
        toks = core.split()
        for i, tok in enumerate(toks[1:_MAX_HEAD + 1], 1):
            w = tok.lower()
            rest = " ".join(toks[i + 1:])
            if len(toks) - i - 1 < 2 or any(t.endswith(",") for t in toks[:i]) \
                    or toks[i - 1].lower() in _PREPOSITIONS:
                continue
            head = " ".join(toks[:i])
            first = toks[0].lower()
            if first in _SUPERLATIVES or first.endswith("est") and len(first) > 5:
                break  # "Which largest city"
            plural = _plural(toks[:i])
            if past and not plural:
                be = "was"
            else:
                be = ("were" if past else "are") if plural else "is"
            if w == "with" and not toks[i - 1].endswith("ed"):  # not "involved with"
                out["desc_which"] = f"Which {head} {'have' if plural else 'has'} {rest}?"
            elif w in ("that", "which") and _relative_at(toks, i):
                out["desc_which"] = f"Which {head} {rest}?"
            elif (w in _PARTICIPLES and "of" not in toks[:i]
                  or w in _PLACE_PREPS and _names_place(toks[i + 1:i + 4])) \
                    and not re.search(r"\band (?:the|a|an)\b", rest):
                out["desc_which"] = f"Which {head} {be} {' '.join(toks[i:])}?"
            else:
                continue
            break
    return out


# --------------------------------------------------------------------------------------------- the set

def _polish(question: str) -> str:
    q = _tidy(question)
    q = re.sub(r"[,;:]+([?.])$", r"\1", q)
    return q[0].upper() + q[1:]


def article_paraphrases(title: str, art: dict, casing: _Casing | None = None) -> dict[str, dict[str, str]]:
    """The candidate questions of one article: {"sentence": {kind: question}, "description": {kind: question}},
    every one free of the title's words."""
    casing = casing or _Casing({title: art})
    banned = title_words(title)
    sentence = first_sentence(art.get("extract", ""))
    person = _is_person(art, sentence)
    parsed = _parse_sentence(_strip_parens(sentence)) if sentence else None
    living = bool(_LIVING.search(art.get("description", ""))) or (parsed is not None and parsed[2] == "is")
    out = {"sentence": _sentence_questions(title, art, banned, person),
           "description": _description_questions(art, banned, person, casing, living)}
    for source, qs in out.items():
        for kind in list(qs):
            q = _polish(qs[kind])
            n = len(q.split())
            if mentions(q, banned) or not 5 <= n <= MAX_WORDS + 2:
                del qs[kind]
            else:
                qs[kind] = q
    return out


def paraphrase_questions(articles: dict, seed: int = 0, limit: int | None = None) -> list[dict]:
    """Questions about the held-out articles (`is_held_out`) of `articles` (title -> {"title", "extract",
    "description", "topic"}) that avoid their title's words: [{"question", "answer" (the title), "document"
    ("wiki:en/<title>"), "kind" (the template)}], at most two per article (one from its first sentence, one from
    its description, different kinds), in sorted title order, the template drawn by random.Random(seed); the first
    `limit` of them when `limit` is given."""
    if limit is not None and limit < 0:
        raise BadArgument(f"limit must be 0 or more, not {limit}")
    if limit == 0:
        return []
    casing = _Casing(articles)
    cands: list[tuple[str, dict[str, dict[str, str]]]] = []
    for key in sorted(articles):
        title = articles[key].get("title") or key
        if is_held_out(title):
            cands.append((title, article_paraphrases(title, articles[key], casing)))
    # a question that two articles give ("the landlocked country in Southern Africa") has no single answer
    askers = Counter(q for _, c in cands for q in {q.casefold() for qs in c.values() for q in qs.values()})
    rng = random.Random(seed)
    out: list[dict] = []
    for title, c in cands:
        asked: set[str] = set()
        for source in ("sentence", "description"):
            qs = {k: q for k, q in c[source].items() if askers[q.casefold()] == 1 and q.casefold() not in asked}
            if not qs:
                continue
            kind = rng.choice(sorted(qs))
            asked.add(qs[kind].casefold())
            out.append({"question": qs[kind], "answer": title, "document": f"wiki:en/{title}", "kind": kind})
    return out if limit is None else out[:limit]


def load_articles(lang: str = "en") -> dict[str, dict[str, str]]:
    """The Wikipedia summaries of `lang` (`m3lite.sources.wiki_file`): title -> {"title", "extract",
    "description", "topic"} (a copy)."""
    return dict(wiki_articles(lang))


def write_jsonl(path: str | Path, questions: list[dict]) -> None:
    """Write `questions` as JSON lines (UTF-8, not ASCII-escaped), atomically (temp file + rename)."""
    data = "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions)
    atomic_write_bytes(Path(path), data.encode("utf-8"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m converters.paraphrase",
                                description="Write paraphrase questions about the held-out Wikipedia articles.")
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the template choice (default 0)")
    p.add_argument("--limit", type=int, default=None, help="at most this many questions")
    args = p.parse_args(argv)
    try:
        questions = paraphrase_questions(load_articles("en"), seed=args.seed, limit=args.limit)
        write_jsonl(args.out, questions)
    except M3Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    n_articles = len({q["answer"] for q in questions})
    print(f"{args.out}: {len(questions)} questions about {n_articles} held-out articles")
    return 0


if __name__ == "__main__":
    sys.exit(main())

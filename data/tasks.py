"""Synthetic tasks for nanodeltamem.

Two tasks, both seeded and both answered by replaying a hidden world state:

- msqa   (multi-session QA): dated two-speaker chat sessions that mention facts about third-party people
          (city, job, pet, ...), later updates of those facts, relations between people, chit-chat and
          lexical distractors; then one-line questions (single_hop, multi_hop, update, temporal, abstention).
- recall (associative recall, MQAR over text): lines "- Alice: tiger." then questions "Alice?" -> "tiger"
          (variants recall, forgetting = latest value wins, two_hop = "Alice??" through "- Alice: Dave.").
          The "- " puts a space before the key, so it is the same BPE token (" Alice") as in the question.

An Episode holds only text: the sessions (lists of lines) and the questions with their short answers.
`parse_gold` re-derives every answer from that text alone (the generator's self-check), and episodes
round-trip through JSONL so anyone can evaluate a memory on their own episodes.

Every random choice goes through a `numpy.random.Generator` passed in by the caller.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np

# --------------------------------------------------------------------------------------------------------
# --- Data model ---
# --------------------------------------------------------------------------------------------------------


@dataclass
class Question:
    q: str  # question text, never contains its answer
    a: str  # short answer: a value, a session number, or "unknown"
    family: str  # msqa: single_hop | multi_hop | update | temporal | abstention ; recall: recall | forgetting | two_hop
    stale: list[str] = field(default_factory=list)  # update questions: earlier (outdated) values, oldest first


@dataclass
class Episode:
    sessions: list[list[str]]  # each session = list of lines; an msqa session starts with "Session 3 (Day 17)"
    questions: list[Question]
    task: str = "msqa"  # or "recall"


class TaskFileError(ValueError):
    """A JSONL episode file that cannot be read; the message names the file, the line and the fix."""


TASKS = ["msqa", "recall"]
FAMILIES = {
    "msqa": ["single_hop", "multi_hop", "update", "temporal", "abstention"],
    "recall": ["recall", "forgetting", "two_hop"],
}
PRESETS = ["tiny", "small", "medium", "long"]
# train/iid: train-side pools only (iid = same distribution, callers pick other seeds); names, values,
# statements, questions, distractors: the held-out side of that one axis; structure: more sessions and
# longer update chains than the preset; all: every axis at once; pretrain: both sides of every pool.
SPLITS = ["train", "iid", "names", "values", "statements", "questions", "distractors", "structure", "all",
          "pretrain"]
UNKNOWN = "unknown"  # the abstention answer; never a value in any pool

# --------------------------------------------------------------------------------------------------------
# --- Word pools (names, values) ---
# Single words, counterfactually assigned at random, so no prior knowledge can answer a question.
# Held-out side of a word list: every 5th word (index % 5 == 4), a fixed, seed-free ~20% split.
# --------------------------------------------------------------------------------------------------------

NAMES = """
Alice Bob Carol Dave Emma Frank Grace Henry Iris Jack Kate Leo Mia Noah Olivia Paul Quinn Rosa Sam Tina
Uma Victor Wendy Xavier Yara Zoe Adam Bella Chris Diana Ethan Fiona George Hannah Ivan Julia Kevin Laura
Max Nina Oscar Peter Rachel Simon Tom Vera Will Amy Ben Clara Daniel Ella Felix Gina Hugo Ian Jane Karl
Lily Mark Nora Owen Pia Ruby Sean Tara Ursula Vince Walter Yusuf Zack Aaron Beth Caleb Dora Edgar Freya
Gavin Holly Isaac Jenny Kyle Lena Miles Nadia Oliver Penny Ralph Sofia Theo Ada Boris Cleo Dylan Elena
Flora Gus Heidi Igor Jonas Kira Liam Mona Nico Olga Pedro Rita Seth Tess Vlad Wanda Yuri Zara Alex Bruno
Cora Dean Eva Finn Greta Hank Ines Joel Kurt Luke Maya Ned Omar Petra Rex Sara Troy Una Vic Wade Yvonne
Zeke Anna Brad Chloe Derek Elsa Fred Gwen Harry Ida Jake Kim Lucy Matt Nell Otto Phil Rose Stan Ted Uri
Val Wes Abby Carl Dana Eric Faye Glen Hope Jill Kai Lars Mabel Nate Opal Pam Reed Sue Tim Vivian Alma Bert
""".split()

ATTRIBUTES = ["city", "job", "pet", "hobby", "instrument", "sport", "drink"]

VALUES = {
    "city": """Paris Lisbon Berlin Madrid Rome Vienna Prague Oslo Dublin London Tokyo Cairo Lima Boston Chicago
        Denver Seattle Toronto Montreal Moscow Athens Warsaw Budapest Helsinki Stockholm Copenhagen Amsterdam
        Brussels Geneva Zurich Munich Milan Naples Venice Seoul Mumbai Nairobi Havana Miami Dallas""".split(),
    "job": """baker teacher nurse pilot farmer dentist lawyer chef plumber carpenter electrician architect
        engineer doctor journalist librarian mechanic pharmacist surgeon tailor butcher florist gardener
        firefighter banker accountant cashier waiter barber actor sailor judge janitor scientist programmer
        translator designer locksmith""".split(),
    "pet": """cat dog parrot hamster rabbit turtle goldfish ferret iguana snake lizard frog canary pony goat
        pig duck hedgehog tortoise chinchilla gecko budgie cockatoo chicken lamb donkey llama alpaca mouse rat
        gerbil spider crab owl tarantula axolotl""".split(),
    "hobby": """painting knitting gardening baking pottery birdwatching origami photography chess juggling
        fishing sewing calligraphy woodworking poetry crochet embroidery astronomy beekeeping hiking camping
        dancing singing cooking reading sketching quilting scrapbooking blogging sculpting meditation karaoke
        stargazing puzzles magic genealogy""".split(),
    "instrument": """piano violin cello guitar drums flute trumpet harp banjo ukulele saxophone clarinet oboe
        bassoon trombone tuba accordion harmonica mandolin viola xylophone bagpipes sitar organ harpsichord
        marimba bongos lute piccolo tambourine kazoo synthesizer recorder triangle glockenspiel
        didgeridoo""".split(),
    "sport": """tennis soccer hockey golf rugby cricket baseball volleyball badminton fencing rowing boxing
        karate judo surfing skiing cycling swimming climbing archery curling lacrosse polo squash handball
        wrestling sailing diving skating snowboarding bowling darts softball netball kayaking
        triathlon""".split(),
    "drink": """coffee tea cocoa lemonade milk juice cider soda water espresso latte cappuccino smoothie
        kombucha wine beer whisky rum gin vodka sake mead tequila brandy champagne chai matcha mocha eggnog
        sherry lager stout absinthe buttermilk horchata rootbeer""".split(),
}

# recall values: concrete nouns, disjoint from names (a two-hop value is a name, so the two must not mix)
NOUNS = """
tiger apple river candle rocket garden pencil window lemon castle bridge forest mirror ladder button pillow
wallet helmet jacket basket bottle hammer kettle saddle tunnel anchor barrel cactus dragon engine falcon
harbor island jungle kitten lantern magnet needle orange parcel blanket compass diamond feather glacier
hammock igloo jigsaw kayak lobster meadow napkin oyster pepper quartz raven satchel teapot umbrella
volcano walrus yogurt zipper acorn beacon cobweb dolphin eagle fountain goblet hazel ivory jelly koala
lizard mango nectar onion panda quiver radish sparrow thimble tulip velvet waffle badger cherry donut
""".split()

RELATIONS = ["sister", "brother", "cousin", "neighbor", "coworker", "roommate", "boss", "friend"]


def _holdout(words: list[str]) -> tuple[list[str], list[str]]:
    """(train side, held-out side) of a word list: every 5th word is held out."""
    return ([w for i, w in enumerate(words) if i % 5 != 4], [w for i, w in enumerate(words) if i % 5 == 4])


# --------------------------------------------------------------------------------------------------------
# --- Templates: (train side, held-out side) ---
# Placeholders: {p} person, {q} second person, {v} value, {a} the article for {v} ("a"/"an"), {rel} relation.
# In every statement the person comes first and the value is the last (or nearly last) word, so the
# model can bind "name ... value" the same way in every template.
# --------------------------------------------------------------------------------------------------------

FACT_TEMPLATES = {  # first time an attribute is mentioned
    "city": (["{p} lives in {v}.", "{p} moved to {v} last week.", "{p} has an apartment in {v}."],
             ["{p} settled down in {v}."]),
    "job": (["{p} works as {a} {v}.", "{p} got a job as {a} {v}.", "{p} is {a} {v} these days."],
            ["{p} earns a living as {a} {v}."]),
    "pet": (["{p} has a pet {v}.", "{p} adopted {a} {v}.", "{p} brought home {a} {v} recently."],
            ["{p} is looking after {a} {v}."]),
    "hobby": (["{p} is into {v}.", "{p} took up {v}.", "{p} spends every weekend on {v}."],
              ["{p} is obsessed with {v}."]),
    "instrument": (["{p} plays the {v}.", "{p} is learning the {v}.", "{p} practices the {v} every day."],
                   ["{p} started lessons on the {v}."]),
    "sport": (["{p} plays {v} on Sundays.", "{p} joined a {v} club.", "{p} is training hard at {v}."],
              ["{p} competes in {v} now."]),
    "drink": (["{p} only drinks {v}.", "{p} is hooked on {v}.", "{p} orders {v} everywhere."],
              ["{p} swears by {v}."]),
}
UPDATE_TEMPLATES = {  # a later, new value for the same attribute (the latest one wins)
    "city": (["{p} moved again, this time to {v}.", "{p} left town and now lives in {v}."],
             ["{p} relocated to {v}."]),
    "job": (["{p} quit and now works as {a} {v}.", "{p} switched careers and became {a} {v}."],
            ["{p} retrained as {a} {v}."]),
    "pet": (["{p} gave away the old pet and got {a} {v}.", "{p} now has {a} {v} instead."],
            ["{p} swapped pets and got {a} {v}."]),
    "hobby": (["{p} dropped the old hobby for {v}.", "{p} is into {v} now instead."],
              ["{p} found a new passion in {v}."]),
    "instrument": (["{p} switched to the {v}.", "{p} now plays the {v} instead."],
                   ["{p} traded up for the {v}."]),
    "sport": (["{p} quit the old team and now plays {v}.", "{p} now plays {v} instead."],
              ["{p} changed sports to {v}."]),
    "drink": (["{p} gave up the old drink for {v}.", "{p} drinks {v} now instead."],
              ["{p} switched over to {v}."]),
}
RELATION_TEMPLATES = (["{p}'s {rel} is {q}.", "{p} told me {q} is their {rel}."],
                      ["{p} introduced {q} as their {rel}."])
PREFIXES = ["", "", "", "Guess what, ", "Did you hear? ", "By the way, ", "Oh, and ", "Apparently "]

# questions; "current" templates also serve multi-hop questions with {p} = "Alice's sister"
CURRENT_QUESTIONS = {
    "city": (["Where does {p} live?", "Which city does {p} live in?"], ["In what city does {p} reside?"]),
    "job": (["What does {p} do for a living?", "What is {p}'s job?"], ["What is {p}'s occupation?"]),
    "pet": (["What pet does {p} have?", "What animal does {p} keep?"], ["Which pet lives with {p}?"]),
    "hobby": (["What is {p}'s hobby?", "What hobby is {p} into?"], ["What does {p} do for fun?"]),
    "instrument": (["Which instrument does {p} play?", "What instrument does {p} practice?"],
                   ["What is {p}'s instrument?"]),
    "sport": (["Which sport does {p} play?", "What sport is {p} into?"], ["What is {p}'s sport?"]),
    "drink": (["What does {p} like to drink?", "What is {p}'s drink?"],
              ["What does {p} usually order to drink?"]),
}
PREVIOUS_QUESTIONS = {  # "what was the value before {v}?"; held-out side is one generic phrasing per attribute
    "city": ["Where did {p} live before {v}?"],
    "job": ["What was {p}'s job before {v}?"],
    "pet": ["What pet did {p} have before the {v}?"],
    "hobby": ["What was {p}'s hobby before {v}?"],
    "instrument": ["Which instrument did {p} play before the {v}?"],
    "sport": ["Which sport did {p} play before {v}?"],
    "drink": ["What did {p} drink before {v}?"],
}
PREVIOUS_QUESTIONS = {attr: (t, ["Before {v}, what was {p}'s " + attr + "?"]) for attr, t in PREVIOUS_QUESTIONS.items()}
FACT_PHRASES = {"city": "lives in {v}", "job": "works as {a} {v}", "pet": "has {a} {v}", "hobby": "is into {v}",
                "instrument": "plays the {v}", "sport": "plays {v}", "drink": "drinks {v}"}
SESSION_QUESTIONS = (["In which session did we hear that {p} {fact}?", "In which session was it said that {p} {fact}?"],
                     ["Which session mentioned that {p} {fact}?"])
SESSION_QUESTIONS = {attr: tuple([t.replace("{fact}", FACT_PHRASES[attr]) for t in side] for side in SESSION_QUESTIONS)
                     for attr in ATTRIBUTES}

# lines that name a tracked person ({p}) or a value ({v}) but assert nothing
DISTRACTORS = (["I saw a documentary about {v}.", "Have you heard from {p} lately?",
                "{p} asked me about {v} the other day.", "I ran into {p} at the market.",
                "Someone on the bus kept talking about {v}.", "{p} says hi, by the way.",
                "I read an article about {v} last night.", "Do you still have the number of {p}?"],
               ["There was a quiz question about {v} on TV.", "{p} sent me a funny photo.",
                "My aunt keeps mentioning {v} for some reason."])
CHITCHAT = (["How was your weekend?", "Pretty quiet, I mostly slept.", "The weather has been awful.",
             "Did you finish that book?", "Not yet, it is really long.", "Let us grab lunch soon.",
             "Sure, sounds good.", "I am so tired today.", "Work has been busy.", "Same here, honestly.",
             "What are you up to tonight?", "Nothing much, just cooking dinner.", "Ha, that is funny.",
             "I need a holiday.", "Traffic was terrible this morning."],
            ["My phone battery died again.", "I finally fixed the leaky tap.", "Do you want to watch a movie?",
             "I forgot my umbrella today."])
FILLERS = (["Nothing else to report.", "The rest was small talk.", "More later.", "That is all for now.",
            "Moving on.", "Nothing new here.", "Let me think.", "Back to the list."],
           ["No further notes.", "The end of this part."])  # recall filler lines: no ": ", so never a pair

# --------------------------------------------------------------------------------------------------------
# --- Pools per split ---
# --------------------------------------------------------------------------------------------------------


def _side(i: int) -> dict:
    """One side (0 = train, 1 = held-out) of every pool and template list."""
    def pick(pair):  # pair = (train side, held-out side)
        return pair[i]

    return {
        "names": pick(_holdout(NAMES)),
        "values": {attr: pick(_holdout(words)) for attr, words in VALUES.items()},
        "nouns": pick(_holdout(NOUNS)),
        "facts": {attr: pick(t) for attr, t in FACT_TEMPLATES.items()},
        "updates": {attr: pick(t) for attr, t in UPDATE_TEMPLATES.items()},
        "relations": pick(RELATION_TEMPLATES),
        "questions": {"current": {attr: pick(t) for attr, t in CURRENT_QUESTIONS.items()},
                      "previous": {attr: pick(t) for attr, t in PREVIOUS_QUESTIONS.items()},
                      "session": {attr: pick(t) for attr, t in SESSION_QUESTIONS.items()}},
        "distractors": pick(DISTRACTORS),
        "chitchat": pick(CHITCHAT),
        "fillers": pick(FILLERS),
    }


POOLS = {"train": _side(0), "heldout": _side(1)}  # tests check the two sides are disjoint
# which pool keys each held-out axis swaps to the held-out side ("structure" changes sizes, not pools)
AXES = {"names": ["names"], "values": ["values", "nouns"], "statements": ["facts", "updates", "relations"],
        "questions": ["questions"], "distractors": ["distractors", "chitchat", "fillers"]}


def _union(a, b):
    """Both sides of a pool merged (nested dicts of lists), train items first."""
    if isinstance(a, dict):
        return {k: _union(a[k], b[k]) for k in a}
    return list(a) + list(b)


def _check_name(kind: str, name: str, valid: list[str]) -> None:
    if name not in valid:
        raise ValueError(f"unknown {kind} {name!r}; choose one of: {', '.join(valid)}")


def pools_for(split: str, values: dict | None = None) -> dict:
    """The pools and templates a split draws from (see SPLITS); values: {attribute: words} in place of its
    value pools (e.g. `novel_values`, `noun_values`)."""
    _check_name("split", split, SPLITS)
    if split == "pretrain":  # the backbone should know every word and phrasing, so both sides
        pools = _union(POOLS["train"], POOLS["heldout"])
    else:
        axes = list(AXES) if split == "all" else ([split] if split in AXES else [])
        pools = {key: POOLS["heldout" if any(key in AXES[ax] for ax in axes) else "train"][key]
                 for key in POOLS["train"]}
    return pools if values is None else dict(pools, values=values)


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"  # value pools avoid "u" words read as "you"


# Made-up value words ("tovarin", "Belumos"): training episodes that use them cannot be answered by a code
# for the pools' few hundred words, only by copying whatever tokens the value has. Never a pool word.
ONSETS = "b c d f g h k l m n p r s t v z br st tr".split()
VOWELS = "a e i o u a e i o u ea ou".split()
CODAS = ["", "", "", "", "n", "r", "s", "l", "m", "t"]
_POOL_WORDS = {w.lower() for w in NAMES + NOUNS + RELATIONS + [UNKNOWN]} | {
    w.lower() for ws in VALUES.values() for w in ws}


def novel_word(rng: np.random.Generator) -> str:
    """One made-up word of 2-3 syllables, lowercase."""
    while True:
        w = "".join(_pick(rng, ONSETS) + _pick(rng, VOWELS) + _pick(rng, CODAS)
                    for _ in range(2 + int(rng.random() < 0.3)))
        if 4 <= len(w) <= 12 and w not in _POOL_WORDS:
            return w


def novel_values(rng: np.random.Generator, n: int = 12) -> dict:
    """n made-up words per attribute (cities capitalised, all distinct): a value pool for make_msqa."""
    seen, out = set(), {}
    for attr in ATTRIBUTES:
        words = []
        while len(words) < n:
            w = novel_word(rng)
            if w not in seen:
                seen.add(w)
                words.append(w.capitalize() if attr == "city" else w)
        out[attr] = words
    return out


def noun_values(split: str = "train") -> dict:
    """The split's recall nouns dealt out to the attributes: value words that no msqa episode of the split uses
    (train-side, a validation of how well a memory carries words it was never trained to write)."""
    nouns = pools_for(split)["nouns"]
    k = len(nouns) // len(ATTRIBUTES)
    return {attr: nouns[i * k:(i + 1) * k] for i, attr in enumerate(ATTRIBUTES)}


# --------------------------------------------------------------------------------------------------------
# --- Multi-session QA (task="msqa") ---
# --------------------------------------------------------------------------------------------------------

# facts = single-valued (person, attribute) slots; updated = how many of them get a chain of chain=(lo, hi)
# values in total; chars = history budget in characters (chit-chat and distractors fill up to it)
MSQA_PRESETS = {
    "tiny": dict(sessions=2, people=2, facts=3, updated=1, chain=(2, 2), relations=1, questions=5, chars=400),
    "small": dict(sessions=3, people=3, facts=6, updated=2, chain=(2, 2), relations=1, questions=6, chars=650),
    "medium": dict(sessions=8, people=6, facts=24, updated=6, chain=(2, 3), relations=3, questions=10, chars=3000),
    "long": dict(sessions=20, people=14, facts=64, updated=16, chain=(2, 4), relations=7, questions=16, chars=9000),
}
MSQA_FAMILY_WEIGHTS = {"single_hop": 0.2, "multi_hop": 0.15, "update": 0.25, "temporal": 0.2, "abstention": 0.2}


def _msqa_config(preset: str, split: str) -> dict:
    _check_name("preset", preset, PRESETS)
    _check_name("split", split, SPLITS)
    cfg = dict(MSQA_PRESETS[preset])
    if split in ("structure", "all"):  # longer structure than any training episode of this preset
        lo, hi = cfg["chain"]
        cfg.update(sessions=2 * cfg["sessions"], chain=(hi + 1, min(hi + 2, 6)), chars=int(1.6 * cfg["chars"]))
    return cfg


SHARED_N = (2, 4, 8)  # the same-attribute splits: N people, one attribute, chance 1/N


def make_shared(rng: np.random.Generator, n_people: int = 4, split: str = "iid", return_log: bool = False,
                values: dict | None = None):
    """N people who all share one attribute ("Alice lives in Paris.", "Bob lives in Rome.", ...), in 3
    msqa sessions (fewer when N < 3) with chit-chat and distractors; one question per person and one
    about a person never mentioned ("unknown"). The question's attribute alone picks a stated value at
    chance 1/N: only a lookup by the person beats it. values: as in pools_for."""
    if not 1 <= n_people <= 16:
        raise ValueError(f"n_people={n_people} must be between 1 and 16")
    cfg = dict(sessions=min(3, n_people), people=n_people, facts=n_people, updated=0, chain=(1, 1), relations=0,
               questions=n_people + 1, chars=280 + 30 * n_people, attrs=1, shared=True)
    pools = pools_for(split, values)
    for _ in range(100):
        result = _try_msqa(rng, cfg, pools)
        if result is not None:
            return result if return_log else result[0]
    raise RuntimeError(f"{n_people} shared facts do not fit into {cfg['chars']} characters")


def make_msqa(rng: np.random.Generator, preset: str = "small", split: str = "train", return_log: bool = False,
              dense: bool = False, attrs: int = 0, absent: int = 0, values: dict | None = None):
    """One multi-session QA episode; with return_log also the generator's fact log (see parse_facts).

    dense: one question about every stated fact's current value (single_hop or update) and every relation
    (multi_hop), then the preset's usual mix and a fifth as many abstention questions again: more answer
    tokens per written history, for training. attrs: draw every fact from this many attributes (0: all
    seven), so that people share attributes. absent: this many more abstention questions that ask a person
    never mentioned about an attribute the episode states, so that only the person says `unknown`.
    values: {attribute: words} in place of the split's value pools (pools_for)."""
    cfg, pools = _msqa_config(preset, split), pools_for(split, values)
    cfg.update(dense=dense, attrs=attrs, absent=absent)
    for _ in range(100):  # rare retry: the required lines alone overflowed the character budget
        result = _try_msqa(rng, cfg, pools)
        if result is not None:
            return result if return_log else result[0]
    raise RuntimeError(f"msqa preset {preset!r} cannot fit its facts into {cfg['chars']} characters")


def _try_msqa(rng, cfg, pools):
    names = [str(n) for n in rng.permutation(pools["names"])]
    speakers, people = names[:2], names[2:2 + cfg["people"]]
    absent = names[2 + cfg["people"]:]  # never written anywhere: for "absent person" abstention questions

    # hidden world: which (person, attribute) slots are stated, and each slot's chain of values;
    # cfg["attrs"] = k draws every fact from k attributes, so people share them (the type alone won't answer)
    k = max(cfg.get("attrs") or len(ATTRIBUTES), -(-cfg["facts"] // cfg["people"]))  # enough slots for the facts
    attrs = [str(a) for a in rng.choice(ATTRIBUTES, k, replace=False)] if k < len(ATTRIBUTES) else ATTRIBUTES
    slots = [(p, _pick(rng, attrs)) for p in people]  # every tracked person gets at least one fact
    free = [(p, a) for p in people for a in attrs if (p, a) not in slots]
    slots += [free[i] for i in rng.choice(len(free), cfg["facts"] - len(slots), replace=False)]
    updated = set(rng.choice(len(slots), cfg["updated"], replace=False).tolist())
    chains = {}
    for i, (p, attr) in enumerate(slots):
        n = int(rng.integers(cfg["chain"][0], cfg["chain"][1] + 1)) if i in updated else 1
        chains[(p, attr)] = [str(v) for v in rng.choice(pools["values"][attr], n, replace=False)]  # all distinct
    relations = []  # (person, relation, other person), at most one of each relation word per person
    while len(relations) < cfg["relations"]:
        p, q, rel = _pick(rng, people), _pick(rng, people), _pick(rng, RELATIONS)
        if p != q and all((p, rel) != (r[0], r[1]) for r in relations):
            relations.append((p, rel, q))

    # event order: shuffle all statements, then hand each slot its values in chain order
    events = [("fact", slot) for slot, chain in chains.items() for _ in chain] + [("rel", r) for r in relations]
    events = [events[i] for i in rng.permutation(len(events))]
    cuts = np.sort(rng.choice(np.arange(1, len(events)), cfg["sessions"] - 1, replace=False))
    session_of = np.searchsorted(cuts, np.arange(len(events)), side="right") + 1  # session number per event

    log, utterances, seen = [], [[] for _ in range(cfg["sessions"])], {}
    for (kind, what), s in zip(events, session_of.tolist()):
        if kind == "fact":
            (p, attr), k = what, seen.get(what, 0)
            seen[what] = k + 1
            v = chains[what][k]
            templates = pools["facts" if k == 0 else "updates"][attr]  # later mentions use update phrasing
            text = _pick(rng, templates).format(p=p, v=v, a=_article(v))
            log.append((s, p, attr, v))
        else:
            p, rel, q = what
            text = _pick(rng, pools["relations"]).format(p=p, rel=rel, q=q)
            log.append((s, p, rel, q))
        utterances[s - 1].append(_pick(rng, PREFIXES) + text)

    # fill up to the character budget with chit-chat and lexical distractors
    said = [v for chain in chains.values() for v in chain]
    longest_speaker = max(len(n) for n in speakers) + 2
    size = sum(len(f"Session {i + 1} (Day 100)") + 1 for i in range(cfg["sessions"]))
    size += sum(longest_speaker + len(u) + 1 for us in utterances for u in us)
    if size > cfg["chars"]:
        return None
    while True:
        if rng.random() < 0.5:
            line = _pick(rng, pools["chitchat"])
        else:  # a distractor names a tracked person or a value (half the time one that was really said)
            v = _pick(rng, said) if rng.random() < 0.5 else _pick(rng, pools["values"][_pick(rng, ATTRIBUTES)])
            line = _pick(rng, pools["distractors"]).format(p=_pick(rng, people), v=v)
        if size + longest_speaker + len(line) + 1 > cfg["chars"]:
            break
        size += longest_speaker + len(line) + 1
        us = utterances[int(rng.integers(cfg["sessions"]))]
        us.insert(int(rng.integers(len(us) + 1)), line)

    # render: header with increasing days, then the two speakers take turns
    sessions, day = [], 0
    for i, us in enumerate(utterances):
        day += int(rng.integers(1, 15))
        turn = int(rng.integers(2))
        lines = [f"{speakers[(turn + j) % 2]}: {u}" for j, u in enumerate(us)]
        sessions.append([f"Session {i + 1} (Day {day})"] + lines)

    questions = _msqa_questions(rng, cfg, pools, chains, relations, log, people, absent)
    return Episode(sessions=sessions, questions=questions, task="msqa"), log


def _msqa_questions(rng, cfg, pools, chains, relations, log, people, absent) -> list[Question]:
    qs = pools["questions"]

    def current(attr, subject):
        return _pick(rng, qs["current"][attr]).format(p=subject)

    def previous(attr, p, v):
        return _pick(rng, qs["previous"][attr]).format(p=p, v=v, a=_article(v))

    def which_session(attr, p, v):
        return _pick(rng, qs["session"][attr]).format(p=p, v=v, a=_article(v))

    def ask(family):  # one random question of a family, or None when this episode cannot have one
        single = [s for s, c in chains.items() if len(c) == 1]
        multi = [s for s, c in chains.items() if len(c) > 1]
        if family == "single_hop" and single:
            (p, attr) = _pick(rng, single)
            return Question(current(attr, p), chains[(p, attr)][0], family)
        if family == "multi_hop" and relations:
            p, rel, q = _pick(rng, relations)
            (_, attr) = _pick(rng, [s for s in chains if s[0] == q])  # every tracked person has a fact
            return Question(current(attr, f"{p}'s {rel}"), chains[(q, attr)][-1], family)
        if family == "update" and multi:
            (p, attr) = _pick(rng, multi)
            return Question(current(attr, p), chains[(p, attr)][-1], family, stale=chains[(p, attr)][:-1])
        if family == "temporal":
            if multi and rng.random() < 0.5:  # the value before a later one
                (p, attr) = _pick(rng, multi)
                k = int(rng.integers(1, len(chains[(p, attr)])))
                return Question(previous(attr, p, chains[(p, attr)][k]), chains[(p, attr)][k - 1], family)
            s, p, attr, v = _pick(rng, [e for e in log if e[2] in ATTRIBUTES])  # the session a value was said in
            return Question(which_session(attr, p, v), str(s), family)
        if family == "abstention":
            kind = _pick(rng, ["never_stated", "absent_person", "false_before", "false_session"])
            p, attr = _pick(rng, people), _pick(rng, ATTRIBUTES)
            if kind == "never_stated":
                unstated = [(p, a) for p in people for a in ATTRIBUTES if (p, a) not in chains]
                (p, attr) = _pick(rng, unstated)
                return Question(current(attr, p), UNKNOWN, family)
            if kind == "absent_person":
                return Question(current(attr, _pick(rng, absent)), UNKNOWN, family)
            # false premise: a value this person never had for this attribute
            v = _pick(rng, [v for v in pools["values"][attr] if v not in chains.get((p, attr), [])])
            text = previous(attr, p, v) if kind == "false_before" else which_session(attr, p, v)
            return Question(text, UNKNOWN, family)
        return None

    if cfg.get("shared"):  # every person once, then a person never mentioned, all with the one attribute
        out = [Question(current(attr, p), chain[-1], "single_hop") for (p, attr), chain in chains.items()]
        out.append(Question(current(next(iter(chains))[1], _pick(rng, absent)), UNKNOWN, "abstention"))
        return [out[i] for i in rng.permutation(len(out))]
    dense = []                                                           # dense: every fact asked once
    if cfg.get("dense"):
        for (p, attr), chain in chains.items():
            family = "update" if len(chain) > 1 else "single_hop"
            dense.append(Question(current(attr, p), chain[-1], family, stale=chain[:-1]))
        for p, rel, q in relations:
            (_, attr) = _pick(rng, [s for s in chains if s[0] == q])
            dense.append(Question(current(attr, f"{p}'s {rel}"), chains[(q, attr)][-1], "multi_hop"))
    # one question per family first (every family in every episode when the preset allows), then random ones
    families = list(MSQA_FAMILY_WEIGHTS)[: cfg["questions"]]
    weights = np.array(list(MSQA_FAMILY_WEIGHTS.values()))
    while len(families) < cfg["questions"]:
        families.append(list(MSQA_FAMILY_WEIGHTS)[int(rng.choice(len(weights), p=weights / weights.sum()))])
    if dense:                                                            # keep abstention's share near the mix's
        families += ["abstention"] * max(1, round(len(dense) * MSQA_FAMILY_WEIGHTS["abstention"]))
    stated = sorted({a for (_, a) in chains})
    for _ in range(cfg.get("absent", 0)):                                # only the person can say `unknown`
        dense.append(Question(current(_pick(rng, stated), _pick(rng, absent)), UNKNOWN, "abstention"))
    out, texts = list(dense), {q.q for q in dense}
    for family in families:
        for _ in range(20):  # a few tries to avoid asking the same question twice
            question = ask(family)
            if question is not None and question.q not in texts:
                out.append(question)
                texts.add(question.q)
                break
    return [out[i] for i in rng.permutation(len(out))]


# --------------------------------------------------------------------------------------------------------
# --- Associative recall (task="recall") ---
# --------------------------------------------------------------------------------------------------------

RECALL_PRESETS = {
    "tiny": dict(n_pairs=4, lines_per_session=4),
    "small": dict(n_pairs=8, lines_per_session=6),
    "medium": dict(n_pairs=16, lines_per_session=8),
    "long": dict(n_pairs=32, lines_per_session=8),
}
RECALL_DEFAULTS = dict(pairs_per_line=1, n_queries=None, mix=None, filler_ratio=0.5, gap_alpha=1.0, reassign=1)
RECALL_MIX = {"recall": 0.5, "forgetting": 0.25, "two_hop": 0.25}  # share of keys per variant


def make_recall(rng: np.random.Generator, preset: str = "small", split: str = "train", *, n_pairs=None,
                pairs_per_line=None, lines_per_session=None, n_queries=None, mix=None, filler_ratio=None,
                gap_alpha=None, reassign=None, return_log: bool = False):
    """One MQAR-over-text episode. Keyword arguments override the preset (None = preset value).

    n_pairs: distinct keys; pairs_per_line: "k: v." pairs per line; lines_per_session: lines per session;
    n_queries: questions (default n_pairs: every key queried once); mix: {variant: share of keys};
    filler_ratio: filler lines per pair line; gap_alpha: exponent of the power law on (lines to the end
    of the history); reassign: new values per "forgetting" key.
    """
    _check_name("preset", preset, PRESETS)
    pools = pools_for(split)
    cfg = {**RECALL_DEFAULTS, **RECALL_PRESETS[preset]}
    if split in ("structure", "all"):  # more (shorter) sessions and longer reassignment chains
        cfg.update(lines_per_session=max(2, cfg["lines_per_session"] // 2), reassign=cfg["reassign"] + 1)
    given = dict(n_pairs=n_pairs, pairs_per_line=pairs_per_line, lines_per_session=lines_per_session,
                 n_queries=n_queries, mix=mix, filler_ratio=filler_ratio, gap_alpha=gap_alpha, reassign=reassign)
    cfg.update({k: v for k, v in given.items() if v is not None})
    n, mix = cfg["n_pairs"], cfg["mix"] or RECALL_MIX
    if not 1 <= n <= len(pools["names"]):
        raise ValueError(f"n_pairs={n} must be between 1 and {len(pools['names'])} (the keys in split {split!r})")

    # roles: each key is queried as one variant; two-hop keys point at another key's name
    keys = [str(k) for k in rng.choice(pools["names"], n, replace=False)]
    counts = {v: int(round(mix.get(v, 0) * n)) for v in ("forgetting", "two_hop")}
    if n >= 3:  # small n still gets every variant that the mix asks for
        counts = {v: max(c, 1) if mix.get(v, 0) > 0 else 0 for v, c in counts.items()}
    n_two = min(counts["two_hop"], n - 1)  # at least one key must hold a noun for two-hop keys to point at
    n_forget = min(counts["forgetting"], n - n_two)
    role = {k: "two_hop" for k in keys[:n_two]}
    role.update({k: "forgetting" for k in keys[n_two:n_two + n_forget]})
    role.update({k: "recall" for k in keys[n_two + n_forget:]})
    direct = keys[n_two:]  # keys holding a noun
    nouns = pools["nouns"]
    values = {k: [str(v)] for k, v in zip(direct, rng.choice(nouns, len(direct), replace=len(direct) > len(nouns)))}
    for k in keys[:n_two]:
        values[k] = [_pick(rng, direct)]  # "Alice: Dave." with Dave a key that holds a noun
    for k in keys[n_two:n_two + n_forget]:
        for _ in range(cfg["reassign"]):
            values[k].append(_pick(rng, [v for v in nouns if v not in values[k]]))  # a new value each time

    # event order: first assignments in random order; each reassignment somewhere after the previous one
    events = [(k, values[k][0]) for k in rng.permutation(keys).tolist()]
    for k in keys[n_two:n_two + n_forget]:
        at = [i for i, (key, _) in enumerate(events) if key == k][0]
        for v in values[k][1:]:
            at = int(rng.integers(at + 1, len(events) + 1))
            events.insert(at, (k, v))

    # lines: pairs_per_line pairs each; pair lines land at power-law distances from the end among fillers
    ppl = cfg["pairs_per_line"]
    pair_lines = ["- " + " ".join(f"{k}: {v}." for k, v in events[i:i + ppl]) for i in range(0, len(events), ppl)]
    n_lines = len(pair_lines) + int(round(cfg["filler_ratio"] * len(pair_lines)))
    gap = n_lines - np.arange(n_lines)  # lines from each position to the end of the history
    weight = gap.astype(float) ** -cfg["gap_alpha"]
    where = np.sort(rng.choice(n_lines, len(pair_lines), replace=False, p=weight / weight.sum()))
    lines = [_pick(rng, pools["fillers"]) for _ in range(n_lines)]
    for i, line in zip(where.tolist(), pair_lines):
        lines[i] = line
    per = cfg["lines_per_session"]
    sessions = [lines[i:i + per] for i in range(0, n_lines, per)]
    # the generator's log, in the form parse_facts returns: (session, key, "recall", value)
    line_of = [where[i // ppl] for i in range(len(events))]
    log = [(int(line) // per + 1, k, "recall", v) for line, (k, v) in zip(line_of, events)]

    # questions: each queried key once, in random order
    asked = keys
    if cfg["n_queries"] is not None:  # a random subset of the keys
        asked = [str(k) for k in rng.choice(keys, min(cfg["n_queries"], n), replace=False)]
    questions = []
    for k in rng.permutation(asked).tolist():
        if role[k] == "two_hop":
            questions.append(Question(f"{k}??", values[values[k][0]][-1], "two_hop"))
        else:
            questions.append(Question(f"{k}?", values[k][-1], role[k], stale=values[k][:-1]))
    ep = Episode(sessions=sessions, questions=questions, task="recall")
    return (ep, log) if return_log else ep


def make_overwrites(rng: np.random.Generator, n_pairs: int = 8, split: str = "train", updates=(1, 3),
                    filler_ratio: float = 0.5) -> Episode:
    """Recall with overwrites across sessions: session 1 gives each of n_pairs keys a value; then half the
    keys (at least one) get updates[0]..updates[1] new values, the j-th in session 1 + j. Attention sees
    one session at a time, so an old value never sits beside its replacement: only a memory that erases
    can tell the latest. Questions: every reassigned key ("forgetting"), the latest value wins; stale =
    its older values, oldest first."""
    pools = pools_for(split)
    if not 1 <= n_pairs <= len(pools["names"]):
        raise ValueError(f"n_pairs={n_pairs} must be between 1 and {len(pools['names'])} (the keys in split {split!r})")
    keys = [str(k) for k in rng.choice(pools["names"], n_pairs, replace=False)]
    values = {k: [str(rng.choice(pools["nouns"]))] for k in keys}
    moved = keys[:max(1, n_pairs // 2)]
    for k in moved:
        for _ in range(int(rng.integers(updates[0], updates[1] + 1))):
            values[k].append(_pick(rng, [v for v in pools["nouns"] if v not in values[k]]))
    sessions = []
    for j in range(max(len(v) for v in values.values())):           # session j + 1 holds the j-th values
        pairs = [f"- {k}: {values[k][j]}." for k in rng.permutation(keys).tolist() if len(values[k]) > j]
        lines = pairs + [_pick(rng, pools["fillers"]) for _ in range(int(round(filler_ratio * len(pairs))))]
        sessions.append([lines[i] for i in rng.permutation(len(lines))])
    questions = [Question(f"{k}?", values[k][-1], "forgetting", stale=values[k][:-1])
                 for k in rng.permutation(moved).tolist()]
    return Episode(sessions=sessions, questions=questions, task="recall")


# --------------------------------------------------------------------------------------------------------
# --- Episodes and rendering ---
# --------------------------------------------------------------------------------------------------------


GENERATORS = TASKS + ["overwrites", "shared"]  # overwrites: recall episodes (task "recall") with cross-session
# updates; shared: msqa episodes whose people all share one attribute (make_shared, N people per preset)
SHARED_PRESETS = {"tiny": 2, "small": 4, "medium": 8, "long": 16}


def make_episode(rng: np.random.Generator, task: str = "msqa", preset: str = "small", split: str = "train") -> Episode:
    _check_name("task", task, GENERATORS)
    if task == "shared":
        _check_name("preset", preset, PRESETS)
        return make_shared(rng, SHARED_PRESETS[preset], split)
    if task == "overwrites":
        _check_name("preset", preset, PRESETS)
        return make_overwrites(rng, RECALL_PRESETS[preset]["n_pairs"], split)
    return make_msqa(rng, preset, split) if task == "msqa" else make_recall(rng, preset, split)


def make_episodes(n: int, seed: int, task: str = "msqa", preset: str = "small", split: str = "train") -> list[Episode]:
    rng = np.random.default_rng(seed)  # one generator for the whole list: deterministic given the seed
    return [make_episode(rng, task, preset, split) for _ in range(n)]


def render_history(ep: Episode) -> str:
    return "".join(line + "\n" for session in ep.sessions for line in session)


def render_qa(q: Question) -> str:
    return f"Q: {q.q}\nA: {q.a}\n"


def render_document(ep: Episode) -> str:
    """History plus every Q/A: the backbone pretrains on these to learn answering from context."""
    return render_history(ep) + "".join(render_qa(q) for q in ep.questions)


# --------------------------------------------------------------------------------------------------------
# --- Scoring: the one answer check of every evaluation ---
# --------------------------------------------------------------------------------------------------------

def normalize_answer(s: str) -> str:
    return s.strip().strip(".!?,;:").strip().lower()


def exact_match(pred: str, gold: str) -> bool:
    """Equal after normalize_answer (case, surrounding blanks and final punctuation do not count)."""
    return normalize_answer(pred) == normalize_answer(gold)


def score(preds: list[str], gold: list[str], fams: list[str]) -> dict:
    """{family: exact-match accuracy} of predictions against gold answers, and their mean under "macro"."""
    per: dict = {}
    for p, g, f in zip(preds, gold, fams):
        per.setdefault(f, []).append(exact_match(p, g))
    res = {f: float(np.mean(v)) for f, v in sorted(per.items())}
    res["macro"] = float(np.mean(list(res.values()))) if res else 0.0
    return res


# --------------------------------------------------------------------------------------------------------
# --- Self-check parser: every answer re-derived from the rendered text alone ---
# --------------------------------------------------------------------------------------------------------

_HEADER = re.compile(r"Session (\d+) \(Day \d+\)")
_SPEAKER = re.compile(r"(\w+): (.*)")
_PAIR = re.compile(r"(\w+): (\w+)\.")  # one recall pair, "Alice: tiger."
_RECALL_Q = re.compile(r"(\w+)(\?\??)")
_REL = "|".join(RELATIONS)
_SLOTS = {"p": r"(?P<p>\w+)", "q": r"(?P<q>\w+)", "v": r"(?P<v>\w+)", "a": r"(?:a|an)", "rel": f"(?P<rel>{_REL})"}
_PREFIX = "(?:" + "|".join(re.escape(x) for x in PREFIXES if x) + ")?"


def _regex(template: str, prefix: str = "", **slots) -> re.Pattern:
    """A template as an anchored regex: literal text escaped, {name} placeholders as groups."""
    parts = re.split(r"\{(\w+)\}", template)  # odd indices are placeholder names
    body = "".join(re.escape(x) if i % 2 == 0 else {**_SLOTS, **slots}[x] for i, x in enumerate(parts))
    return re.compile(prefix + body)


_BOTH = _union(POOLS["train"], POOLS["heldout"])  # the parser knows every template, train and held-out
_STATEMENTS = [(_regex(t, _PREFIX), attr) for kind in ("facts", "updates") for attr, ts in _BOTH[kind].items()
               for t in ts] + [(_regex(t, _PREFIX), "relation") for t in _BOTH["relations"]]
_QUESTIONS = [(_regex(t, p=rf"(?P<p>\w+(?:'s (?:{_REL}))?)"), kind, attr)
              for kind, per_attr in _BOTH["questions"].items() for attr, ts in per_attr.items() for t in ts]


def _only(matches: list, text: str):
    """The one meaning of a line (None if it states nothing); two different meanings = ambiguous templates."""
    if len(set(matches)) > 1:
        raise ValueError(f"ambiguous line {text!r}: {sorted(set(matches))}")
    return matches[0] if matches else None


def parse_facts(ep: Episode) -> list[tuple[int, str, str, str]]:
    """Every statement in the history as (session, subject, slot, value), in order.

    msqa: slot = an attribute ("city") with a value, or a relation word ("sister") with another person;
    recall: slot = "recall", subject = key. Sessions count from 1 (msqa: the header's number).
    """
    facts = []
    for i, session in enumerate(ep.sessions, start=1):
        s = i
        for line in session:
            if ep.task != "recall" and (m := _HEADER.fullmatch(line)) is not None:
                s = int(m.group(1))
                continue
            facts += [(s, *fact) for fact in line_facts(line, ep.task)]
    return facts


def overwritten_later(ep: Episode, q: Question) -> bool:
    """Is q about a slot whose latest value was stated in a later session than every older value of it?
    Then attention, one session at a time, never sees the old value beside the new one: only a memory
    that erases can answer. (Every overwrites question is; msqa update questions often are.) The main job
    and dev/ablate.py's overwrite experiment score these questions apart."""
    if not q.stale:
        return False
    facts = parse_facts(ep)
    latest = [(s, subj, slot) for s, subj, slot, v in facts if v == q.a]
    for s, subj, slot in latest[::-1]:
        older = [t for t, subj2, slot2, v in facts if (subj2, slot2) == (subj, slot) and v in q.stale]
        if older:
            return s > max(older)
    return False


def line_facts(line: str, task: str = "msqa") -> list[tuple[str, str, str]]:
    """What one history line states, as (subject, slot, value) triples: none, one, or (recall) several."""
    if task == "recall":
        return [(k, "recall", v) for k, v in _PAIR.findall(line)]
    if (speaker := _SPEAKER.fullmatch(line)) is None:
        return []
    found = []
    for regex, attr in _STATEMENTS:
        if (m := regex.fullmatch(speaker.group(2))) is not None:
            g = m.groupdict()
            found.append((g["p"], g["rel"], g["q"]) if attr == "relation" else (g["p"], attr, g["v"]))
    fact = _only(found, line)
    return [] if fact is None else [fact]


def _answer(question: str, state: dict, task: str) -> str:
    """Answer one question from state[(subject, slot)] = [(value, session), ...] (oldest first)."""
    def latest(subject, slot):
        return state[(subject, slot)][-1][0] if (subject, slot) in state else UNKNOWN

    if task == "recall":
        m = _RECALL_Q.fullmatch(question)
        if m is None:
            raise ValueError(f"unparsable recall question {question!r}")
        value = latest(m.group(1), "recall")
        return latest(value, "recall") if m.group(2) == "??" else value
    found = []
    for regex, kind, attr in _QUESTIONS:
        if (m := regex.fullmatch(question)) is not None:
            found.append((kind, attr, m.group("p"), m.groupdict().get("v")))
    if not found:
        raise ValueError(f"unparsable question {question!r}")
    kind, attr, person, v = _only(found, question)
    if "'s " in person:  # multi-hop: "Alice's sister" is whoever was said to be her sister
        owner, rel = person.split("'s ")
        person = latest(owner, rel)
    chain = state.get((person, attr), [])
    values = [value for value, _ in chain]
    if kind == "current":
        return values[-1] if values else UNKNOWN
    if kind == "previous":  # a false premise (v never her value, or her first one) has no answer
        return values[values.index(v) - 1] if v in values[1:] else UNKNOWN
    return str(chain[values.index(v)][1]) if v in values else UNKNOWN  # kind == "session"


def absent_person(ep: Episode, q: Question) -> bool:
    """True when q asks about a person the episode's history never names (its answer can only be `unknown`,
    and only the person's name tells it apart from the stated people's questions)."""
    found = {m.group("p") for regex, _, _ in _QUESTIONS if (m := regex.fullmatch(q.q)) is not None}
    if ep.task != "msqa" or len(found) != 1 or "'s " in next(iter(found)):
        return False
    return re.search(rf"\b{re.escape(found.pop())}\b", render_history(ep)) is None


def parse_gold(ep: Episode) -> list[str]:
    """Every question's answer, re-derived from the session lines and question strings alone."""
    state = {}
    for s, subject, slot, value in parse_facts(ep):
        state.setdefault((subject, slot), []).append((value, s))  # replay: the latest statement wins
    return [_answer(q.q, state, ep.task) for q in ep.questions]


# --------------------------------------------------------------------------------------------------------
# --- JSONL files ---
# --------------------------------------------------------------------------------------------------------

_FORMAT = 'each line must be {"sessions": [[line, ...], ...], "questions": [{"q": ..., "a": ..., "family": ...}]}'
_ALL_FAMILIES = [f for families in FAMILIES.values() for f in families]  # the labels a file may use


def save_jsonl(path, episodes: list[Episode]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for ep in episodes:
            questions = [{"q": q.q, "a": q.a, "family": q.family, **({"stale": q.stale} if q.stale else {})}
                         for q in ep.questions]
            obj = {"sessions": ep.sessions, "questions": questions, "task": ep.task}
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")  # non-ASCII stays readable


def _is_text(x, allow_empty: bool = False) -> bool:
    return isinstance(x, str) and "\n" not in x and (allow_empty or x.strip() != "")


def _episode_from(obj) -> Episode:
    """An Episode from one parsed JSON line; raises ValueError(what is wrong) for the caller to locate."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    for key in ("sessions", "questions"):
        if key not in obj:
            raise ValueError(f"missing field {key!r}")
    sessions, questions = obj["sessions"], obj["questions"]
    if not isinstance(sessions, list) or not sessions:
        raise ValueError("'sessions' must be a non-empty list of sessions")
    for i, session in enumerate(sessions):
        if not isinstance(session, list) or not session or not all(_is_text(x, allow_empty=True) for x in session):
            raise ValueError(f"session {i} must be a non-empty list of one-line strings")
    if not isinstance(questions, list) or not questions:
        raise ValueError("'questions' must be a non-empty list")
    out = []
    for i, q in enumerate(questions):
        if not isinstance(q, dict) or any(k not in q for k in ("q", "a", "family")):
            raise ValueError(f"question {i} needs the fields 'q', 'a' and 'family'")
        if not all(_is_text(q[k]) for k in ("q", "a", "family")):
            raise ValueError(f"question {i}: 'q', 'a' and 'family' must be non-empty one-line strings")
        if q["family"] not in _ALL_FAMILIES:                            # a typo would score as a family of its own
            raise ValueError(f"question {i}: family {q['family']!r} is unknown; 'family' must be one of "
                             f"{', '.join(_ALL_FAMILIES)}")
        stale = q.get("stale", [])
        if not isinstance(stale, list) or not all(_is_text(x) for x in stale):
            raise ValueError(f"question {i}: 'stale' must be a list of strings")
        out.append(Question(q["q"], q["a"], q["family"], list(stale)))
    task = obj.get("task", "msqa")
    if task not in TASKS:
        raise ValueError(f"'task' must be one of {', '.join(TASKS)}")
    return Episode(sessions=[list(s) for s in sessions], questions=out, task=task)


def load_jsonl(path) -> list[Episode]:
    """Episodes from a JSONL file (one per line; blank lines skipped). Bad input raises TaskFileError."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise TaskFileError(f"{path}: cannot read episode file ({e.strerror}); check the path") from None
    episodes = []
    for n, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise TaskFileError(f"{path}:{n}: not valid UTF-8; save the file as UTF-8") from None
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise TaskFileError(f"{path}:{n}: invalid JSON ({e.msg}, column {e.colno}); {_FORMAT}") from None
        try:
            episodes.append(_episode_from(obj))
        except ValueError as e:
            raise TaskFileError(f"{path}:{n}: {e}; {_FORMAT}") from None
    if not episodes:
        raise TaskFileError(f"{path}: no episodes found; {_FORMAT}")
    return episodes


# --- Tokenised batches (model-facing) ---------------------------------------------------------
# The memory sees an episode as: history windows (one session, or a block-sized slice of it, per
# window; attention never crosses a window, the memory state runs through all of them), then the
# questions, each "Q: <question>\nA:" optionally after some history tokens, with a loss only on the
# answer " <answer>\n". Every target that is not an answer token carries IGNORE_INDEX.

def _ignore_index():
    from nanodeltamem import IGNORE_INDEX                               # the one shared constant
    return IGNORE_INDEX


def encode_history(enc, ep, window):
    """History -> list of windows (tokens, line ids); sessions longer than `window` are cut at line
    boundaries, a single line longer than `window` is cut into window-sized pieces."""
    windows = []
    for session in ep.sessions:
        toks, seg = [], []
        for line in session:
            t = enc.encode_ordinary(line + "\n")
            pieces = [t[i:i + window] for i in range(0, len(t), window)]
            for piece in pieces:
                if toks and len(toks) + len(piece) > window:
                    windows.append((toks, seg))
                    toks, seg = [], []
                line_id = seg[-1] + 1 if seg else 0
                toks, seg = toks + piece, seg + [line_id] * len(piece)
        if toks:
            windows.append((toks, seg))
    return windows


def question_prompt(enc, q, context=()):
    """Token ids of the read context: optional history tokens, then "Q: ...\\nA:"."""
    return list(context) + enc.encode_ordinary(f"Q: {q.q}\nA:")


def encode_question(enc, q, context=()):
    """(x, y) for teacher forcing: y is IGNORE_INDEX everywhere but the answer tokens " a\\n"."""
    prompt = question_prompt(enc, q, context)
    answer = enc.encode_ordinary(f" {q.a}\n")
    toks = prompt + answer
    return toks[:-1], [_ignore_index()] * (len(prompt) - 1) + answer


def recent_tokens(enc, ep, n):
    """The last n history tokens (the recent-window read context)."""
    if n <= 0:
        return []
    return enc.encode_ordinary(render_history(ep))[-n:]


def collate_episodes(enc, episodes, window, pad_id, read_window=0):
    """Pad a list of episodes into tensors.

    hist, mask, seg (B, W, L): history windows (token ids, real-token mask, line ids with -1 on
    padding); qx, qy (B, Q, Lq): questions with answer-only targets (padding questions are all
    IGNORE_INDEX). read_window > 0 puts that many last history tokens before every question.
    """
    import torch
    ign = _ignore_index()
    hists = [encode_history(enc, ep, window) for ep in episodes]
    W = max(len(h) for h in hists)
    L = max(len(t) for h in hists for t, _ in h)
    B = len(episodes)
    hist = torch.full((B, W, L), pad_id, dtype=torch.long)
    seg = torch.full((B, W, L), -1, dtype=torch.long)
    for b, h in enumerate(hists):
        for w, (t, s) in enumerate(h):
            hist[b, w, :len(t)] = torch.tensor(t)
            seg[b, w, :len(s)] = torch.tensor(s)
    qs = [[encode_question(enc, q, recent_tokens(enc, ep, read_window)) for q in ep.questions] for ep in episodes]
    Q = max(len(x) for x in qs)
    Lq = max(len(x) for e in qs for x, _ in e)
    qx = torch.full((B, Q, Lq), pad_id, dtype=torch.long)
    qy = torch.full((B, Q, Lq), ign, dtype=torch.long)
    for b, e in enumerate(qs):
        for i, (x, y) in enumerate(e):
            qx[b, i, :len(x)] = torch.tensor(x)
            qy[b, i, :len(y)] = torch.tensor(y)
    return dict(hist=hist, mask=seg >= 0, seg=seg, qx=qx, qy=qy)

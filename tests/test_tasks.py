"""Tests for data/tasks.py: determinism, coverage, the self-check parser, held-out splits and JSONL I/O."""
import re

import numpy as np
import pytest

from data import tasks
from data.tasks import (ATTRIBUTES, FAMILIES, NAMES, NOUNS, POOLS, PRESETS, SPLITS, VALUES, Episode, Question,
                        TaskFileError, load_jsonl, make_episode, make_episodes, make_msqa, make_recall, parse_facts,
                        parse_gold, pools_for, render_document, render_history, render_qa, save_jsonl)

TASKS = ["msqa", "recall"]
GOLD_EPISODES = {"tiny": 1000, "small": 1000, "medium": 400, "long": 60}  # per task; long ones are slow


def _mixed(task, preset, n, seed=0, return_log=False):
    """n episodes cycling through every split, from one generator."""
    rng = np.random.default_rng(seed)
    make = make_msqa if task == "msqa" else make_recall
    return [make(rng, preset, SPLITS[i % len(SPLITS)], return_log=return_log) for i in range(n)]


# --- determinism ---

@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("preset", PRESETS)
def test_same_seed_same_episodes_other_seed_different(task, preset):
    a = make_episodes(3, seed=7, task=task, preset=preset, split="all")
    assert a == make_episodes(3, seed=7, task=task, preset=preset, split="all")
    assert a != make_episodes(3, seed=8, task=task, preset=preset, split="all")
    assert a[0] != a[1]  # the generator advances between episodes


def test_no_global_rng_used():
    np.random.seed(0)
    a = make_episodes(2, seed=3)
    np.random.seed(1)  # reseeding the global RNG must not change anything
    assert a == make_episodes(2, seed=3)


# --- coverage and sizes ---

@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("preset", PRESETS)
def test_every_family_in_every_preset(task, preset):
    eps = make_episodes(6, seed=1, task=task, preset=preset)
    assert {q.family for ep in eps for q in ep.questions} == set(FAMILIES[task])
    if preset != "tiny":  # small and up: every family in every episode
        assert all({q.family for q in ep.questions} == set(FAMILIES[task]) for ep in eps)


@pytest.mark.parametrize("preset,max_chars,n_questions", [("tiny", 400, (3, 6)), ("small", 650, (5, 8))])
def test_small_histories_fit_their_budget(preset, max_chars, n_questions):
    for ep in make_episodes(200, seed=2, preset=preset):
        assert len(render_history(ep)) <= max_chars
        assert n_questions[0] <= len(ep.questions) <= n_questions[1]


def test_medium_and_long_histories_are_long():
    assert 2000 < len(render_history(make_episode(np.random.default_rng(0), preset="medium"))) <= 3000
    assert 7000 < len(render_history(make_episode(np.random.default_rng(0), preset="long"))) <= 9000


def test_msqa_sessions_have_increasing_headers_and_two_speakers():
    for ep in make_episodes(50, seed=3, preset="medium"):
        headers = [re.fullmatch(r"Session (\d+) \(Day (\d+)\)", s[0]) for s in ep.sessions]
        assert all(headers)
        assert [int(h.group(1)) for h in headers] == list(range(1, len(ep.sessions) + 1))
        days = [int(h.group(2)) for h in headers]
        assert days == sorted(set(days))  # strictly increasing
        speakers = {line.split(": ")[0] for s in ep.sessions for line in s[1:]}
        assert len(speakers) == 2


@pytest.mark.parametrize("preset", ["small", "medium"])
def test_structure_split_is_longer(preset):
    def shape(split):
        eps = make_episodes(40, seed=4, preset=preset, split=split)
        chains = {}
        for ep in eps:
            for s, subject, slot, v in parse_facts(ep):
                chains[(id(ep), subject, slot)] = chains.get((id(ep), subject, slot), 0) + 1
        return max(len(ep.sessions) for ep in eps), max(chains.values())

    (train_sessions, train_chain), (struct_sessions, struct_chain) = shape("train"), shape("structure")
    assert struct_sessions > train_sessions and struct_chain > train_chain


# --- the self-check parser ---

@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("preset", PRESETS)
def test_parse_gold_equals_generator_answers(task, preset):
    for ep in _mixed(task, preset, GOLD_EPISODES[preset]):
        assert parse_gold(ep) == [q.a for q in ep.questions], render_document(ep)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("preset", ["small", "long"])
def test_parser_extracts_exactly_the_generators_facts(task, preset):
    # distractors and chit-chat never assert a fact: the parsed facts are exactly the generator's log
    for ep, log in _mixed(task, preset, 200 if preset == "small" else 20, seed=5, return_log=True):
        assert parse_facts(ep) == log


def test_distractor_and_chitchat_lines_assert_nothing():
    both = tasks._union(POOLS["train"], POOLS["heldout"])
    lines = [t.format(p=p, v=v) for t in both["distractors"] for p in NAMES[:5] for a in ATTRIBUTES
             for v in VALUES[a][:5]] + both["chitchat"]
    ep = Episode([["Session 1 (Day 1)"] + [f"Mia: {x}" for x in lines]], [])
    assert parse_facts(ep) == []
    recall = Episode([both["fillers"]], [], task="recall")
    assert parse_facts(recall) == []


def test_parser_reads_every_statement_template():
    # each fact/update/relation template, with every prefix, is read back as (person, slot, value)
    both = tasks._union(POOLS["train"], POOLS["heldout"])
    lines, want = ["Session 2 (Day 5)"], []
    for kind in ("facts", "updates"):
        for attr, templates in both[kind].items():
            for t in templates:
                for prefix in set(tasks.PREFIXES):
                    v = VALUES[attr][len(lines) % len(VALUES[attr])]
                    lines.append("Leo: " + prefix + t.format(p="Alice", v=v, a=tasks._article(v)))
                    want.append((2, "Alice", attr, v))
    for t in both["relations"]:
        lines.append("Leo: " + t.format(p="Alice", rel="cousin", q="Dave"))
        want.append((2, "Alice", "cousin", "Dave"))
    assert parse_facts(Episode([lines], [])) == want


def test_statements_put_the_name_before_a_final_value():
    n = 0
    for ep in _mixed("msqa", "medium", 30, seed=6):
        for line in [line for s in ep.sessions for line in s[1:]]:
            for _, person, slot, value in parse_facts(Episode([[line]], [])):
                if slot in ATTRIBUTES:
                    words = re.findall(r"\w+", line.split(": ", 1)[1])
                    assert words.index(person) < words.index(value), line
                    assert words.index(value) >= len(words) - 3, line  # value last or nearly last
                    n += 1
    assert n > 500


def test_question_never_contains_its_answer():
    for task in TASKS:
        for preset in PRESETS:
            for ep in _mixed(task, preset, 100 if preset != "long" else 10, seed=8):
                for q in ep.questions:
                    assert not re.search(rf"\b{re.escape(q.a)}\b", q.q), (q.q, q.a)


def test_update_questions_record_stale_values():
    n = 0
    for ep in _mixed("msqa", "medium", 50, seed=9) + _mixed("recall", "small", 50, seed=9):
        facts = parse_facts(ep)
        for q in ep.questions:
            if q.family in ("update", "forgetting"):
                assert q.stale and q.a not in q.stale
                assert set(q.stale) <= {v for *_, v in facts}  # stale values were really said
                n += 1
            else:
                assert q.stale == []
    assert n > 50


def test_abstention_answers_unknown_and_unknown_is_never_a_value():
    all_values = {v for vs in VALUES.values() for v in vs} | set(NOUNS)
    assert tasks.UNKNOWN not in all_values
    for ep in make_episodes(50, seed=10, preset="small"):
        assert all((q.a == "unknown") == (q.family == "abstention") for q in ep.questions)


# --- pools and held-out splits ---

def test_pool_sizes_and_disjointness():
    assert len(ATTRIBUTES) >= 6
    assert all(len(VALUES[a]) >= 30 for a in ATTRIBUTES)
    assert all(re.fullmatch(r"[A-Za-z]+", w) for ws in [NAMES, NOUNS, *VALUES.values()] for w in ws)
    every_value = [v for vs in VALUES.values() for v in vs]
    assert len(set(every_value)) == len(every_value)  # no value in two attributes
    assert len(set(NAMES)) == len(NAMES) and len(set(NOUNS)) == len(NOUNS)
    lower = {w.lower() for w in NAMES}
    assert not lower & {w.lower() for w in every_value + NOUNS}  # a name is never a value


def _flatten(pool):
    return [x for v in pool.values() for x in _flatten(v)] if isinstance(pool, dict) else list(pool)


@pytest.mark.parametrize("key", list(POOLS["train"]))
def test_heldout_pools_are_disjoint_from_train(key):
    train, held = POOLS["train"][key], POOLS["heldout"][key]
    if isinstance(train, dict):  # per attribute (values, templates): check each attribute's lists
        for sub in train:
            assert set(_flatten({sub: train[sub]})).isdisjoint(_flatten({sub: held[sub]}))
            assert _flatten({sub: train[sub]}) and _flatten({sub: held[sub]})
    assert set(_flatten({key: train})).isdisjoint(_flatten({key: held}))
    assert _flatten({key: held})


def test_names_and_values_hold_out_about_a_fifth():
    assert 0.15 < len(POOLS["heldout"]["names"]) / len(NAMES) < 0.25
    for a in ATTRIBUTES:
        assert 0.15 < len(POOLS["heldout"]["values"][a]) / len(VALUES[a]) < 0.25


def test_each_split_swaps_exactly_its_axis():
    for split in SPLITS:
        pools = pools_for(split)
        for key in POOLS["train"]:
            axis = next((ax for ax, keys in tasks.AXES.items() if key in keys), None)
            if split == "pretrain":
                both = _flatten({key: POOLS["train"][key]}) + _flatten({key: POOLS["heldout"][key]})
                assert sorted(_flatten({key: pools[key]})) == sorted(both), key
            else:
                held = split == "all" or split == axis
                assert pools[key] == POOLS["heldout" if held else "train"][key], (split, key)


@pytest.mark.parametrize("task", TASKS)
def test_generated_names_and_values_come_from_the_split_side(task):
    slot_values = lambda split: [(subject, v) for ep in make_episodes(30, 11, task, "medium", split)  # noqa
                                 for _, subject, slot, v in parse_facts(ep) if slot in ATTRIBUTES + ["recall"]]
    for split, name_side, value_side in [("train", "train", "train"), ("names", "heldout", "train"),
                                         ("values", "train", "heldout"), ("all", "heldout", "heldout")]:
        names = set(POOLS[name_side]["names"])
        values = set(_flatten(POOLS[value_side]["values"])) | set(POOLS[value_side]["nouns"])
        for subject, v in slot_values(split):
            assert subject in names, (split, subject)
            assert v in values or v in names, (split, v)  # a two-hop value is a key's name


def test_heldout_question_templates_are_used_only_in_their_split():
    held = set(_flatten(POOLS["heldout"]["questions"]))
    regexes = [tasks._regex(t, p=r"[\w' ]+") for t in held]
    asked = lambda split: [q.q for ep in make_episodes(40, 12, "msqa", "small", split) for q in ep.questions]  # noqa
    assert not any(r.fullmatch(q) for q in asked("train") for r in regexes)
    assert all(any(r.fullmatch(q) for r in regexes) for q in asked("questions"))


def test_unknown_names_raise_one_line_value_errors():
    rng = np.random.default_rng(0)
    for call, valid in [(lambda: make_episode(rng, preset="huge"), PRESETS),
                        (lambda: make_episode(rng, split="test"), SPLITS),
                        (lambda: make_episode(rng, task="qa"), ["msqa", "recall"]),
                        (lambda: make_recall(rng, split="nope"), SPLITS)]:
        with pytest.raises(ValueError) as e:
            call()
        assert "\n" not in str(e.value) and all(v in str(e.value) for v in valid)


# --- associative recall knobs ---

def test_make_recall_overrides():
    rng = np.random.default_rng(13)
    ep = make_recall(rng, n_pairs=20, pairs_per_line=2, lines_per_session=3, mix={"recall": 1.0}, filler_ratio=0)
    keys = {k for _, k, _, _ in parse_facts(ep)}
    assert len(keys) == 20 and len(ep.questions) == 20
    assert {q.family for q in ep.questions} == {"recall"}
    assert all(len(s) <= 3 for s in ep.sessions)
    assert all(len(tasks._PAIR.findall(line)) == 2 for s in ep.sessions for line in s)
    ep = make_recall(rng, n_pairs=10, n_queries=4)
    assert len(ep.questions) == 4 and parse_gold(ep) == [q.a for q in ep.questions]
    with pytest.raises(ValueError):
        make_recall(rng, n_pairs=10_000)


def test_recall_gaps_follow_the_power_law_exponent():
    def mean_gap(alpha):  # lines from each pair to the end of the history, averaged
        gaps = []
        for seed in range(50):
            ep = make_recall(np.random.default_rng(seed), n_pairs=8, filler_ratio=3, gap_alpha=alpha)
            lines = [line for s in ep.sessions for line in s]
            gaps += [len(lines) - i for i, line in enumerate(lines) if tasks._PAIR.search(line)]
        return np.mean(gaps)

    assert mean_gap(2.0) < 0.6 * mean_gap(0.0)  # a steeper law puts the pairs closer to the end


# --- rendering ---

def test_rendering():
    ep = make_episode(np.random.default_rng(14))
    q = ep.questions[0]
    assert render_qa(q) == f"Q: {q.q}\nA: {q.a}\n"
    history = render_history(ep)
    assert history.endswith("\n") and history.count("\n") == sum(len(s) for s in ep.sessions)
    assert history.splitlines() == [line for s in ep.sessions for line in s]
    assert render_document(ep) == history + "".join(f"Q: {x.q}\nA: {x.a}\n" for x in ep.questions)


# --- JSONL ---

def test_jsonl_round_trip(tmp_path):
    eps = make_episodes(5, 15, "msqa", "small", "all") + make_episodes(5, 15, "recall", "small")
    path = tmp_path / "eps.jsonl"
    save_jsonl(path, eps)
    assert load_jsonl(path) == eps
    assert len(path.read_text(encoding="utf-8").splitlines()) == len(eps)


def test_jsonl_keeps_non_ascii_text(tmp_path):
    ep = Episode([["Session 1 (Day 2)", "Mia: Zoë lives in Zürich.", "Léo: Ça va? 你好 🙂"]],
                 [Question("Where does Zoë live?", "Zürich", "single_hop")])
    path = tmp_path / "u.jsonl"
    save_jsonl(path, [ep])
    assert "Zürich" in path.read_text(encoding="utf-8")  # written as text, not \\u escapes
    back = load_jsonl(path)
    assert back == [ep] and parse_gold(back[0]) == ["Zürich"]


GOOD = ('{"sessions": [["Session 1 (Day 1)", "Mia: Alice lives in Paris."]], '
        '"questions": [{"q": "Where does Alice live?", "a": "Paris", "family": "single_hop"}]}')
BAD_LINES = {
    "bad_json": '{"sessions": [[',
    "not_object": '[1, 2]',
    "missing_sessions": '{"questions": [{"q": "x?", "a": "y", "family": "single_hop"}]}',
    "missing_questions": '{"sessions": [["a"]]}',
    "empty_sessions": '{"sessions": [], "questions": [{"q": "x?", "a": "y", "family": "single_hop"}]}',
    "empty_session": '{"sessions": [[]], "questions": [{"q": "x?", "a": "y", "family": "single_hop"}]}',
    "session_not_strings": '{"sessions": [[1]], "questions": [{"q": "x?", "a": "y", "family": "single_hop"}]}',
    "no_questions": '{"sessions": [["a"]], "questions": []}',
    "empty_question": '{"sessions": [["a"]], "questions": [{"q": "", "a": "y", "family": "single_hop"}]}',
    "empty_answer": '{"sessions": [["a"]], "questions": [{"q": "x?", "a": " ", "family": "single_hop"}]}',
    "missing_family": '{"sessions": [["a"]], "questions": [{"q": "x?", "a": "y"}]}',
    "bad_task": '{"sessions": [["a"]], "questions": [{"q": "x?", "a": "y", "family": "single_hop"}], "task": "chess"}',
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_malformed_jsonl_raises_one_line_error_with_location(tmp_path, case):
    path = tmp_path / "bad.jsonl"
    path.write_text(GOOD + "\n" + BAD_LINES[case] + "\n", encoding="utf-8")
    with pytest.raises(TaskFileError) as e:
        load_jsonl(path)
    msg = str(e.value)
    assert "\n" not in msg and f"{path}:2:" in msg and "must" in msg
    assert isinstance(e.value, ValueError)


def test_an_unknown_family_is_refused_naming_the_valid_ones(tmp_path):
    path = _write(tmp_path / "typo.jsonl", GOOD + "\n" + GOOD.replace('"single_hop"', '"singlehop"') + "\n")
    with pytest.raises(TaskFileError) as e:
        load_jsonl(path)
    msg = str(e.value)
    assert f"{path}:2: question 0: family 'singlehop' is unknown" in msg
    assert "single_hop, multi_hop, update, temporal, abstention, recall, forgetting, two_hop" in msg


def test_malformed_files_raise_task_file_error(tmp_path):
    cases = {"missing.jsonl": None, "latin1.jsonl": (GOOD + "\n").encode() + b'{"sessions": "caf\xe9"}\n',
             "empty.jsonl": b"\n\n"}
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(TaskFileError) as e:
            load_jsonl(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value)
    with pytest.raises(TaskFileError, match=":2: not valid UTF-8"):
        load_jsonl(tmp_path / "latin1.jsonl")
    assert load_jsonl(_write(tmp_path / "ok.jsonl", GOOD + "\n\n"))[0].questions[0].a == "Paris"  # blank lines ok


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_overwrites_put_every_reassignment_in_a_later_session_and_the_latest_wins(enc):
    for seed in range(30):
        ep = tasks.make_overwrites(np.random.default_rng(seed), n_pairs=int(2 + seed % 7))
        assert tasks.parse_gold(ep) == [q.a for q in ep.questions]      # the parser re-derives every answer
        said = {}                                                        # key -> [(session, value)] in order
        for s, key, _, value in tasks.parse_facts(ep):
            said.setdefault(key, []).append((s, value))
        sessions = [s for s, _ in (x for v in said.values() for x in v)]
        windows = tasks.encode_history(enc, ep, 256)
        assert len(windows) == len(ep.sessions) == max(sessions)          # one window per session
        assert ep.questions
        for q in ep.questions:
            chain = said[q.q.rstrip("?")]
            assert [s for s, _ in chain] == list(range(1, len(chain) + 1))  # each new value one session later
            assert len(chain) >= 2 and q.a == chain[-1][1] and q.stale == [v for _, v in chain[:-1]]
            assert q.family == "forgetting" and q.a not in q.stale


@pytest.mark.parametrize("n", tasks.SHARED_N)
def test_shared_episodes_give_every_person_one_attribute(n):
    for seed in range(10):
        ep, log = tasks.make_shared(np.random.default_rng(seed), n, return_log=True)
        facts = tasks.parse_facts(ep)
        assert len(facts) == n and len({f[1] for f in facts}) == n       # n people, one fact each
        assert len({f[2] for f in facts}) == 1                           # all of one attribute
        assert tasks.parse_gold(ep) == [q.a for q in ep.questions]       # the parser re-derives every answer
        asked = sorted(q.a for q in ep.questions if q.family == "single_hop")
        assert asked == sorted(f[3] for f in facts)                      # every person asked once
        assert [q.a for q in ep.questions if q.family == "abstention"] == [tasks.UNKNOWN]  # and one absent person


def test_msqa_attrs_makes_people_share_attributes():
    for seed in range(10):
        ep = tasks.make_msqa(np.random.default_rng(seed), "small", "train", dense=True, attrs=2)
        facts = [f for f in tasks.parse_facts(ep) if f[2] in tasks.ATTRIBUTES]
        assert len({f[2] for f in facts}) <= 2
        assert tasks.parse_gold(ep) == [q.a for q in ep.questions]


def test_msqa_absent_asks_a_person_never_mentioned_about_a_stated_attribute():
    pools = tasks.pools_for("train")
    for seed in range(10):
        ep = tasks.make_msqa(np.random.default_rng(seed), "small", "train", dense=True, attrs=2, absent=2)
        facts = [f for f in tasks.parse_facts(ep) if f[2] in tasks.ATTRIBUTES]
        said = " ".join(line for session in ep.sessions for line in session)
        stated = {f[2] for f in facts}
        strangers = []                                                   # questions about a never-said name
        for q in ep.questions:
            names = [n for n in pools["names"] if re.search(rf"\b{n}\b", q.q)]
            if names and not any(re.search(rf"\b{n}\b", said) for n in names):
                strangers.append(q)
        current = pools["questions"]["current"]
        about_stated = [q for q in strangers for n in pools["names"] for a in stated
                        if any(t.format(p=n) == q.q for t in current[a])]
        assert len(about_stated) >= 2                                    # the two extra ones at least
        assert all(q.a == tasks.UNKNOWN and q.family == "abstention" for q in strangers)
        assert tasks.parse_gold(ep) == [q.a for q in ep.questions]       # the parser re-derives them
    # the history is drawn before the questions: absent changes the questions only
    a = tasks.make_msqa(np.random.default_rng(5), "small", "train", dense=True, attrs=2)
    b = tasks.make_msqa(np.random.default_rng(5), "small", "train", dense=True, attrs=2, absent=2)
    assert a.sessions == b.sessions and len(b.questions) >= len(a.questions) + 1


def test_novel_values_are_made_up_distinct_and_never_a_pool_word():
    pool_words = {w.lower() for w in NAMES + NOUNS + tasks.RELATIONS + [tasks.UNKNOWN]}
    pool_words |= {w.lower() for ws in VALUES.values() for w in ws}
    rng = np.random.default_rng(0)
    for _ in range(50):
        v = tasks.novel_values(rng)
        words = [w for ws in v.values() for w in ws]
        assert set(v) == set(ATTRIBUTES) and len(words) == len(set(words)) == 12 * len(ATTRIBUTES)
        assert not {w.lower() for w in words} & pool_words
        assert all(re.fullmatch(r"[a-z]{4,12}", w.lower()) for w in words)
        assert all(w[0].isupper() for w in v["city"]) and all(w.islower() for w in v["job"])


@pytest.mark.parametrize("values", ["novel", "nouns"])
def test_msqa_with_other_values_states_only_them_and_the_parser_rederives_every_answer(values):
    for seed in range(20):
        rng = np.random.default_rng(seed)
        pool = tasks.novel_values(rng) if values == "novel" else tasks.noun_values()
        ep = tasks.make_msqa(rng, "small", "train", dense=True, attrs=2, absent=1, values=pool)
        said = {f[3] for f in tasks.parse_facts(ep) if f[2] in ATTRIBUTES}
        assert said and all(v in pool[a] for _, _, a, v in
                            [f for f in tasks.parse_facts(ep) if f[2] in ATTRIBUTES])
        assert tasks.parse_gold(ep) == [q.a for q in ep.questions]
        answers = {q.a for q in ep.questions} - {tasks.UNKNOWN} - {str(i) for i in range(1, 10)}
        assert answers <= said


def test_noun_values_are_train_side_nouns_never_an_msqa_value():
    nv = tasks.noun_values()
    words = [w for ws in nv.values() for w in ws]
    assert len(words) == len(set(words)) and set(words) <= set(POOLS["train"]["nouns"])
    assert not set(words) & {w for ws in VALUES.values() for w in ws}
    assert min(len(ws) for ws in nv.values()) >= 4                       # room for a chain of distinct values


def test_shared_episodes_with_other_values_still_share_one_attribute_and_parse():
    for seed in range(10):
        rng = np.random.default_rng(seed)
        ep = tasks.make_shared(rng, 4, "train", values=tasks.noun_values())
        facts = [f for f in parse_facts(ep) if f[2] in ATTRIBUTES]
        assert len({f[2] for f in facts}) == 1 and all(f[3] in tasks.noun_values()[f[2]] for f in facts)
        assert parse_gold(ep) == [q.a for q in ep.questions]
    a = tasks.make_shared(np.random.default_rng(3), 4, "train")          # values=None: the split's own pools
    b = tasks.make_shared(np.random.default_rng(3), 4, "train", values=None)
    assert a == b

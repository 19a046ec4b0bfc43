"""train_memory.py: each condition reads exactly the context it claims; budgets and the results schema."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_memory as TM
from data import tasks
from nanodeltamem import GPT, GPTConfig, DeltaMemGPT
from train_backbone import load_memory, save_memory


def test_every_condition_gets_exactly_its_read_context(enc, gpt):
    cfg = dict(TM.DEFAULTS, eval_read_window=40)
    dm = DeltaMemGPT(gpt, TM.memory_config(cfg))
    conds = TM.conditions(cfg, enc, gpt, {"deltamem": dm})
    ep = tasks.make_episodes(1, seed=11, preset="small")[0]
    q = ep.questions[0]
    hist = enc.encode_ordinary(tasks.render_history(ep))
    assert conds["no_history"][0](ep, q) == [] and conds["deltamem"][0](ep, q) == []
    assert conds["full_context"][0](ep, q) == hist and conds["deltamem_full_context"][0](ep, q) == hist
    assert conds["recent_window"][0](ep, q) == hist[-40:] == conds["deltamem_w40"][0](ep, q)
    retrieved = enc.decode(conds["retrieval"][0](ep, q))
    lines = [l for s in ep.sessions for l in s]
    chosen = retrieved.splitlines()
    assert len(enc.encode_ordinary(retrieved)) <= 40
    assert all(c in lines for c in chosen)                               # whole history lines only
    assert [lines.index(c) for c in chosen] == sorted(lines.index(c) for c in chosen)  # original order
    qw = TM.words(q.q)
    assert all(TM.words(c) & qw for c in chosen)                         # each shares a word with the question
    assert conds["deltamem"][1] is dm and conds["no_history"][1] is None


@pytest.mark.parametrize("over", [dict(), dict(key_dim=4, name_dim=0, rank=2), dict(heads=4, rank=4), dict(sides="q"),
                                  dict(gates="scalar")])
def test_lora_budget_matches_deltamem_within_10_percent(gpt, over):
    cfg = dict(TM.DEFAULTS, **over)
    dm = TM.build("deltamem", gpt, cfg)
    lora = TM.build("lora", gpt, cfg)
    a, b = dm.param_counts()[0], lora.param_counts()[0]
    assert abs(a - b) / a <= 0.10, (a, b)


def test_results_follow_the_design_schema(tmp_path):
    fam = {"single_hop": 0.5, "abstention": 1.0}
    res = {n: dict(fact_em=m, macro_em=m, per_family=fam, history_tokens_in_context=h, trainable_params=p,
                   stale_rate=None, abstention=1.0, unknown_on_facts=0.0)
           for n, m, h, p in [("no_history", 0.2, 0, 0), ("full_context", 0.6, 190, 0), ("lora", 0.25, 0, 100),
                              ("hebbian", 0.3, 0, 100), ("deltamem", 0.45, 0, 100), ("deltamem_w64", 0.5, 64, 100),
                              ("recent_window", 0.3, 64, 0)]}
    cfg = dict(TM.DEFAULTS, out_dir=str(tmp_path))
    TM.write_results(cfg, res, {"iid": {n: r["macro_em"] for n, r in res.items()}},
                     dict(backbone=2.0, with_memory=2.01), "deltamem")
    out = json.loads((tmp_path / "results.json").read_text())
    for name, r in out["conditions"].items():
        assert isinstance(r["fact_em"], float) and isinstance(r["macro_em"], float) and isinstance(r["per_family"], dict)
        assert isinstance(r["history_tokens_in_context"], (int, float)) and isinstance(r["trainable_params"], int)
    assert set(out["general_val_loss"]) == {"backbone", "with_memory"}
    assert out["ratios"]["vs_frozen_backbone"] == pytest.approx(0.45 / 0.2)
    assert out["ratios"]["vs_best_non_deltamem"] == pytest.approx(0.45 / 0.3)   # hebbian, at 0 tokens
    assert out["ratios"]["vs_best_non_deltamem_at_64"] == pytest.approx(0.5 / 0.3)
    assert "deltamem" in (tmp_path / "results.md").read_text() and "ci90" not in out["ratios"]
    right = lambda n: [i % n == 0 for i in range(12)]                   # 12 questions of 4 episodes
    outcomes = dict(episode=[i // 3 for i in range(12)], family=["single_hop", "abstention", "update"] * 4,
                    correct={"no_history": right(3), "lora": right(2), "hebbian": right(2), "deltamem": right(1),
                             "deltamem_w64": right(1), "recent_window": right(3), "full_context": right(1)})
    TM.write_results(cfg, res, {"iid": {n: r["macro_em"] for n, r in res.items()}}, None, "deltamem",
                     outcomes=outcomes)
    ci = json.loads((tmp_path / "results.json").read_text())["ratios"]["ci90"]
    assert len(ci["vs_frozen_backbone"]) == 2 and ci["vs_best_non_deltamem"][0] <= ci["vs_best_non_deltamem"][1]
    assert ci["vs_best_non_deltamem_at_64"] is not None                 # deltamem_w64 / recent_window too
    assert "90% bootstrap interval" in (tmp_path / "results.md").read_text()


def test_resampled_fact_em_equals_scoring_the_drawn_episodes_one_by_one():
    rng = np.random.default_rng(0)
    family = ["a", "a", "b", "abstention", "b", "a", "c", "c"]          # 8 questions of 4 episodes
    episode = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    correct = rng.random(8) < 0.5
    draws = [[0, 0, 1, 3], [2, 2, 2, 2], [1, 3, 0, 2]]                  # three resamples of 4 episodes
    counts = np.array([[d.count(e) for e in episode] for d in draws])   # (3, 8) a question's weight
    want = []
    for d in draws:                                                      # the reference: build the resample
        qs = [i for e in d for i in np.flatnonzero(episode == e)]       # and score it like the evaluation
        per = TM.score(["y" if correct[i] else "n" for i in qs], ["y"] * len(qs), [family[i] for i in qs])
        want.append(np.mean([v for f, v in per.items() if f not in ("macro", "abstention")]))
    assert TM.resampled_fact_em(correct, family, counts) == pytest.approx(want)


def test_ratio_intervals_bracket_the_ratio_and_collapse_for_equal_conditions():
    rng = np.random.default_rng(1)
    Q, E = 600, 100
    episode = np.repeat(np.arange(E), Q // E)
    family = [["single_hop", "update", "abstention"][i % 3] for i in range(Q)]
    correct = dict(deltamem=rng.random(Q) < 0.45, no_history=rng.random(Q) < 0.15, lora=rng.random(Q) < 0.3)
    correct["hebbian"] = correct["lora"].copy()
    out = dict(episode=episode, family=family, correct=correct)
    ci = TM.ratio_intervals(out, dict(vs_frozen_backbone=("deltamem", ["no_history"]),
                                      vs_best_non_deltamem=("deltamem", ["hebbian", "lora", "no_history"])))
    macro = lambda c: TM.fact_em({f: v for f, v in TM.score(["y" if x else "n" for x in correct[c]], ["y"] * Q,
                                                             family).items() if f != "macro"})
    lo, hi = ci["vs_best_non_deltamem"]
    assert lo < macro("deltamem") / macro("lora") < hi and hi - lo < 0.8
    lo, hi = ci["vs_frozen_backbone"]
    assert lo < macro("deltamem") / macro("no_history") < hi
    same = TM.ratio_intervals(dict(out, correct=dict(correct, deltamem=correct["lora"])),
                              dict(vs_best_non_deltamem=("deltamem", ["lora", "no_history"])))
    assert same["vs_best_non_deltamem"] == [1.0, 1.0]                    # δ-mem = the best baseline in every resample


def test_overwrite_ratios_count_only_the_updates_across_sessions():
    """δ-mem / hebbian on EM and on the stale rate, over the questions marked `updated` alone."""
    episode = np.repeat(np.arange(6), 2)                                 # 6 episodes x 2 questions
    updated = np.array([1, 0] * 6, dtype=bool)                           # the first question of each is one
    dm = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 1, 0], dtype=bool)      # on the updates: 4 of 6 right
    hb = np.array([1, 1, 0, 1, 0, 1, 0, 1, 1, 1, 0, 1], dtype=bool)      # 2 of 6 (and every other question)
    dm_stale = np.array([0, 1, 0, 1, 0, 1, 1, 1, 0, 1, 0, 1], dtype=bool)  # 1 of 6 on the updates
    hb_stale = np.array([0, 0, 1, 0, 1, 0, 1, 0, 0, 0, 1, 0], dtype=bool)  # 4 of 6
    out = dict(episode=episode, family=["update"] * 12, updated=updated,
               correct=dict(deltamem=dm, hebbian=hb), stale=dict(deltamem=dm_stale, hebbian=hb_stale))
    r = TM.overwrite_ratios(out, "deltamem")
    assert r["updates_vs_hebbian"] == pytest.approx(4 / 2) and r["stale_vs_hebbian"] == pytest.approx(1 / 4)
    lo, hi = r["ci90_overwrites"]["updates_vs_hebbian"] or (None, None)
    assert lo is None or lo <= 2 <= hi                                   # None: hebbian scored 0 in a resample
    assert TM.overwrite_ratios(dict(out, updated=~updated), "deltamem")["updates_vs_hebbian"] == pytest.approx(1 / 6)
    assert TM.overwrite_ratios(dict(out, updated=np.zeros(12, bool)), "deltamem") == {}  # no such question
    assert TM.overwrite_ratios(dict(out, correct=dict(deltamem=dm)), "deltamem") == {}   # no hebbian memory


def test_score_condition_scores_the_updates_across_sessions_apart():
    """updated_em / updated_stale: only the updates whose older value sits in an earlier session."""
    ep = tasks.Episode(sessions=[["Session 1 (Day 2)", "Mia: Alice lives in Lisbon.", "Mia: Bob lives in Paris."],
                                 ["Session 2 (Day 5)", "Mia: Alice moved again, this time to Oslo.",
                                  "Mia: Bob moved again, this time to Rome.",
                                  "Mia: Bob left town and now lives in Cairo."],
                                 ["Session 3 (Day 9)", "Mia: Carol lives in Lima.", "Mia: Carol moved again, this "
                                  "time to Quito."]],
                       questions=[tasks.Question("Where does Alice live now?", "Oslo", "update", stale=["Lisbon"]),
                                  tasks.Question("Where does Bob live now?", "Cairo", "update", stale=["Paris", "Rome"]),
                                  tasks.Question("Where does Carol live now?", "Quito", "update", stale=["Lima"])])
    assert [tasks.overwritten_later(ep, q) for q in ep.questions] == [True, False, False]
    r = TM.score_condition(["Lisbon", "Cairo", "Quito"], [ep])          # the one counted: a stale answer
    assert (r["n_updated"], r["updated_em"], r["updated_stale"]) == (1, 0.0, 1.0)
    r = TM.score_condition(["Oslo", "Rome", "Lima"], [ep])
    assert (r["n_updated"], r["updated_em"], r["updated_stale"]) == (1, 1.0, 0.0)
    assert r["stale_rate"] == pytest.approx(2 / 3)                       # over every question with an older value


@pytest.mark.parametrize("share,want", [(1.0, [64] * 8), (0.0, [0] * 8), (0.5, [0, 64] * 4),
                                        (0.25, [0, 0, 0, 64] * 2)])
def test_read_window_share_spreads_the_window_over_the_steps(share, want):
    cfg = dict(TM.DEFAULTS, read_window=64, read_window_share=share)
    assert [TM.read_window_at(it, cfg) for it in range(8)] == want
    assert TM.read_window_at(0, dict(cfg, read_window=0)) == 0


@pytest.mark.slow
def test_compiled_training_saves_unwrapped_memory_checkpoint(enc, gpt, tmp_path, fake_compile):
    from train_backbone import load_checkpoint
    cfg = dict(TM.DEFAULTS, out_dir=str(tmp_path), max_iters=2, batch_size=2, log_interval=2, val_episodes=2,
               warmup_iters=1, compile=True, general_reg=0, aux_share=1.0)
    model = TM.train_one("deltamem", "deltamem", gpt, enc, cfg, "cpu")
    assert fake_compile["wrapped"] == [model] and fake_compile["calls"] == 2 * 3  # write, read, context per step
    wrapper_keys = fake_compile["real_keys"](model)
    assert wrapper_keys == list(torch.compile(model).state_dict())      # the stand-in prefixes like the real one
    assert all(k.startswith("_orig_mod.") for k in wrapper_keys)
    saved = load_checkpoint(tmp_path / "memory_deltamem.pt")["memory"]
    assert not any("_orig_mod" in k for k in saved)
    assert saved.keys() == model.memories.state_dict().keys()
    loaded, _ = load_memory(tmp_path / "memory_deltamem.pt", gpt)
    for (n, a), (_, b) in zip(model.memories.state_dict().items(), loaded.memories.state_dict().items()):
        assert torch.equal(a, b), n                                      # the trained weights came back


def test_general_text_term_is_the_lm_loss_read_with_the_written_state(enc, gpt):
    """episode_loss(general=...) = the plain episode loss + general_reg x LM loss of the general rows,
    read with the states this batch wrote (so the memory learns to stay quiet on ordinary text)."""
    cfg = dict(TM.DEFAULTS, general_reg=0.7)
    torch.manual_seed(1)
    dm = DeltaMemGPT(gpt, TM.memory_config(cfg))
    for p in dm.memories.parameters():                                  # a memory that actually corrects
        torch.nn.init.normal_(p, std=0.3)
    eps = tasks.make_episodes(3, seed=5, preset="tiny")
    batch = tasks.collate_episodes(enc, eps, 64, enc.eot_token)
    gx = torch.randint(0, 256, (3, 1, 20))
    gy = torch.randint(0, 256, (3, 1, 20))
    plain = TM.episode_loss(dm, batch, cfg, "cpu")
    states = dm.memory_state()
    with_general = TM.episode_loss(dm, batch, cfg, "cpu", general=(gx, gy))
    dm.set_memory_state(states)
    lm = dm(gx, gy)[1]
    assert abs(with_general.item() - (plain.item() + 0.7 * lm.item())) < 1e-5
    dm.reset_memory()
    assert abs(dm(gx, gy)[1].item() - gpt(gx[:, 0], gy[:, 0])[1].item()) < 1e-5  # fresh memory: backbone's
    assert abs(lm.item() - gpt(gx[:, 0], gy[:, 0])[1].item()) > 1e-3    # the written state does change it


DEMO_TEXT = """Session 1 (Day 3)
Alice: I moved to Paris.
Bob: nice.

Carol: my cat is Tom.
Session 2 (Day 9)
Alice: now I live in Rome.
---
Q: where does Alice live?

what is Carol's cat called?
"""


def test_demo_sessions_parser_splits_sessions_and_questions():
    ep, qs = TM.parse_sessions(DEMO_TEXT, "x.txt")
    assert ep.sessions == [["Session 1 (Day 3)", "Alice: I moved to Paris.", "Bob: nice."],
                           ["Carol: my cat is Tom."],
                           ["Session 2 (Day 9)", "Alice: now I live in Rome."]]
    assert ep.questions == []
    assert qs == ["where does Alice live?", "what is Carol's cat called?"]
    ep2, qs2 = TM.parse_sessions("a\n\n\nb\n", "y.txt")                  # no --- : questions come from stdin
    assert ep2.sessions == [["a"], ["b"]] and qs2 is None


@pytest.mark.slow
def test_demo_answers_match_the_evaluation_path(enc, gpt):
    """The demo's three answers are the ones run_condition gives (the evaluation path); a memory with
    zero corrections answers as the bare backbone, one with large B_o does not."""
    ep, qs = TM.parse_sessions(DEMO_TEXT, "x.txt")
    questions = qs + ["who moved?", "which day?", "Bob said?", "Tom is?"]
    ev = tasks.Episode(ep.sessions, [tasks.Question(q, "", "demo") for q in questions])
    torch.manual_seed(3)
    zero = DeltaMemGPT(gpt, TM.memory_config(dict(TM.DEFAULTS, init="zero")))
    loud = DeltaMemGPT(gpt, TM.memory_config(TM.DEFAULTS))
    for mem in loud.memories.values():
        torch.nn.init.normal_(mem.B_o.weight, std=2.0)
    answers = {}
    for name, model in (("zero", zero), ("loud", loud)):
        states = TM.demo_states(model, enc, ep, "cpu")
        answers[name] = TM.demo_answers(enc, gpt, model, states, ep, questions, "cpu", new_tokens=6)
    full = lambda e, q: enc.encode_ordinary(tasks.render_history(e))
    none = lambda e, q: []
    assert [a[0] for a in answers["loud"]] == TM.run_condition(enc, [ev], none, gpt=gpt)[0]
    assert [a[1] for a in answers["loud"]] == TM.run_condition(enc, [ev], none, model=loud)[0]
    assert [a[2] for a in answers["loud"]] == TM.run_condition(enc, [ev], full, gpt=gpt)[0]
    assert [a[1] for a in answers["zero"]] == [a[0] for a in answers["zero"]]    # B = 0: no correction
    assert [a[1] for a in answers["loud"]] != [a[0] for a in answers["loud"]]    # the written state is read


def test_demo_bad_inputs_are_one_line_errors(enc, gpt, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n---\nwhat?\n")
    cfg = dict(TM.DEFAULTS, out_dir=str(tmp_path))
    for demo, words in ((str(empty), "empty.txt has no chat lines"), (str(tmp_path / "nope.txt"), "nope.txt")):
        with pytest.raises(TM.UserError, match=words) as e:
            TM.demo_inputs(dict(cfg, demo=demo))
        assert "\n" not in str(e.value)
    ok = tmp_path / "ok.txt"
    ok.write_text(DEMO_TEXT)
    with pytest.raises(TM.UserError, match=r"memory_deltamem.pt not found: train one with `python train_memory.py`"):
        TM.demo_inputs(dict(cfg, demo=str(ok)))
    other = GPT(GPTConfig(vocab_size=257, block_size=64, n_layer=3, n_head=2, n_embd=32))
    save_memory(DeltaMemGPT(other, TM.memory_config(TM.DEFAULTS)), str(tmp_path / "memory_deltamem.pt"))
    ep, qs, path = TM.demo_inputs(dict(cfg, demo=str(ok)))
    with pytest.raises(TM.UserError, match="was trained on backbone") as e:   # a memory for another backbone
        TM.demo(enc, gpt, "cpu", ep, qs, path)
    assert "\n" not in str(e.value)


def test_condition_names_say_the_variant():
    import train_memory as TM
    name = lambda **kw: TM.condition_name({**TM.DEFAULTS, **kw})
    assert name() == "deltamem" and name(write="segment") == "deltamem_ssw" and name(heads=4) == "deltamem_msw4"
    assert name(sides="o") == "deltamem_o" and name(update="hebbian") == "hebbian"
    assert name(update="deltanet") == "deltamem_deltanet" and name(write="segment", update="deltanet") == "deltamem_ssw_deltanet"


def test_every_preset_finds_its_backbone_where_train_backbone_writes_it():
    from dev import ablate
    import train_backbone as TB
    assert set(TM.PRESETS) == set(TB.PRESETS) == set(ablate.PRESETS)
    for name in TM.PRESETS:
        mem = TB.parse_config([f"--preset={name}"], TM.DEFAULTS, TM.PRESETS)
        bb = TB.parse_config([f"--preset={name}"], TB.DEFAULTS, TB.PRESETS)
        assert TM.backbone_path(mem) == f"{bb['out_dir']}/backbone.pt"
        sweep = TB.parse_config([f"--preset={name}"], ablate.DEFAULTS, ablate.PRESETS)
        assert sweep["backbone"] == TM.backbone_path(mem)                  # the sweeps read the main job's backbone
        moved = TB.parse_config([f"--preset={name}", "--out_dir=elsewhere"], TM.DEFAULTS, TM.PRESETS)
        assert TM.backbone_path(moved) == "elsewhere/backbone.pt"           # the backbone follows --out_dir
    long = TB.parse_config(["--preset=cpu_long"], TM.DEFAULTS, TM.PRESETS)
    assert TM.condition_name(long) == "deltamem_deltanet" and TM.memory_config(long).key_conv == 4


@pytest.mark.slow
def test_a_memory_starts_from_the_same_init_whatever_ran_before(enc, gpt, tmp_path):
    """The main job trains the backbone in the same process when it is missing: a memory trained then
    must equal one trained on the loaded backbone (and a baseline must not depend on the memory before it)."""
    cfg = dict(TM.DEFAULTS, max_iters=1, batch_size=2, log_interval=1, val_episodes=1, warmup_iters=1, general_reg=0)
    trained = []
    for run, draws in enumerate((0, 1000)):
        torch.manual_seed(0)
        torch.rand(draws)                                                # e.g. a backbone's training before
        out = tmp_path / str(run)
        out.mkdir()
        model = TM.train_one("deltamem", "deltamem", gpt, enc, dict(cfg, out_dir=str(out)), "cpu")
        trained.append(model.memories.state_dict())
    for name, value in trained[0].items():
        assert torch.equal(value, trained[1][name]), name


def test_fact_em_leaves_out_abstention_and_counts_unknown_on_a_fact_as_wrong():
    qs = [tasks.Question("Where does Ann live?", "Oslo", "single_hop"),
          tasks.Question("What is Ann's job?", "baker", "update", stale=["chef"]),
          tasks.Question("What is Bo's pet?", "unknown", "abstention"),
          tasks.Question("What is Cy's pet?", "unknown", "abstention")]
    ep = tasks.Episode([["Session 1 (Day 1)"]], qs)
    always_unknown = TM.score_condition(["unknown"] * 4, [ep])
    assert always_unknown["fact_em"] == 0.0 and always_unknown["abstention"] == 1.0
    assert always_unknown["macro_em"] == pytest.approx(1 / 3)            # the old headline rewarded it
    assert always_unknown["unknown_on_facts"] == 1.0
    r = TM.score_condition([" Oslo", "chef", "unknown", "Lima"], [ep])   # one fact right, one stale
    assert r["fact_em"] == 0.5 and r["abstention"] == 0.5 and r["unknown_on_facts"] == 0.0
    assert r["stale_rate"] == 1.0


def test_diagnostics_on_hand_built_keys_and_decays():
    keys = torch.eye(4)[None]                                            # (1, 4, 4): four orthogonal keys
    slots = torch.arange(4)                                              # about four different slots
    assert TM.read_margin(keys[0, 2][None], keys, slots, 2).item() == pytest.approx(1.0)   # asks fact 2 with its key
    assert TM.read_margin(keys[0, 1][None], keys, slots, 2).item() == pytest.approx(-1.0)  # finds another first
    assert TM.key_separation(keys, slots).item() == pytest.approx(0.0)
    assert TM.key_separation(torch.ones(1, 3, 4) / 2, torch.arange(3)).item() == pytest.approx(1.0)  # collapsed
    restated = torch.tensor([0, 1, 2, 2])                                # facts 2 and 3: one slot, updated
    same = torch.cat([torch.eye(4)[:3], torch.eye(4)[2:3]])[None]         # an update under the same key
    assert TM.key_separation(same, restated).item() == pytest.approx(0.0)     # is no collision
    assert TM.read_margin(same[0, 3][None], same, restated, 3).item() == pytest.approx(1.0)  # nor a rival
    assert TM.read_margin(keys[0, 0][None], keys, slots, 0, kinds=torch.arange(4)) is None  # no same-kind rival
    keep = torch.full((1, 6, 1), 0.5)                                    # (H, T, 1) every token keeps half
    real = torch.tensor([True] * 5 + [False])                            # the last token is padding
    got = TM.retention(keep, real, torch.tensor([0, 3, 4]))
    assert got.tolist() == pytest.approx([0.5 ** 4, 0.5, 1.0])           # tokens after 0: 1..4; padding keeps all
    gone = TM.retention(torch.zeros(1, 6, 1), torch.ones(6, dtype=torch.bool), torch.tensor([0, 2]))
    assert gone.tolist() == pytest.approx([0.0, 0.0])                    # a state that decayed fully


def test_fact_sites_point_at_the_asked_value_token(enc):
    ep = tasks.make_msqa(np.random.default_rng(3), "small", "train", dense=True)
    sites, slots, asked, kinds, whose = TM.fact_sites(enc, ep, 256)
    windows = tasks.encode_history(enc, ep, 256)
    facts = tasks.parse_facts(ep)
    assert len(sites) == len(facts)
    for (w, o, n), (_, _, _, value) in zip(sites, facts):               # each site starts its value's word,
        assert enc.decode(windows[w][0][o:o + 40]).startswith(" " + value)   # n tokens long
        assert enc.decode(windows[w][0][o:o + n]) == " " + value
    for i, j in [(i, j) for i in range(len(facts)) for j in range(len(facts))]:  # one slot id per (subject, slot)
        assert (slots[i] == slots[j]) == (facts[i][1:3] == facts[j][1:3])
    for i, j in [(i, j) for i in range(len(facts)) for j in range(len(facts))]:  # one kind id per attribute
        assert (kinds[i] == kinds[j]) == (facts[i][2] == facts[j][2])
    for q, a in zip(ep.questions, asked):
        assert (a is None) == (q.family == "abstention" or q.a not in [f[3] for f in facts])
        if a is not None:
            assert facts[a][3] == q.a


def test_binding_sites_second_tokens_read_the_values_second_token(enc):
    """bind_tokens = 2: a row (question, read position, fact, j) reads where the answer's j-th token is the
    target, and the fact's write site j tokens on holds that same token; j = 1 only for values of 2+ tokens."""
    eps = [tasks.make_shared(np.random.default_rng(s), 4, "train") for s in range(3)]
    batch = tasks.collate_episodes(enc, eps, 256, enc.eot_token)
    hist, qy, Lq = batch["hist"].flatten(1), batch["qy"].flatten(1), batch["qy"].size(-1)  # (B, W·L), (B, Q·Lq)
    seen = set()
    for b, (pos, _, rows, _, _, _) in enumerate(TM.binding_sites(enc, eps, batch, 256, tokens=2)):
        n = [s[2] for s in TM.fact_sites(enc, eps[b], 256)[0]]
        assert {(q, a) for q, _, a, j in rows if j == 1} == {(q, a) for q, _, a, j in rows if j == 0 and n[a] > 1}
        for q, p, a, j in rows:
            assert p // Lq == q and qy[b, p] == hist[b, pos[a] + j]        # the answer's j-th token, written there
            assert enc.decode(qy[b, p - j:p + 1].tolist()) == enc.decode(hist[b, pos[a]:pos[a] + j + 1].tolist())
            seen.add(j)
    assert seen == {0, 1}


def test_dense_msqa_asks_every_stated_fact_and_its_gold_is_rederived():
    for seed in range(20):
        ep = tasks.make_msqa(np.random.default_rng(seed), "small", "train", dense=True)
        assert tasks.parse_gold(ep) == [q.a for q in ep.questions]
        latest = {}
        for _, p, slot, v in tasks.parse_facts(ep):
            if slot in tasks.ATTRIBUTES:
                latest[(p, slot)] = v
        current = {q.a for q in ep.questions if q.family in ("single_hop", "update")}
        assert set(latest.values()) <= current                           # every fact's latest value is asked
        share = np.mean([q.family == "abstention" for q in ep.questions])
        assert 0.1 <= share <= 0.4                                       # and `unknown` stays in the mix


def test_shuffled_state_margin_is_flat_for_a_fresh_memory_and_not_for_one_that_binds(enc, gpt):
    cfg = dict(TM.DEFAULTS, state_margin=1.0, beta_reg=0.0, general_reg=0.0, bind_reg=0.0)
    eps = [tasks.make_recall(np.random.default_rng(i), "tiny", "train", n_pairs=1) for i in range(4)]
    batch = tasks.collate_episodes(enc, eps, gpt.config.block_size, enc.eot_token)
    model = TM.build("deltamem", gpt, dict(cfg, init="zero"))
    plain = TM.episode_loss(model, batch, dict(cfg, state_margin=0.0), "cpu")
    with_margin = TM.episode_loss(model, batch, cfg, "cpu")
    assert with_margin.item() == pytest.approx(plain.item() + torch.nn.functional.softplus(torch.tensor(1.0)).item())
    with torch.no_grad():                                                # corrections that read the state
        for mem in model.memories.values():
            mem.B_o.weight.normal_(0, 1.0)
    plain = TM.episode_loss(model, batch, dict(cfg, state_margin=0.0), "cpu")
    assert TM.episode_loss(model, batch, cfg, "cpu").item() != pytest.approx(
        plain.item() + torch.nn.functional.softplus(torch.tensor(1.0)).item())


def test_context_rows_are_the_episodes_own_document_shifted_by_one(enc):
    eps = [tasks.make_msqa(np.random.default_rng(i), "small", "train", dense=True) for i in range(3)]
    x, y = TM.context_rows(enc, eps, 64, enc.eot_token)                  # (3, 1, 64): the last 65 tokens
    for i, ep in enumerate(eps):
        doc = enc.encode_ordinary(tasks.render_history(ep) + "".join(tasks.render_qa(q) for q in ep.questions[:2]))
        assert x[i, 0].tolist() == doc[-65:-1] and y[i, 0].tolist() == doc[-64:]


def keys_by_hand():
    """A model whose one memory's write keys and read queries are its layer inputs themselves."""
    class Mem(torch.nn.Module):
        def key_parts(self, x, n_windows, e=None):
            return x, None
        def query_parts(self, x, n_windows=1, e=None):
            return x, None
        def unit(self, a, c=None):
            return a[:, None]                                            # (B, H=1, T, d_k)
    model = torch.nn.Module()
    model.memories = torch.nn.ModuleDict({"0": Mem()})
    return model


def test_binding_term_leaves_the_asked_slots_older_statements_out():
    """One question about slot 1, stated twice (facts 1 and 2): with keys of facts 1 and 2 equal, the
    query equal to them gets the loss of a 2-way softmax against fact 0 only, not a 3-way one."""
    model = keys_by_hand()
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])               # (F, d_k)
    writes = {"0": (k[None], None)}                                      # (B=1, T=3, d_k): facts at tokens 0..2
    reads = {"0": (torch.tensor([[[0.0, 1.0]]]), None)}                  # the query at read position 0
    sites = [(torch.arange(3), torch.tensor([0, 1, 1]), [(0, 0, 2, 0)], torch.zeros(3), torch.zeros(3), [])]  # asks fact 2,
    got = TM.binding_loss(model, writes, reads, sites, 1, 1, tau=0.5).item()                  # the latest of slot 1
    assert got == pytest.approx(float(-torch.log_softmax(torch.tensor([0.0, 2.0]), 0)[1]))


def whom_by_hand():
    """A model whose one memory's keys and queries are the first two input channels (the what part, unit)
    and whose whom parts are tanh of the rest (unit): x = (what, what, whom, whom)."""
    class Mem(torch.nn.Module):
        W_c = True
        def key_parts(self, x, n_windows, e=None):
            return x[..., :2], None
        def query_parts(self, x, n_windows=1, e=None):
            return x[..., :2], None
        def unit(self, a, c=None):
            return F.normalize(a, dim=-1)[:, None]
        def whom_unit(self, x, n_windows=1, e=None):
            return F.normalize(torch.tanh(x[..., 2:]), dim=-1)[:, None]
    model = torch.nn.Module()
    model.memories = torch.nn.ModuleDict({"0": Mem()})
    return model


def test_whom_term_has_only_other_peoples_facts_of_the_asked_attribute_as_rivals():
    """Facts: A's city, B's city, A's job, C's job; the question asks A's city. The whom term is a softmax
    over A's city and B's city only (C's job: another attribute; A's job: the same person), by hand,
    averaged with the full keys' term (rivals: every other slot)."""
    model = whom_by_hand()
    big = 20.0                                                           # tanh(±20) = ±1: whom parts (1, 0), (0, 1)
    k = torch.tensor([[1, 0, big, 0], [1, 0, 0, big], [0, 1, big, 0], [0, 1, -big, -big]])  # (F, 2 + 2)
    q = torch.tensor([[[1.0, 0.0, big, -big]]])                          # what: city; whom: (1, -1) / √2
    sites = [(torch.arange(4), torch.arange(4), [(0, 0, 0, 0)], torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 2]), [])]
    got = TM.binding_loss(model, {"0": (k[None], None)}, {"0": (q, None)}, sites, 1, 1, tau=0.5).item()
    full = -torch.log_softmax(torch.tensor([1.0, 1.0, 0.0, 0.0]) / 0.5, 0)[0]  # q·k of the four facts
    whom = -torch.log_softmax(torch.tensor([1.0, -1.0]) / 2 ** 0.5 / 0.5, 0)[0]   # A's city vs B's city
    assert got == pytest.approx(float((full + whom) / 2), rel=1e-5)


def test_whom_null_slot_by_hand():
    """bind_null = 0.5: facts A's city and B's city (whom (1, 0) and (0, 1)); the asked question's whom is A's,
    a second one's is nobody's ((-1, -1) / √2). Terms by hand: the full keys' softmax, the whom softmax with
    the null slot as one more rival (A's fact must beat 0.5), and the absent one's softmax that must pick it."""
    model = whom_by_hand()
    big = 20.0
    k = torch.tensor([[1, 0, big, 0], [1, 0, 0, big]])                    # (F = 2, 2 + 2)
    q = torch.tensor([[[1.0, 0, big, 0], [1.0, 0, -big, -big]]])          # read positions 0 (A) and 1 (nobody)
    sites = [(torch.arange(2), torch.arange(2), [(0, 0, 0, 0)], torch.tensor([0, 0]), torch.tensor([0, 1]), [1])]
    got = TM.binding_loss(model, {"0": (k[None], None)}, {"0": (q, None)}, sites, 1, 1, tau=0.5, null=0.5).item()
    full = -torch.log_softmax(torch.tensor([1.0, 1.0]) / 0.5, 0)[0]
    whom = -torch.log_softmax(torch.tensor([1.0, 0.0, 0.5]) / 0.5, 0)[0]
    nobody = -torch.log_softmax(torch.tensor([-0.5 ** 0.5, -0.5 ** 0.5, 0.5]) / 0.5, 0)[2]
    assert got == pytest.approx(float((full + whom + nobody) / 3), rel=1e-5)
    off = TM.binding_loss(model, {"0": (k[None], None)}, {"0": (q, None)}, sites, 1, 1, tau=0.5).item()   # null = 0: as before
    assert off == pytest.approx(float((full - torch.log_softmax(torch.tensor([1.0, 0.0]) / 0.5, 0)[0]) / 2), rel=1e-5)


def test_absent_person_is_exactly_the_person_the_history_never_names():
    for seed in range(10):                                               # shared: one such question per episode
        ep = tasks.make_shared(np.random.default_rng(seed), 4, "train")
        flagged = [q for q in ep.questions if tasks.absent_person(ep, q)]
        assert len(flagged) == 1 and flagged[0].a == "unknown"
        stated = {p for _, p, _, _ in tasks.parse_facts(ep)}
        assert all(any(p in q.q.replace("?", " ").replace("'s", " ").split() for p in stated)
                   for q in ep.questions if q is not flagged[0])
    for seed in range(20):                                               # msqa: never for a named person
        ep = tasks.make_msqa(np.random.default_rng(seed), "small", "train", dense=True, absent=1)
        flagged = [q for q in ep.questions if tasks.absent_person(ep, q)]
        assert flagged and all(q.a == "unknown" for q in flagged)
        stated = {p for _, p, _, _ in tasks.parse_facts(ep)}
        assert not any(p in q.q.replace("?", " ").replace("'s", " ").split() for q in flagged for p in stated)


def test_binding_term_reads_the_second_answer_token_at_the_values_second_token():
    """Two facts of two tokens each (tokens 0-1 and 2-3); the question asks fact 0 with rows j = 0 (read at
    position 0) and j = 1 (read at 1). The loss is the mean of two softmaxes by hand: query 0 against the
    keys at tokens 0 and 2, query 1 against the keys at tokens 1 and 3 (the values' second tokens)."""
    model = keys_by_hand()
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.0], [0.0, -1.0]])  # (T=4, d_k)
    q = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])                         # (1, 2, d_k) read positions 0, 1
    sites = [(torch.tensor([0, 2]), torch.arange(2), [(0, 0, 0, 0), (0, 1, 0, 1)], torch.zeros(2), torch.arange(2), [])]
    got = TM.binding_loss(model, {"0": (k[None], None)}, {"0": (q, None)}, sites, 1, 1, tau=0.5).item()
    first = -torch.log_softmax(torch.tensor([1.0, 0.5]) / 0.5, 0)[0]    # q_0 · (k_0, k_2)
    second = -torch.log_softmax(torch.tensor([2.0, -2.0]) / 0.5, 0)[0]  # q_1 · (k_1, k_3)
    assert got == pytest.approx(float((first + second) / 2), rel=1e-6)


def test_same_attribute_margin_and_separation_by_hand():
    kinds = torch.tensor([0, 0, 1])                                      # facts 0, 1: one attribute, two people
    slots = torch.arange(3)
    apart = torch.eye(3)[None]                                           # (1, 3, 3) orthogonal keys
    assert TM.read_margin(apart[0, 0][None], apart, slots, 0, kinds).item() == pytest.approx(1.0)
    assert TM.key_separation(apart, slots, kinds).item() == pytest.approx(0.0)
    typed = torch.stack([torch.eye(3)[0], torch.eye(3)[0], torch.eye(3)[1]])[None]  # a key of the attribute only
    assert TM.read_margin(typed[0, 0][None], typed, slots, 0, kinds).item() == pytest.approx(0.0)
    assert TM.key_separation(typed, slots, kinds).item() == pytest.approx(1.0)
    assert TM.read_margin(typed[0, 0][None], typed, slots, 0).item() == pytest.approx(0.0)  # all rivals: fact 1 too
    assert TM.read_margin(typed[0, 0][None], typed[:, [0, 2]], slots[:2], 0).item() == pytest.approx(1.0)  # the type


def test_step_inputs_add_the_context_and_general_terms_on_their_share_of_the_steps(enc):
    assert [TM.on_share(it, 0.5) for it in range(6)] == [False, True] * 3     # every other step
    assert [TM.on_share(it, 0.25) for it in range(8)] == [False, False, False, True] * 2
    assert all(TM.on_share(it, 1.0) for it in range(5))

    class Rows:                                                          # stands in for CorpusRows
        def batch(self, n, length, rng):
            return ("rows", n, length)

    cfg = dict(TM.DEFAULTS, episode_preset="tiny", batch_size=2)
    off, on = (TM.step_inputs(enc, cfg, it, 256, Rows()) for it in (0, 1))
    assert off[1]["context"] is None and off[1]["general"] is None and off[1]["sites"] is not None
    assert on[1]["context"][0].shape[:2] == (2, 1) and on[1]["general"] == ("rows", 2, 256)  # general_len 0: the block
    assert TM.step_inputs(enc, dict(cfg, general_len=64), 1, 256, Rows())[1]["general"] == ("rows", 2, 64)
    again = TM.step_inputs(enc, cfg, 1, 256, Rows())                     # a function of the step alone
    assert torch.equal(again[0]["hist"], on[0]["hist"]) and torch.equal(again[0]["qx"], on[0]["qx"])
    capped = TM.step_inputs(enc, dict(cfg, max_questions=2), 1, 256, Rows())[0]
    assert on[0]["qx"].size(1) > 2 and capped["qx"].size(1) == 2           # at most 2 questions an episode


def test_the_whom_part_and_only_it_learns_at_its_own_rate():
    """param_groups: W_c, W_s and W_se of every memory layer at name_lr_scale, every other trainable weight
    at the rate, each once, the frozen backbone in neither."""
    gpt = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16))
    cfg = dict(TM.DEFAULTS, key_dim=8, name_dim=4, rank=2, layers="0,1")
    model = TM.build("deltamem", gpt, cfg)
    rest, whom = TM.param_groups(model, cfg)
    assert whom["lr_scale"] == cfg["name_lr_scale"] and "lr_scale" not in rest
    expect = {id(getattr(m, n).weight) for m in model.memories.values() for n in ("W_c", "W_s", "W_se")}
    assert {id(p) for p in whom["params"]} == expect and len(whom["params"]) == 6
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in rest["params"]} == {id(p) for p in trainable} - expect
    assert not any(p.requires_grad for p in gpt.parameters())

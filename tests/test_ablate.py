"""dev/ablate.py: cells are the cartesian product, the CSV resumes, every picture is a real PNG, the
memory-at-work replay ends in the model's own state."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dev import ablate as AB
import train_memory as TM
from data import tasks
from conftest import assert_close
from nanodeltamem import GPT, GPTConfig, DeltaMemGPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_bytes=5000):
    data = open(path, "rb").read()
    assert data[:8] == PNG and len(data) > min_bytes, (path, len(data))


def tiny_args(out_dir, *extra):
    return [f"--out_dir={out_dir}", "--task=recall", "--episode_preset=tiny", "--max_iters=2", "--batch_size=2",
            "--val_episodes=2", "--eval_episodes=2", "--log_interval=1", "--eval_interval=1", "--warmup_iters=1",
            "--general_reg=0", *extra]                                  # a 257-token toy backbone: no corpus rows


def test_cells_are_the_cartesian_product_of_the_comma_lists():
    cfg, axes = AB.parse_args(["--key_dim=2,4", "--rank=1,8", "--write=token,msw", "--update=delta,hebbian"])
    cells = AB.make_cells(cfg, axes)
    assert len(cells) == 16 and len({c["cell"] for c in cells}) == 16
    got = {(c["key_dim"], c["rank"], c["write_axis"], c["update"]) for c in cells}
    assert got == {(d, r, w, u) for d in (2, 4) for r in (1, 8) for w in ("token", "msw") for u in ("delta", "hebbian")}
    for c in cells:                                                      # msw: token writes with 4 states
        assert (c["write"], c["heads"]) == (("token", 4) if c["write_axis"] == "msw" else ("token", 1))
    grid = AB.make_cells(*AB.parse_args([]))                             # default: the d_k x r grid
    assert sorted((c["key_dim"], c["rank"]) for c in grid) == sorted(
        (d, r) for d in (2, 4, 8, 16, 32) for r in (1, 2, 4, 8, 16))
    cap = AB.make_cells(*AB.parse_args(["--capacity"]))                 # one memory per (d_k, rule), trained
    assert len(cap) == 4 * 2 and {c["task"] for c in cap} == {"recall"}  # on N in [2, 32], scored at each N
    assert {c["key_dim"] for c in cap} == {4, 8, 16, 32} and {c["update"] for c in cap} == {"gated", "hebbian"}
    assert {(c["n_pairs"], c["max_pairs"], tuple(c["eval_pairs"])) for c in cap} == {(0, 32, (2, 4, 8, 16, 32))}
    # another training setting is another cell; an evaluation setting is not
    a = AB.make_cells(*AB.parse_args(["--key_dim=8", "--rank=8"]))[0]["cell"]
    assert AB.make_cells(*AB.parse_args(["--key_dim=8", "--rank=8", "--learning_rate=0.5"]))[0]["cell"] != a
    assert AB.make_cells(*AB.parse_args(["--key_dim=8", "--rank=8", "--eval_episodes=3"]))[0]["cell"] == a
    # a setting added to train_memory later must not rename finished cells (add it to AB.ADDED_LATER):
    # the default cell's name since 564ca79's absent questions and 128 general tokens (a new recipe, a new
    # name); the recipe before it, the binding recipe's and the old defaults, spelled out, keep their names
    assert a == "dk8_r8_token_qo_gated_kc4_5a92cd"
    before = ["--key_dim=8", "--rank=8", "--absent_questions=0", "--general_len=64"]
    assert AB.make_cells(*AB.parse_args(before))[0]["cell"] == "dk8_r8_token_qo_gated_kc4_0a0963"
    # a new default that cannot touch a cell does not rename it: the capacity sweep (recall, no general
    # term) keeps the name the README's demo command reads
    assert [c["cell"] for c in cap][-2] == "dk32_r8_token_qo_gated_kc4_907b61"
    was = ["--key_dim=8", "--rank=8", "--warmup_iters=30", "--aux_share=1.0", "--general_reg=0.5", "--general_len=64",
           "--absent_questions=0"]
    assert AB.make_cells(*AB.parse_args(was))[0]["cell"] == "dk8_r8_token_qo_gated_kc4_1176dc"
    old = ["--key_dim=8", "--rank=8", "--update=delta", "--key_conv=1", "--layers=all", "--learning_rate=1e-2",
           "--max_iters=120", "--bind_reg=0", "--dense_questions=False", "--context_reg=0", "--log_interval=20",
           "--warmup_iters=30", "--aux_share=1.0", "--general_reg=0.5", "--general_len=64",
           "--absent_questions=0"]
    assert AB.make_cells(*AB.parse_args(old))[0]["cell"] == "dk8_r8_token_qo_delta_db902d"
    assert AB.make_cells(*AB.parse_args(["--key_dim=8", "--rank=8", "--read_window_share=0.5"]))[0]["cell"] != a
    kc = AB.make_cells(*AB.parse_args(["--key_dim=8", "--rank=8", "--key_conv=1,4"]))   # the key_conv axis
    assert [c["key_conv"] for c in kc] == [1, 4] and kc[1]["cell"] == a and "_kc4_" not in kc[0]["cell"]


@pytest.mark.parametrize("args,msg", [(["--key_dim=2,x"], "expects a int"), (["--write=token,foo"], "--write"),
                                      (["--sides=q,z"], "sides='z'"), (["--splits=iid,nope"], "--splits"),
                                      (["--rank=0"], "--rank must be > 0"), (["--key_conv=2,0"], "key_conv")])
def test_bad_cells_are_refused_before_any_work(args, msg):
    with pytest.raises(AB.UserError, match=msg):
        AB.make_cells(*AB.parse_args(args))


@pytest.mark.slow
def test_bad_input_is_one_line_error_from_the_command_line():
    r = subprocess.run([sys.executable, "dev/ablate.py", "--key_dim=2,x"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--key_dim expects a int" in lines[0], r.stderr


def test_n_pairs_fixes_the_number_of_stored_pairs():
    cfg = dict(TM.DEFAULTS, task="recall", episode_preset="small")
    eps = TM.sample_episodes(np.random.default_rng(0), dict(cfg, n_pairs=5), 4)
    assert all(len({f[1] for f in tasks.parse_facts(ep)}) == 5 for ep in eps)
    eps = TM.sample_episodes(np.random.default_rng(0), cfg, 4)            # no n_pairs: the preset's 8
    assert all(len({f[1] for f in tasks.parse_facts(ep)}) == 8 for ep in eps)


def test_max_pairs_spreads_n_log_uniformly_over_its_range():
    cfg = dict(TM.DEFAULTS, task="recall", episode_preset="small", max_pairs=32)
    ns = [len({f[1] for f in tasks.parse_facts(ep)}) for ep in TM.sample_episodes(np.random.default_rng(0), cfg, 300)]
    assert min(ns) == 2 and max(ns) == 32                                # both ends of [2, 32] are drawn
    # log-uniform: each octave [2,4), [4,8), [8,16), [16,32] gets about a quarter (uniform would give 2/30 to
    # the first and 16/30 to the last)
    share = [np.mean([lo <= n < hi for n in ns]) for lo, hi in ((2, 4), (4, 8), (8, 16), (16, 33))]
    assert all(0.15 < x < 0.35 for x in share), share


@pytest.mark.parametrize("args,cells,names,rows,iters", [
    (["--capacity", "--quick"], 4, {"dk4_", "dk32_"}, 4 * 5, 200),      # 2 d_k x 2 rules, 5 N each
    (["--capacity"], 8, {"dk4_", "dk8_", "dk16_", "dk32_"}, 8 * 5, 500),
    (["--rank_sweep", "--quick"], 2, {"_r2_", "_r32_"}, 2 * 2 * 2, 300),  # 2 r, N = 1 and 8, iid and values
    (["--rank_sweep"], 5, {"_r2_", "_r4_", "_r8_", "_r16_", "_r32_"}, 5 * 2 * 2, 600)])
def test_each_sweeps_arguments_parse_and_name_their_cells(args, cells, names, rows, iters):
    cfg, axes = AB.parse_args(args)
    got = AB.make_cells(cfg, axes)
    assert len(got) == cells and len({c["cell"] for c in got}) == cells
    assert all(any(n in c["cell"] for c in got) for n in names)          # each value of the swept axis named
    assert {c["max_iters"] for c in got} == {iters} and {c["query_conv"] for c in got} == {8}
    points = [(n, s) for c in got for n in c["eval_pairs"] for s in c.get("eval_splits") or [c["splits"]]]
    assert len(points) == rows
    assert AB.make_cells(*AB.parse_args(args))[0]["cell"] == got[0]["cell"]  # the same name every time


@pytest.mark.parametrize("args,msg", [(["--capacity", "--n_pairs=1,4"], "N >= 2"),
                                      (["--rank_sweep", "--key_dim=8,16"], "one --key_dim"),
                                      (["--rank_sweep", "--n_pairs=1"], "N >= 2"),
                                      (["--capacity", "--rank_sweep"], "give one")])
def test_sweeps_refuse_bad_axes(args, msg):
    with pytest.raises(AB.UserError, match=msg):
        AB.make_cells(*AB.parse_args(args))


@pytest.mark.slow
def test_capacity_sweep_trains_each_cell_once_and_scores_it_at_each_n(enc, gpt, tmp_path, monkeypatch):
    csv_path = str(tmp_path / "capacity.csv")
    cells = AB.make_cells(*AB.parse_args(tiny_args(tmp_path, "--capacity", "--key_dim=2,4", "--update=gated", "--n_pairs=2,3",
                                                   "--max_iters=2", "--eval_episodes=2")))
    real, calls = TM.train_one, []
    monkeypatch.setattr(TM, "train_one", lambda *a, **k: calls.append(a[4]["max_pairs"]) or real(*a, **k))
    rows = AB.sweep(cells, enc, gpt, "cpu", csv_path)
    assert calls == [3, 3]                                               # once per d_k, on N in [2, 3]
    assert sorted((r["key_dim"], r["n_pairs"]) for r in rows) == [("2", "2"), ("2", "3"), ("4", "2"), ("4", "3")]
    # N < 8 gets 8 / N times the episodes (2 x 8 // 3 = 5 episodes x 3 pairs), so each N asks about as much
    assert {int(r["n_questions"]) for r in rows if r["n_pairs"] == "3"} == {5 * 3}
    assert {int(r["n_questions"]) for r in rows if r["n_pairs"] == "2"} == {8 * 2}
    assert len(AB.sweep(cells, enc, gpt, "cpu", csv_path)) == 4 and len(calls) == 2  # resumes: nothing retrained


def test_capacity_and_rank_json_schemas_from_fixed_rows(tmp_path):
    rows = [dict(key_dim=dk, update=u, n_pairs=n, em_recall=min(1.0, dk / n) * (1 if u == "gated" else 0.4))
            for dk in (4, 32) for u in ("gated", "hebbian") for n in (2, 4, 8, 16, 32)]
    got = AB.capacity_summary(rows, str(tmp_path / "capacity.json"))
    assert json.load(open(tmp_path / "capacity.json")) == got
    assert set(got) == {"gated", "hebbian", "knee"}
    assert got["gated"]["4"] == {"2": 1.0, "4": 1.0, "8": 0.5, "16": 0.25, "32": 0.125}
    # knee: the largest N at >= half the N = 2 value: 8 for d_k = 4 (0.5 of 1.0), 32 for d_k = 32; hebbian
    # here starts at 0.4 <= 1/2 at N = 2: no knee
    assert got["knee"] == {"gated": {"4": 8, "32": 32}, "hebbian": {"4": None, "32": None}}
    rows = [dict(rank=r, n_pairs=n, splits=s, fact_em=r / 64 + (0.5 if n == 1 else 0) - (0.1 if s == "values" else 0))
            for r in (2, 32) for n in (1, 8) for s in ("iid", "values")]
    got = AB.rank_summary(rows, str(tmp_path / "rank.json"))
    assert json.load(open(tmp_path / "rank.json")) == got and list(got) == ["2", "32"]
    assert got["32"] == {"iid": 0.5, "values": 0.4, "iid_n1": 1.0, "values_n1": 0.9}
    labels = AB.plot_rank(got, str(tmp_path / "rank.png"))
    assert_png(tmp_path / "rank.png") and labels == ["iid", "values (unseen words)", "iid, N = 1", "values, N = 1"]
    with pytest.raises(AB.UserError, match="--rank_sweep"):
        AB.rank_summary([], str(tmp_path / "none.json"))


@pytest.mark.slow
def test_sweep_appends_one_row_per_cell_and_skips_finished_cells(enc, gpt, tmp_path, monkeypatch, capsys):
    csv_path = str(tmp_path / "ablate.csv")
    cells = AB.make_cells(*AB.parse_args(tiny_args(tmp_path, "--key_dim=2,4", "--rank=2")))
    rows = AB.sweep(cells, enc, gpt, "cpu", csv_path)
    assert len(rows) == 2 and sorted(r["key_dim"] for r in rows) == ["2", "4"]
    for r in rows:
        ckpt = torch.load(tmp_path / "cells" / r["cell"] / "memory_deltamem.pt", weights_only=True)
        assert ckpt["iter_num"] == 2 and len(ckpt["history"]) == 2      # trained in its own folder
        fams = [float(r[f"em_{f}"]) for f in ("recall", "forgetting", "two_hop")]
        assert float(r["macro_em"]) == pytest.approx(np.mean(fams))
        assert 0 <= float(r["acc"]) <= 1 and float(r["train_seconds"]) > 0 and r["machine"]
        assert int(r["n_questions"]) == 2 * 4                              # 2 episodes x 4 pairs (tiny)
    text = open(csv_path).read()
    # re-running trains nothing: the CSV is unchanged and train_one is never called
    calls = []
    monkeypatch.setattr(TM, "train_one", lambda *a, **k: calls.append(a) or pytest.fail("retrained a finished cell"))
    capsys.readouterr()
    assert len(AB.sweep(cells, enc, gpt, "cpu", csv_path)) == 2
    assert open(csv_path).read() == text and calls == []
    assert "2 already in" in capsys.readouterr().out
    # a grown grid runs only the new cell
    monkeypatch.undo()
    real = TM.train_one
    monkeypatch.setattr(TM, "train_one", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    more = AB.make_cells(*AB.parse_args(tiny_args(tmp_path, "--key_dim=2,4,8", "--rank=2")))
    rows = AB.sweep(more, enc, gpt, "cpu", csv_path)
    assert len(calls) == 1 and len(rows) == 3 and open(csv_path).read().startswith(text)


def test_csv_ignores_a_cut_row_and_refuses_foreign_columns(tmp_path):
    path = str(tmp_path / "a.csv")
    AB.append_row(path, dict(cell="x", key_dim=2, machine="m"))
    AB.append_row(path, dict(cell="y", key_dim=4, machine="m"))
    with open(path, "a") as f:
        f.write("z,8,2")                                                 # a crash mid-row
    assert [r["cell"] for r in AB.read_rows(path)] == ["x", "y"]
    other = tmp_path / "b.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(AB.UserError, match="other columns"):
        AB.append_row(str(other), dict(cell="x"))


@pytest.mark.parametrize("ns,accs,want", [([2, 4, 8, 16, 32], [1.0, 0.9, 0.8, 0.3, 0.1], 8),
                                          ([2, 4, 8], [0.2, 0.6, 0.5], 8),
                                          ([8, 2, 4], [0.1, 0.9, 0.7], 4),       # unsorted input
                                          ([2, 4], [0.0, 0.0], None)])
def test_knee_is_the_last_n_at_half_the_best(ns, accs, want):
    assert AB.knee(ns, accs) == want


def test_knee_against_the_first_n():
    ns, accs = [2, 4, 8, 16, 32], [0.6, 0.9, 0.35, 0.31, 0.1]
    assert AB.knee(ns, accs) == 4                                        # half the best (0.45): 8 falls below
    assert AB.knee(ns, accs, ref=accs[0]) == 16                          # half the N = 2 value (0.3)
    assert AB.capacity_knee(ns[::-1], accs[::-1]) == 16                  # the sweep's knee, any order
    # a memory at or below 1/N at N = 2 does not bind: a flat 0.09 curve has no knee (not N = 32)
    assert AB.capacity_knee(ns, [0.09, 0.06, 0.06, 0.07, 0.07]) is None
    assert AB.capacity_knee(ns, [0.5, 0.4, 0.3, 0.2, 0.1]) is None and AB.capacity_knee(ns, [0.51, 0.3, 0.2, 0.1, 0]) == 4


def fixed_rows():
    rows = []
    for dk in (2, 4, 8):
        for r in (1, 4):
            for update in ("delta", "hebbian"):
                rows.append(dict(cell=f"c{dk}{r}{update}", key_dim=dk, rank=r, write="token", heads=1, sides="qo",
                                 update=update, n_pairs=0, macro_em=dk * r / 40, acc=0.5, machine="test"))
    for dk in (4, 8):
        for n in (2, 4, 8, 16):
            for update in ("delta", "hebbian"):
                rows.append(dict(cell=f"n{dk}{n}{update}", key_dim=dk, rank=8, write="token", heads=1, sides="qo",
                                 update=update, n_pairs=n, macro_em=0.5, acc=0.5,
                                 em_recall=min(1, dk / n) * (1 if update == "delta" else 0.6), machine="test"))
    return rows


def test_heatmap_and_capacity_plots_from_a_fixed_csv(tmp_path):
    csv_path = str(tmp_path / "fixed.csv")
    for row in fixed_rows():
        AB.append_row(csv_path, row)
    AB.plot_heatmap(csv_path, str(tmp_path / "heatmap.png"))
    AB.plot_capacity(csv_path, str(tmp_path / "capacity.png"))
    assert_png(tmp_path / "heatmap.png")
    assert_png(tmp_path / "capacity.png")
    with pytest.raises(AB.UserError, match="--capacity"):               # no N axis in these rows
        AB.plot_capacity([r for r in fixed_rows() if r["n_pairs"] == 0], str(tmp_path / "none.png"))


def test_family_bars_from_a_fixed_results_json(tmp_path):
    fam = {"single_hop": 0.5, "update": 0.25, "abstention": 1.0}
    res = {n: dict(macro_em=m, per_family=fam, history_tokens_in_context=0, trainable_params=0)
           for n, m in [("no_history", 0.1), ("full_context", 0.7), ("deltamem", 0.4)]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(dict(conditions=res)))
    AB.plot_families(str(path), str(tmp_path / "families.png"))
    assert_png(tmp_path / "families.png")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(AB.UserError, match="bad.json"):
        AB.plot_families(str(tmp_path / "bad.json"), str(tmp_path / "x.png"))


def test_training_curves_from_checkpoint_histories(tmp_path):
    paths = []
    for i in range(3):
        (tmp_path / f"cell{i}").mkdir()
        p = tmp_path / f"cell{i}" / "memory_deltamem.pt"
        torch.save(dict(history=[dict(iter=it, train=3.0 / (it + i), val_acc=it / 40) for it in (10, 20, 30)]), p)
        paths.append(p)
    AB.plot_training(paths, str(tmp_path / "training.png"))
    assert_png(tmp_path / "training.png")


@pytest.mark.parametrize("over", [dict(), dict(update="hebbian"), dict(heads=2, rank=4), dict(gates="scalar"),
                                  dict(key_conv=3, update="hebbian"),  # hebbian: no decay hides a wrong key
                                  dict(key_dim=8, name_dim=2)])         # the main job's what ⊗ whom keys
def test_memory_trace_replays_to_the_models_own_state(enc, gpt, tmp_path, over):
    torch.manual_seed(1)
    model = DeltaMemGPT(gpt, TM.memory_config({**AB.DEFAULTS, "key_dim": 4, **over}))
    for mem in model.memories.values():                                  # gates that differ per token
        torch.nn.init.normal_(mem.W_beta.weight, std=0.5)
        if mem.key_conv is not None:                                     # a convolution that matters
            torch.nn.init.normal_(mem.key_conv)
    ep = tasks.make_recall(np.random.default_rng(3), "tiny", "iid")
    trace = AB.memory_trace(model, enc, ep, layer=0)
    T = len(trace["tokens"])
    assert T == len(trace["line_of"]) == len(enc.encode_ordinary(tasks.render_history(ep)))
    assert "".join(trace["tokens"]) == tasks.render_history(ep)
    S = torch.tensor(trace["states"])                                    # (T, H, r, d_k)
    H, r = model.mcfg.heads, model.mcfg.rank
    assert S.shape == (T, H, r, model.mcfg.key_dim) and np.array(trace["beta"]).shape == (H * r, T)
    # the token-by-token replay (recurrent) ends where the model's chunkwise write pass ended
    assert_close("S[-1]", S[-1], torch.tensor(trace["final_state"]), atol=1e-5)
    lines = [l for s in ep.sessions for l in s]
    assert trace["fact_lines"] == [i for i, l in enumerate(lines) if ": " in l and l.endswith(".")
                                   and l.split(":")[0].removeprefix("- ") in {q.q.rstrip("?") for q in ep.questions}]
    AB.plot_work(trace, str(tmp_path / "work.png"))
    assert_png(tmp_path / "work.png")


def test_memory_trace_refuses_segment_writes(enc, gpt):
    model = DeltaMemGPT(gpt, TM.memory_config(dict(AB.DEFAULTS, write="segment")))
    with pytest.raises(AB.UserError, match="SSW"):
        AB.memory_trace(model, enc, tasks.make_recall(np.random.default_rng(3), "tiny", "iid"))


def test_capacity_plot_draws_one_curve_per_write_mode_and_the_1_over_n_line(tmp_path):
    rows = [dict(r, write=w) for r in fixed_rows() if r["n_pairs"] and r["key_dim"] == 4 for w in ("token", "segment")]
    labels = AB.plot_capacity(rows, str(tmp_path / "capacity.png"))
    assert_png(tmp_path / "capacity.png")
    curves = [lab for lab in labels if lab.startswith("d_k=")]
    assert sorted(curves) == sorted(f"d_k=4 {w} {u}" for w in ("token", "segment") for u in ("delta", "hebbian"))
    assert any(lab.startswith("1/N") for lab in labels)
    conv = [dict(r, key_conv=4) for r in rows if r["write"] == "token"]     # + the same with key_conv 4
    labels = AB.plot_capacity(rows + conv, str(tmp_path / "capacity.png"))
    assert sum(lab.endswith("key_conv=4") for lab in labels) == 2


# ----------------------------------------------------------------------------------------------
# the state's own capacity (keys given, nothing trained)
# ----------------------------------------------------------------------------------------------

def test_state_recall_matches_hand_computed_cases():
    v4 = torch.nn.functional.normalize(torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0)), dim=-1)
    eye = torch.eye(4).expand(3, 4, 4)                                   # orthonormal keys, N = d_k = 4
    assert AB.state_recall(eye, v4, "deltanet") == (1.0, 1.0)            # no crosstalk: both rules exact
    assert AB.state_recall(eye, v4, "hebbian") == (1.0, 1.0)
    assert AB.state_recall(eye, v4, "delta")[0] == 0.25                  # β = 1 with (1-β) decay: the last only
    # two keys at cos 0.6, orthogonal values: hebbian reads v1 + 0.6 v2 (cos 0.857 < 0.9) and 0.6 v1 + v2;
    # one delta pass keeps v2 exact and leaves 0.64 v1 + 0.6 v2 for k1; passes converge to S k_i = v_i
    k = torch.tensor([[[1.0, 0.0], [0.6, 0.8]]])                        # (E=1, N=2, d_k=2)
    v = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])                        # (E=1, N=2, r=2)
    assert AB.state_recall(k, v, "hebbian") == (0.0, 1.0)
    assert AB.state_recall(k, v, "hebbian", passes=20) == (0.0, 1.0)    # passes only scale hebbian's S
    assert AB.state_recall(k, v, "deltanet") == (0.5, 1.0)
    assert AB.state_recall(k, v, "deltanet", passes=20) == (1.0, 1.0)


def test_state_capacity_knee_sits_at_d_k_for_the_delta_rule_and_earlier_for_hebbian(tmp_path, capsys):
    out = tmp_path / "sc"
    args = [f"--out_dir={out}", "--state_capacity", "--key_dim=4,8", "--n_pairs=1,2,4,8,16",
            "--update=deltanet,hebbian", "--state_episodes=200"]
    knees = AB.main(args)
    rows = AB.read_rows(out / "state_capacity.csv")
    assert len(rows) == 2 * 5 * 2 and {r["machine"] != "" for r in rows} == {True}
    assert_png(out / "state_capacity.png")
    assert knees[(4, "deltanet")] == 4 and knees[(8, "deltanet")] == 8   # halve d_k, halve the knee
    assert knees[(4, "hebbian")] < 4 and knees[(8, "hebbian")] < 8
    one = {(int(r["key_dim"]), int(r["n_pairs"]), r["update"]): float(r["clean"]) for r in rows}
    assert one[(8, 4, "deltanet")] > 0.95 and one[(8, 4, "hebbian")] < 0.7
    (out / "state_capacity.png").unlink()
    assert AB.main(args + ["--plots"]) == knees and (out / "state_capacity.png").exists()  # redraw, no rerun


@pytest.mark.parametrize("args,msg", [(["--state_beta=0"], "--state_beta"), (["--rank=4,8"], "one --rank"),
                                      (["--update=delta,oja"], "--update"), (["--n_pairs=0"], "positive")])
def test_state_capacity_refuses_bad_input(tmp_path, args, msg):
    with pytest.raises(AB.UserError, match=msg):
        AB.main([f"--out_dir={tmp_path}", "--state_capacity", *args])


def test_state_capacity_plot_from_a_fixed_csv(tmp_path):
    rows = [dict(key_dim=dk, rank=8, n_pairs=n, update=u, passes=10, beta=1.0, episodes=10,
                 clean=min(1.0, dk / n) if u == "deltanet" else min(1.0, 2 / n), nearest=1.0, seconds=0, machine="test")
            for dk in (4, 8) for n in (1, 2, 4, 8, 16) for u in ("deltanet", "hebbian")]
    knees = AB.plot_state_capacity(rows, str(tmp_path / "state.png"))
    assert_png(tmp_path / "state.png")
    assert knees == {(4, "deltanet"): 8, (8, "deltanet"): 16, (4, "hebbian"): 4, (8, "hebbian"): 4}
    with pytest.raises(AB.UserError, match="--state_capacity"):
        AB.plot_state_capacity([], str(tmp_path / "none.png"))


def test_overwrite_summary_schema_and_plot_from_fixed_rows(tmp_path):
    rows = [dict(cell=f"c{u}{s}", task="msqa", update=u, seed=str(s), updated_em=str(em), updated_stale=str(st))
            for u, em, st in [("gated", 0.8, 0.1), ("delta", 0.6, 0.2), ("deltanet", 0.7, 0.1), ("hebbian", 0.3, 0.6)]
            for s in (2, 1337, 1)]
    out = AB.overwrite_summary(rows, str(tmp_path / "overwrites.json"))
    saved = json.loads((tmp_path / "overwrites.json").read_text())
    assert saved == out and list(saved) == ["gated", "delta", "deltanet", "hebbian"]   # the CLI's rule names
    for rule, r in saved.items():
        assert set(r) == {"updated_em", "stale_rate", "seeds"} and r["seeds"] == [1, 2, 1337]  # one entry per seed
        assert len(r["updated_em"]) == len(r["stale_rate"]) == 3
    assert saved["hebbian"]["stale_rate"] == [0.6] * 3 and saved["gated"]["updated_em"] == [0.8] * 3
    AB.plot_overwrites(out, str(tmp_path / "overwrites.png"))
    assert_png(tmp_path / "overwrites.png")


def test_overwritten_later_by_hand():
    """Only an update whose latest value sits in a later session than every older value of its slot."""
    ep = tasks.Episode(sessions=[["Session 1 (Day 2)", "Mia: Alice lives in Lisbon.", "Mia: Bob lives in Paris."],
                                 ["Session 2 (Day 5)", "Mia: Alice moved again, this time to Oslo.",
                                  "Mia: Bob moved again, this time to Rome.",
                                  "Mia: Bob left town and now lives in Cairo."]],
                       questions=[tasks.Question("Where does Alice live now?", "Oslo", "update", stale=["Lisbon"]),
                                  tasks.Question("Where does Bob live now?", "Cairo", "update", stale=["Paris", "Rome"]),
                                  tasks.Question("Where does Bob live?", "Cairo", "single_hop")])
    facts = tasks.parse_facts(ep)
    assert [f[3] for f in facts] == ["Lisbon", "Paris", "Oslo", "Rome", "Cairo"], facts  # the templates parse
    assert [tasks.overwritten_later(ep, q) for q in ep.questions] == [True, False, False]  # Rome: same session


def test_every_overwrites_question_counts_in_the_overwrite_score():
    for seed in range(30):                                               # each new value one session later
        ep = tasks.make_overwrites(np.random.default_rng(seed), n_pairs=int(2 + seed % 7))
        assert ep.questions and all(tasks.overwritten_later(ep, q) for q in ep.questions)


def test_stale_rate_by_hand():
    from data.tasks import Episode, Question
    qs = [Question("Ann?", "tiger", "forgetting", stale=["apple", "river"]),
          Question("Bo?", "lemon", "forgetting", stale=["candle"]),
          Question("Cy?", "rocket", "forgetting", stale=["pencil"]),
          Question("Di?", "garden", "recall")]                          # no older value: not counted
    r = TM.score_condition(["river", "lemon", "apple", "river"], [Episode([["- x: y."]], qs, task="recall")])
    assert r["stale_rate"] == pytest.approx(1 / 3)                        # only Ann's answer is one of its own old values
    assert r["fact_em"] == pytest.approx(np.mean([1 / 3, 0.0]))          # forgetting 1/3, recall 0

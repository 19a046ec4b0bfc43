"""train_memory.py: each condition reads exactly the context it claims; budgets and the results schema."""
import json

import pytest
import torch

import train_memory as TM
from data import tasks
from nanodeltamem import GPT, GPTConfig, DeltaMemGPT


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=257, block_size=512, n_layer=2, n_head=2, n_embd=32))


def test_every_condition_gets_exactly_its_read_context(enc, gpt):
    cfg = dict(TM.DEFAULTS, budget=40)
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


@pytest.mark.parametrize("over", [dict(), dict(key_dim=4, rank=2), dict(heads=4, rank=4), dict(sides="q"),
                                  dict(gates="scalar")])
def test_lora_budget_matches_deltamem_within_10_percent(gpt, over):
    cfg = dict(TM.DEFAULTS, **over)
    dm = TM.build("deltamem", gpt, cfg)
    lora = TM.build("lora", gpt, cfg)
    a, b = dm.param_counts()[0], lora.param_counts()[0]
    assert abs(a - b) / a <= 0.10, (a, b)


def test_results_follow_the_design_schema(tmp_path):
    fam = {"single_hop": 0.5, "abstention": 1.0}
    res = {n: dict(macro_em=m, per_family=fam, history_tokens_in_context=h, trainable_params=p, stale_rate=None)
           for n, m, h, p in [("no_history", 0.2, 0, 0), ("full_context", 0.6, 190, 0), ("lora", 0.25, 0, 100),
                              ("hebbian", 0.3, 0, 100), ("deltamem", 0.45, 0, 100), ("deltamem_w64", 0.5, 64, 100),
                              ("recent_window", 0.3, 64, 0)]}
    cfg = dict(TM.DEFAULTS, out_dir=str(tmp_path))
    TM.write_results(cfg, res, {"iid": {n: r["macro_em"] for n, r in res.items()}},
                     dict(backbone=2.0, with_memory=2.01), "deltamem")
    out = json.loads((tmp_path / "results.json").read_text())
    for name, r in out["conditions"].items():
        assert isinstance(r["macro_em"], float) and isinstance(r["per_family"], dict)
        assert isinstance(r["history_tokens_in_context"], (int, float)) and isinstance(r["trainable_params"], int)
    assert set(out["general_val_loss"]) == {"backbone", "with_memory"}
    assert out["ratios"]["vs_frozen_backbone"] == pytest.approx(0.45 / 0.2)
    assert out["ratios"]["vs_best_non_deltamem"] == pytest.approx(0.45 / 0.3)   # hebbian, at 0 tokens
    assert out["ratios"]["vs_best_non_deltamem_at_64"] == pytest.approx(0.5 / 0.3)
    assert "deltamem" in (tmp_path / "results.md").read_text()


def test_compiled_training_saves_unwrapped_memory_checkpoint(enc, gpt, tmp_path, fake_compile):
    from nanodeltamem import load_checkpoint
    cfg = dict(TM.DEFAULTS, out_dir=str(tmp_path), max_iters=2, batch_size=2, log_interval=2, val_episodes=2,
               warmup_iters=1, compile=True, general_reg=0)
    model = TM.train_one("deltamem", "deltamem", gpt, enc, cfg, "cpu")
    assert fake_compile["wrapped"] == [model] and fake_compile["calls"] == 2 * 2  # write + read pass per step
    wrapper_keys = fake_compile["real_keys"](model)
    assert wrapper_keys == list(torch.compile(model).state_dict())      # the stand-in prefixes like the real one
    assert all(k.startswith("_orig_mod.") for k in wrapper_keys)
    saved = load_checkpoint(tmp_path / "memory_deltamem.pt")["memory"]
    assert not any("_orig_mod" in k for k in saved)
    assert saved.keys() == model.memories.state_dict().keys()
    loaded, _ = DeltaMemGPT.load_memory(tmp_path / "memory_deltamem.pt", gpt)
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

"""The backbone GPT and train_backbone.py: shapes, causality, the loss, checkpoints and resuming."""
import math
import os
import subprocess
import sys

import pytest
import torch

import train_backbone as TB
from conftest import assert_close, tiny_gpt
from nanodeltamem import GPT, GPTConfig, IGNORE_INDEX
from train_backbone import load_backbone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(**kw):
    return tiny_gpt(**{**dict(vocab_size=50, block_size=16, n_embd=16), **kw})


def test_shapes_and_tied_head():
    model = tiny()
    logits, loss = model(torch.randint(0, 50, (3, 10)))
    assert logits.shape == (3, 10, 50) and loss is None
    assert model.lm_head.weight is model.wte.weight
    with pytest.raises(ValueError, match="block_size"):
        model(torch.randint(0, 50, (1, 17)))


def test_causality_future_tokens_never_change_past_logits():
    model = tiny()
    x = torch.randint(0, 50, (2, 12))
    y = x.clone()
    y[:, 7:] = torch.randint(0, 50, (2, 5))
    a, _ = model(x)
    b, _ = model(y)
    assert_close("a[:, :7]", a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_loss_is_hand_computed_cross_entropy_and_respects_ignore_index():
    model = tiny()
    x = torch.randint(0, 50, (2, 4))
    t = torch.tensor([[3, IGNORE_INDEX, 7, 1], [IGNORE_INDEX, IGNORE_INDEX, 0, 49]])
    logits, loss = model(x, t)
    terms = []
    for b in range(2):
        for i in range(4):
            if t[b, i] != IGNORE_INDEX:
                row = logits[b, i].double()
                terms.append(math.log(row.exp().sum().item()) - row[t[b, i]].item())
    assert abs(loss.item() - sum(terms) / len(terms)) < 1e-4
    t2 = t.clone()
    t2[0, 1] = 5                                                        # labelling an ignored slot changes it
    assert abs(model(x, t2)[1].item() - loss.item()) > 1e-6


@pytest.mark.slow
def test_tiny_model_overfits_one_batch():
    model = tiny()
    x = torch.randint(0, 50, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


@pytest.mark.parametrize("new", [5, 40])
def test_generate_greedy_matches_argmax_loop(new):
    """generate decodes with a KV cache; the plain loop re-runs the last block_size tokens every step.
    40 new tokens run past the block, where the cache has to start again."""
    model = tiny()
    block = model.config.block_size
    start = torch.randint(0, 50, (2, 3))
    out = model.generate(start, new, temperature=0)
    idx = start
    for _ in range(new):
        idx = torch.cat([idx, model(idx[:, -block:])[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, idx)



def tiny_args(data_dir, out_dir, *extra):
    return [f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--n_layer=1", "--n_head=2", "--n_embd=16",
            "--block_size=64", "--batch_size=4", "--eval_interval=3", "--eval_iters=2", "--log_interval=3",
            "--warmup_iters=2", "--eval_episodes=2", *extra]


@pytest.mark.slow
def test_save_load_identical_logits_and_resume_continues(data_dir, tmp_path, monkeypatch):
    cfg = lambda out, *extra: TB.parse_config(tiny_args(data_dir, out, "--max_iters=9", *extra), TB.DEFAULTS, TB.PRESETS)
    straight_path = TB.train(cfg(tmp_path / "straight"))
    model, ckpt = load_backbone(straight_path)
    x = torch.randint(0, 300, (2, 20))
    twin, _ = load_backbone(straight_path)
    assert ckpt["iter_num"] == 9 and torch.equal(model(x)[0], twin(x)[0])
    # a run interrupted (Ctrl-C) after 7 iterations, then resumed, ends where the straight run ends
    real_batch, calls = TB.Rows.batch, []

    def interrupt_at_8th(self, *a):
        if len(calls) == 2 + 7:                                          # 2 fixed val batches + 7 iterations
            raise KeyboardInterrupt
        calls.append(1)
        return real_batch(self, *a)

    monkeypatch.setattr(TB.Rows, "batch", interrupt_at_8th)
    with pytest.raises(SystemExit):
        TB.train(cfg(tmp_path / "run"))
    monkeypatch.setattr(TB.Rows, "batch", real_batch)
    assert load_backbone(tmp_path / "run" / "backbone.pt")[1]["iter_num"] == 7
    resumed, ck = load_backbone(TB.train(cfg(tmp_path / "run", "--resume")))
    assert ck["iter_num"] == 9
    assert ck["optimizer"]["state"][0]["step"].item() == 9             # the optimizer state came along
    for (n, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert_close(f"resumed weight {n}", a, b, atol=1e-6)
    # resuming with another architecture is refused
    with pytest.raises(TB.UserError, match="resume with the same options"):
        TB.train(cfg(tmp_path / "run", "--resume", "--n_embd=32"))


@pytest.mark.slow
def test_compiled_training_saves_unwrapped_checkpoint(data_dir, tmp_path, fake_compile):
    path = TB.train(TB.parse_config(tiny_args(data_dir, tmp_path, "--max_iters=3", "--compile=True"),
                                    TB.DEFAULTS, TB.PRESETS))
    assert len(fake_compile["wrapped"]) == 1 and fake_compile["calls"] >= 3  # the steps ran through the wrapper
    raw = fake_compile["wrapped"][0]
    assert all(k.startswith("_orig_mod.") for k in fake_compile["real_keys"](raw))
    ckpt = torch.load(path, weights_only=True)
    assert list(ckpt["model"]) == list(raw.state_dict())                # no wrapper prefix
    model, _ = load_backbone(path)
    x = torch.randint(0, 300, (2, 20))
    assert torch.equal(model(x)[0], raw(x)[0])


@pytest.mark.slow
@pytest.mark.parametrize("args,msg", [
    (["--max_iters=5e3"], "expects a int"),
    (["--nonsense=1"], "unknown option --nonsense"),
    (["--preset=tpu"], "unknown preset"),
    (["--max_iters=0"], "must be > 0"),
    (["--data_dir=/nonexistent/dir"], "python data/prepare.py"),
    (["--out_dir=/proc/forbidden"], "cannot write to out_dir"),
])
def test_bad_input_is_one_line_error(args, msg):
    r = subprocess.run([sys.executable, "train_backbone.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], r.stderr


def test_probe_accuracy_reads_labels_that_are_there_and_not_those_that_are_not():
    import numpy as np
    rng = np.random.default_rng(0)
    labels = np.tile(np.arange(10), 30)                                  # (300,)
    present = np.eye(10)[labels] @ rng.normal(size=(10, 32)) + 0.1 * rng.normal(size=(300, 32))
    absent = rng.normal(size=(300, 32))                                  # independent of the labels
    assert TB.probe_accuracy(present, labels) == 1.0
    assert TB.probe_accuracy(absent, labels) < 0.25                      # chance is 0.1


def test_greedy_answers_stop_at_a_newline_inside_a_token():
    """A token such as "b\\nzz" ends the answer at its newline, as the plain newline token does."""
    vocab = {0: "a", 1: "b\nzz", 2: "\n", 3: "c"}

    class Enc:
        def encode_ordinary(self, text):
            return [2] if text == "\n" else []

        def decode(self, toks):
            return "".join(vocab[t] for t in toks)

    script = [0, 1, 3, 2]                                                # a, b\nzz, c, \n

    calls = []

    def logits_fn(idx, rows, cache):                                    # emits the script, one per step
        calls.append(idx.size(1))
        out = torch.full((idx.size(0), idx.size(1), 4), -1e9)
        out[:, -1, script[len(calls) - 1]] = 0.0
        return out

    assert TB.greedy_answers(logits_fn, [[3, 3]], Enc(), max_new_tokens=6) == ["ab"]
    assert calls == [2, 1, 1, 1]                                         # the prompt once, then each new token


def test_greedy_answers_with_the_cache_equal_recomputing_every_prefix(enc):
    """The cached decode (prompt once, then one token per call) picks what re-running the whole
    sequence picks, for prompts of several lengths (equal lengths share a batch)."""
    model = tiny(vocab_size=257, block_size=64).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(257, (n,), generator=g).tolist() for n in (3, 17, 9, 9, 30, 1)]
    newline = enc.encode_ordinary("\n")[0]
    expected = []
    with torch.no_grad():
        for p in prompts:                                                # the plain loop, no cache
            toks = []
            for _ in range(8):
                nxt = int(model(torch.tensor([p + toks]))[0][0, -1].argmax())
                toks.append(nxt)
                if nxt == newline:
                    break
            expected.append(enc.decode(toks[:toks.index(newline)] if newline in toks else toks).split("\n")[0])
        fn = lambda idx, rows, cache: model(idx, cache=cache)[0]
        got = TB.greedy_answers(fn, prompts, enc, max_new_tokens=8)
    assert got == expected and len(set(expected)) > 1


@pytest.mark.parametrize("answerer, expected", [("last", lambda n: 1 / n), ("lookup", lambda n: 1.0)])
def test_binding_probe_scores_a_value_picker_at_1_over_n_and_a_lookup_at_1(enc, monkeypatch, answerer, expected):
    """The binding line of the backbone report: an answerer that returns the last stored value (finds a
    value, binds none) must score exactly 1/N, since every name is asked once; one that looks up the
    asked name must score 1. Both read only the prompt, so this checks what the probe puts in context."""
    import re

    def fake_greedy(fn, prompts, enc_, max_new_tokens=6):
        out = []
        for p in prompts:
            text = enc_.decode(p)
            pairs = re.findall(r"- (\w+): (\w+)\.", text)
            asked = re.search(r"Q: (\w+)\?\nA:$", text).group(1)
            out.append(pairs[-1][1] if answerer == "last" else dict(pairs)[asked])
        return out

    monkeypatch.setattr(TB, "greedy_answers", fake_greedy)
    res = TB.binding_exact_match(tiny(vocab_size=257, block_size=256), enc, pairs=(1, 2, 4), n_episodes=5)
    assert res == pytest.approx({n: expected(n) for n in (1, 2, 4)})

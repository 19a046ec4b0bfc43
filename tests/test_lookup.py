"""dev/lookup.py: the value sites decode to the values, recording attention leaves the model's output
unchanged, and the key fit finds a name only a conv that reaches it can see."""
import numpy as np
import pytest
import torch

from conftest import assert_close, tiny_gpt
from data import tasks
from dev import lookup as LK


def test_value_sites_decode_to_each_persons_value(enc):
    rng = np.random.default_rng(0)
    for n in (2, 4, 8):
        ep = tasks.make_shared(rng, n, split="train")
        ids, sites = LK.value_sites(enc, ep)
        assert sites is not None and len(sites) == n
        for person, (value, toks) in sites.items():
            assert enc.decode(ids[toks[0]:toks[-1] + 1]) == " " + value, person
        values = [v for v, _ in sites.values()]                         # two people may share a value:
        unique = sorted(p for p, (v, _) in sites.items() if values.count(v) == 1)   # their questions are skipped
        qs = LK.questions(ep, sites)
        assert sorted(p for _, p in qs) == unique and all(p in q.q for q, p in qs)


def test_attention_capture_keeps_the_output_and_gives_each_layers_softmax_row():
    model = tiny_gpt(n_layer=3).eval()
    x, sdpa = torch.randint(0, 64, (1, 20)), torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        ref, _ = model(x)
        with LK.Attention() as rows:
            got, _ = model(x)
    assert_close("logits with attention recorded", got, ref, atol=1e-5)
    assert torch.nn.functional.scaled_dot_product_attention is sdpa          # restored on exit
    assert len(rows) == 3
    for att in rows:
        assert att.shape == (2, 20)                                      # (n_head, S) of the last position
        assert_close("attention row sums", att.sum(-1), torch.ones(2), atol=1e-5)


def test_name_share_is_the_whom_pools_weight_on_the_name_by_hand():
    """Every channel scores a token 4 tanh(10 x_0): +4 where x_0 = 1 (the name), -4 where x_0 = -1. The pool at t
    covers its last name_pool tokens inside t's window, so the name's share is e^4 / (e^4 + m e^-4) with m
    the other tokens it covers, and 0 when the name sits in an earlier window."""
    from nanodeltamem import DeltaMemory, MemoryConfig
    mem = DeltaMemory(8, MemoryConfig(key_dim=8, name_dim=4, name_pool=6))
    with torch.no_grad():
        mem.W_s.weight.zero_()
        mem.W_s.weight[:, 0] = 10.0
    x = torch.zeros(20, 8)
    x[:, 0] = -1.0
    x[3, 0] = 1.0                                                        # the name at position 3
    share = lambda m: np.exp(4) / (np.exp(4) + m * np.exp(-4))
    assert LK.name_share(mem, x, 5, [3], L=20) == pytest.approx(share(5), rel=1e-5)     # covers 0..5: 5 others
    assert LK.name_share(mem, x, 8, [3], L=20) == pytest.approx(share(5), rel=1e-5)     # covers 3..8
    assert LK.name_share(mem, x, 9, [3], L=20) == 0.0                                # 4..9: out of reach
    assert LK.name_share(mem, x, 11, [3], L=10) == 0.0                               # window 10..19
    assert LK.name_span([5, 1, 2, 7, 1, 2, 9], [1, 2], 6) == [4, 5]      # the last one ending by position 6
    assert LK.name_span([5, 1, 2, 7, 1, 2, 9], [1, 2], 4) == [1, 2]
    assert LK.name_span([5, 1, 2, 7], [2, 7], 2) == []


@pytest.mark.parametrize("update", ["gated", "deltanet", "hebbian"])
def test_read_weights_rebuild_the_state_read_and_the_erase_of_a_repeated_key(update):
    """Σ_t w_t v_t is the read of the state the scan leaves, per row, for each rule; and a key written twice
    at β = 1 keeps only its last value under the delta rule (weights 0 then 1), both under hebbian (1, 1)."""
    from nanodeltamem import delta_rule_scan
    g = torch.Generator().manual_seed(0)
    T, dk, r, A = 12, 6, 3, 4
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)
    k, q, v = unit(T, dk), unit(A, dk), torch.randn(T, r, generator=g)
    beta, lam = torch.rand(T, r, generator=g), 0.5 + 0.5 * torch.rand(T, r, generator=g)
    decay, erase = {"gated": (lam, True), "deltanet": (False, True), "hebbian": (False, False)}[update]
    keep = lam if update == "gated" else torch.ones(T, r)
    _, S = delta_rule_scan(q[None, None, :1].expand(1, 1, T, dk), k[None, None], v[None, None], beta[None, None],
                           decay=decay[None, None] if torch.is_tensor(decay) else decay, erase=erase)
    w = LK.read_weights(k, beta, keep, q, erase)                        # (A, r, T)
    assert_close("Σ_t w_t v_t against S q̃", (w * v.T[None]).sum(-1), q @ S[0, 0].T, atol=1e-5)
    twice = LK.read_weights(k[:1].expand(2, dk), torch.ones(2, r), torch.ones(2, r), k[:1], erase)  # (1, r, 2)
    assert_close("a key written twice", twice[0, 0], torch.tensor([0.0 if erase else 1.0, 1.0]), atol=1e-6)


@pytest.mark.parametrize("batch,steps", [(0, 200), (32, 400)])   # every question a step, or random batches
def test_key_fit_binds_a_name_only_a_conv_that_reaches_it_sees(batch, steps):
    """Keys: offset 0 holds the shared attribute, offset 1 the person's name; the query holds the asked
    person's name at offset 0. K = 1 keys see only the attribute (chance 1/N); K = 2 see the name."""
    g = torch.Generator().manual_seed(0)
    N, d, names = 4, 16, torch.randn(50, 16, generator=torch.Generator().manual_seed(1))
    attr = torch.randn(d, generator=g)

    def make(n):
        who = torch.stack([torch.randperm(50, generator=g)[:N] for _ in range(n)])   # (n, N) people
        asked = torch.randint(0, N, (n,), generator=g)
        keys = torch.stack([attr.expand(n, N, d), names[who]], 2)         # (n, N, 2, d): h_t, h_{t-1}
        queries = torch.stack([names[who[torch.arange(n), asked]], torch.zeros(n, d)], 1)  # (n, 2, d)
        return keys, queries, asked

    train, test = make(400), make(200)
    _, top1_k1 = LK.fit_keys((train[0][:, :, :1], train[1][:, :1], train[2]),
                             (test[0][:, :, :1], test[1][:, :1], test[2]), key_dim=8, steps=steps, seed=0, batch=batch)
    _, top1_k2 = LK.fit_keys(train, test, key_dim=8, steps=steps, seed=0, batch=batch)
    assert top1_k1 < 0.45                                                # identical keys: at most chance-ish
    assert top1_k2 > 0.9


@pytest.mark.parametrize("flag,says", [("--n_people=1", "--n_people"), ("--conv=0,4", "--conv"),
                                       ("--fit_lr=0", "--fit_lr"), ("--fit_batch=-1", "--fit_batch"),
                                       ("--values=cities", "--values"),
                                       ("--seed=0", "not found")])
def test_bad_input_stops_with_a_one_line_error_before_any_work(flag, says, tmp_path):
    from data.config import UserError
    with pytest.raises(UserError) as err:                                # a missing backbone is checked last
        LK.main([flag, f"--backbone={tmp_path / 'missing.pt'}"])
    assert says in str(err.value) and "\n" not in str(err.value), str(err.value)

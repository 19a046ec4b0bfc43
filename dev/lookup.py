"""
Binding by name, two instruments: can the backbone, and can a memory key, find a fact by its person?

    python dev/lookup.py                                   # both, on out/backbone.pt, N = 4 (about 2 CPU-minutes)
    python dev/lookup.py --backbone=CKPT --n_people=2 --conv=1,4,8 --layers=1,2
    python dev/lookup.py --conv=8 --fit_batch=64 --fit_steps=300 --fit_lr=3e-2   # as a training run would fit them
    python dev/lookup.py --memory=out/memory_deltamem.pt   # 3. only: a trained memory's reads (~20 s)
    python dev/lookup.py --memory=out/memory_deltamem.pt --values=nouns   # ... of words it never wrote

Both use episodes where N people share one attribute (data/tasks.make_shared: "Alice lives in Paris.",
"Bob lives in Rome.", ... then "Where does Alice live?"), so the attribute's type alone finds the
asked fact at chance 1/N.

1. attention   With the history in context, each layer's attention at the answer slot (the prompt's
               last token, "A:"), summed over each stated value's tokens. Per layer, the head that looks
               at the values most: its mass on the asked person's value, on one rival's, and how often
               the asked value gets more than every rival ("top", chance 1/N). A lookup by name gives
               top near 1; a lookup by the attribute's type spreads its mass evenly (top near 1/N).
2. keys        Could a memory key and query find the person in this backbone's layer inputs? A key
               k = L2norm(tanh(Σ_j w_j ∘ A_k h_{t-j})) at each value's first token and a query q (the same
               with u_j, A_q) at the answer slot of the question read alone, as DeltaMemory computes them
               with key_conv = query_conv = K. Only A_k, A_q, w, u are fitted, by an InfoNCE over the N
               facts (train-side episodes), then scored on other train-side episodes: top-1 of q·k (chance 1/N).
               K = 1 is the paper's memory; the name sits 3-5 tokens before a value and 5-8 before the
               answer slot, so only a conv that reaches it can bind by name.
3. a memory    (--memory=CKPT, instead of 1 and 2) A trained memory on the same kind of episodes, 0 history
               tokens: per memory layer, how often its read query at the answer slot scores the asked
               fact's write key above the other people's (top-1, chance 1/N; with --name_dim also its whom
               part alone), and the first answer token, teacher-forced: the asked person's value, a rival's
               (the attribute alone gives 1/N and 1 - 1/N), or neither; and each answer token's accuracy.
               --values=nouns | made_up: the values are words no training episode wrote as a value (the
               train-side recall nouns, or tasks.novel_values): does the read still find the fact, and
               which answer token is lost?
               Why a read that finds the fact can still answer a rival: the read is linear, S q̃ carries
               every stored value at its weight q̃·k̃, so it prints the asked fact's weight beside the sum
               of the rivals' weights, and (with a whom part) how much of the whom pool's weight lands on
               the person's name, at the key (the value's first token) and at the query (the answer slot).
               The same under the memory's own rule (read_weights: β, decay and the delta rule's erase, every
               token's write counted), beside the same writes without the erase: what the erase takes
               away. And the query's what and whom parts against the keys' (cos): which part tells the
               asked fact from its rivals.
"""
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from train_backbone import load_backbone, load_memory, run_cli  # noqa: E402
import train_memory as TM  # noqa: E402
from nanodeltamem import IGNORE_INDEX  # noqa: E402
from data import tasks  # noqa: E402
from data.config import UserError, parse_config  # noqa: E402
from data.prepare import load_tokenizer  # noqa: E402

DEFAULTS = dict(backbone="out/backbone.pt", data_dir="data/pydoc", n_people=4, episodes=40, fit_episodes=300,
                conv="1,4,8", layers="1,2", key_dim=8, fit_steps=600, fit_lr=1e-2, fit_batch=0, seed=0, memory="",
                values="pool")


class Attention:
    """with Attention() as att: the model's forward records every layer's attention weights of its last
    position, att[layer] (n_head, S), by computing SDPA by hand (same output)."""

    def __enter__(self):
        self.sdpa, self.rows = F.scaled_dot_product_attention, []

        def sdpa(q, k, v, is_causal=False, dropout_p=0.0, **kw):
            T, S = q.size(-2), k.size(-2)
            att = (q @ k.transpose(-1, -2)) / q.size(-1) ** 0.5           # (B, nh, T, S)
            if is_causal:
                att = att.masked_fill(torch.ones(T, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
            att = att.softmax(-1)
            self.rows.append(att[0, :, -1])                               # (nh, S) the last position's
            return att @ v
        F.scaled_dot_product_attention = sdpa
        return self.rows

    def __exit__(self, *exc):
        F.scaled_dot_product_attention = self.sdpa


def value_sites(enc, ep):
    """History token ids and, per stated fact (person, value), the token indices of its value in the
    statement line; None when the episode states some fact twice (the generator's shared episodes do not)."""
    hist = tasks.render_history(ep)
    ids = enc.encode_ordinary(hist)
    ends = np.cumsum([len(enc.decode_single_token_bytes(t)) for t in ids])  # byte offsets (the text is ASCII)
    sites = {}
    for _, person, attr, value in tasks.parse_facts(ep):
        if attr not in tasks.ATTRIBUTES or person in sites:
            return ids, None
        line = next(line for line in hist.split("\n") if person in line and " " + value in line)
        start = hist.index(line) + line.rfind(" " + value)               # the value's leading space
        first = int(np.searchsorted(ends, start, side="right"))          # the token that holds it
        sites[person] = (value, list(range(first, first + len(enc.encode_ordinary(" " + value)))))
    return ids, sites


def questions(ep, sites):
    """(question, asked person) for every question whose gold answer is one person's stated value."""
    out = []
    for q in ep.questions:
        asked = [p for p, (v, _) in sites.items() if v == q.a]
        if len(asked) == 1:
            out.append((q, asked[0]))
    return out


@torch.no_grad()
def attention_lookup(model, enc, episodes):
    """Per layer (n_head, 3): mean mass on the asked value, mean mass on one rival value, and the share of
    questions whose asked value gets more mass than every rival."""
    stats, count = np.zeros((len(model.blocks), model.config.n_head, 3)), 0
    for ep in episodes:
        ids, sites = value_sites(enc, ep)
        if not sites:
            continue
        for q, asked in questions(ep, sites):
            prompt = (ids + tasks.question_prompt(enc, q))[-model.config.block_size:]
            shift = len(ids) + len(tasks.question_prompt(enc, q)) - len(prompt)  # tokens cut on the left
            with Attention() as rows:
                model(torch.tensor([prompt]))
            for layer, att in enumerate(rows):
                mass = {p: att[:, [t - shift for t in toks if t >= shift]].sum(-1).numpy()
                        for p, (_, toks) in sites.items()}               # (nh,) per person
                rivals = [m for p, m in mass.items() if p != asked]
                stats[layer, :, 0] += mass[asked]
                stats[layer, :, 1] += np.mean(rivals, 0)
                stats[layer, :, 2] += np.all([mass[asked] > r for r in rivals], 0)
            count += 1
    return stats / max(count, 1)


def layer_inputs(model, layer, ids):
    """The attention input h (T, d) of `layer` on token ids."""
    seen = {}
    hook = model.blocks[layer].ln_1.register_forward_hook(lambda m, i, o: seen.__setitem__("h", o[0]))
    with torch.no_grad():
        model(torch.tensor([ids]))
    hook.remove()
    return seen["h"]


def lookback(h, t, K):
    """(K, d): h_t, h_{t-1}, ..., h_{t-K+1}, zeros before the sequence's start."""
    return torch.stack([h[t - j] if t >= j else torch.zeros_like(h[0]) for j in range(K)])


def key_features(model, enc, episodes, layer, K):
    """Key inputs (Qn, N, K, d) at each fact's first value token, query inputs (Qn, K, d) at the answer
    slot of the question read alone, and the asked fact's index (Qn,)."""
    keys, queries, asked_at = [], [], []
    for ep in episodes:
        ids, sites = value_sites(enc, ep)
        if not sites:
            continue
        h = layer_inputs(model, layer, ids)
        people = list(sites)
        ks = torch.stack([lookback(h, sites[p][1][0], K) for p in people])   # (N, K, d)
        for q, asked in questions(ep, sites):
            prompt = tasks.question_prompt(enc, q)
            keys.append(ks)
            queries.append(lookback(layer_inputs(model, layer, prompt), len(prompt) - 1, K))
            asked_at.append(people.index(asked))
    return torch.stack(keys), torch.stack(queries), torch.tensor(asked_at)


def fit_keys(train, test, key_dim, steps, seed, tau=0.1, lr=1e-2, batch=0):
    """Fit A_k, A_q, w, u by InfoNCE on train (Adam at lr; batch > 0: a random `batch` of questions a step,
    as training sees them, else all of them); (train, test) top-1 of the asked fact's key."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    K, d = train[1].shape[-2:]
    A_k, A_q = torch.nn.Linear(d, key_dim, bias=False), torch.nn.Linear(d, key_dim, bias=False)
    w, u = (torch.nn.Parameter(torch.full((K, key_dim), 1.0 / K)) for _ in range(2))  # DeltaMemory's init

    def logits(keys, queries):
        k = F.normalize(torch.tanh((A_k(keys) * w).sum(-2)), dim=-1)     # (Qn, N, d_k)
        q = F.normalize(torch.tanh((A_q(queries) * u).sum(-2)), dim=-1)  # (Qn, d_k)
        return (k @ q[..., None])[..., 0] / tau                          # (Qn, N)
    opt = torch.optim.Adam([*A_k.parameters(), *A_q.parameters(), w, u], lr=lr)
    for _ in range(steps):
        i = torch.randint(0, len(train[2]), (batch,), generator=g) if batch else slice(None)
        loss = F.cross_entropy(logits(train[0][i], train[1][i]), train[2][i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return tuple((logits(*s[:2]).argmax(-1) == s[2]).float().mean().item() for s in (train, test))


@torch.no_grad()
def name_share(mem, x, t, span, L, e=None):
    """Of the whom pool at stream position t of x (T, d) (causal_pool over the last name_pool tokens, restarting
    every L tokens; e (T, d) the tokens' embeddings, for a score that reads them), the weight on the positions
    in span, as a mean over the pool's channels."""
    lo = max(t - mem.cfg.name_pool + 1, t // L * L)                     # the pool's first token
    score = mem.pool_score(x[lo:t + 1], None if e is None else e[lo:t + 1])  # (t - lo + 1, H·n)
    w = torch.softmax(score, dim=0)                                      # (t - lo + 1, H·n) each channel's weights
    inside = [j - lo for j in span if lo <= j <= t]
    return float(w[inside].sum(0).mean()) if inside else 0.0


def name_span(ids, name_ids, end):
    """The positions of the last occurrence of name_ids in ids that ends at or before end (a list, or [])."""
    n = len(name_ids)
    for s in range(end - n + 1, -1, -1):
        if ids[s:s + n] == name_ids:
            return list(range(s, s + n))
    return []


def read_weights(k, beta, keep, q, erase=True):
    """The weight of every written token's value in the read after the last write, under the memory's own
    rule. Each state row is S_t = S_{t-1} (keep_t I - erase β_t k̃_t k̃_tᵀ) + β_t v_t k̃_tᵀ, linear in the
    values, so S_T q̃ = Σ_t w_t v_t with w_t = β_t (k̃_t · p_t), p_T = q̃ and p_{t-1} = keep_t p_t -
    erase β_t (k̃_t · p_t) k̃_t (the transitions after t, applied to q̃). erase=False gives the same writes
    without the delta rule's -S k term.
    k (T, d_k) unit keys, beta and keep (T, r), q (A, d_k) unit queries -> w (A, r, T), per state row."""
    p = q[:, None, :].expand(-1, beta.size(-1), -1).clone()            # (A, r, d_k)
    w = q.new_zeros(q.size(0), beta.size(-1), k.size(0))                 # (A, r, T)
    for t in range(k.size(0) - 1, -1, -1):
        kp = p @ k[t]                                                    # (A, r) k̃_t · p_t
        w[:, :, t] = beta[t] * kp
        p = keep[t][None, :, None] * p - (erase * beta[t] * kp)[..., None] * k[t]
    return w


@torch.no_grad()
def memory_lookup(model, enc, episodes):
    """A trained memory's reads on episodes written into it one at a time: per layer, the top-1 of the full
    query and of its whom part (None without one) over the episode's facts; the first answer token's
    (asked, rival, neither) shares; each of the first 4 answer tokens' accuracy, teacher-forced; and the
    first token's accuracy apart for first tokens that some training value starts with and for the rest;
    and per layer the read's weights (the asked fact's q̃·k̃, the sum of its rivals') and the whom pool's
    weight on the person's name at the key and at the query (None without a whom part)."""
    model.eval()
    top, top_whom, first, per_token = {i: [] for i in model.memories}, {i: [] for i in model.memories}, [], {}
    weights, shares = {i: [] for i in model.memories}, {i: [] for i in model.memories}
    ruled, parts = {i: [] for i in model.memories}, {i: [] for i in model.memories}
    trained = {enc.encode_ordinary(" " + v)[0] for vs in tasks.pools_for("train")["values"].values() for v in vs}
    by_seen = {True: [], False: []}                                      # first token right, by "seen in training"
    for ep in episodes:
        batch = tasks.collate_episodes(enc, [ep], model.gpt.config.block_size, enc.eot_token)
        pos, _, asked, _, _, _ = TM.binding_sites(enc, [ep], batch, model.gpt.config.block_size)[0]
        if not asked:
            continue
        model.reset_memory()
        with TM.LayerInputs(model) as seen:
            model(batch["hist"], write=True, mask=batch["mask"], seg=batch["seg"], logits=False)
            writes = dict(seen)
            logits, _ = model(batch["qx"])                               # (Q, Lq, V)
            reads = dict(seen)
        at, target = [p for _, p, _, _ in asked], torch.tensor([a for _, _, a, _ in asked])
        W, Q = batch["hist"].size(1), batch["qx"].size(1)
        L, Lq = batch["hist"].size(2), batch["qx"].size(-1)
        hist_ids, q_ids = batch["hist"][0].flatten().tolist(), batch["qx"][0].tolist()   # (W·L,), (Q, Lq)
        names = [next(p for p in tasks.pools_for("train")["names"]       # the asked person (train-side episodes)
                      if p in ep.questions[qi].q.replace("?", " ").replace("'s", " ").split()) for qi, _, _, _ in asked]
        real = batch["mask"].reshape(1, 1, -1, 1).float()                # padding neither writes nor decays
        for i, mem in model.memories.items():
            (x_w, e_w), (x_r, e_r) = TM.streams(writes[i], 1), TM.streams(reads[i], 1)  # (1, T, d) each
            k, _, beta, keep = (t[0] for t in mem.write_terms(x_w, W, real, e_w))  # (H, T, d_k), (H, T, r|1) x 2
            q = mem.read_query(x_r, Q, e=e_r)[0]                         # (H, Q·Lq, d_k)
            top[i] += ((q[:, at] @ k[:, pos].transpose(-1, -2)).mean(0).argmax(-1) == target).tolist()
            if mem.W_c is not None:
                kw, qw = mem.whom_unit(x_w, W, e_w)[0], mem.whom_unit(x_r, Q, e_r)[0]  # (H, T, n), (H, Q·Lq, n)
                top_whom[i] += ((qw[:, at] @ kw[:, pos].transpose(-1, -2)).mean(0).argmax(-1) == target).tolist()
                for (qi, p, a, _), name in zip(asked, names):            # the pool at the key and the query
                    name_ids = enc.encode_ordinary(" " + name)
                    t = int(pos[a])
                    shares[i].append((name_share(mem, x_w[0], t, name_span(hist_ids, name_ids, t), L, e_w[0]),
                                      name_share(mem, x_r[0], p, [qi * Lq + j for j in
                                                 name_span(q_ids[qi], name_ids, p - qi * Lq)], Lq, e_r[0])))
            s = (q[:, at] @ k[:, pos].transpose(-1, -2)).mean(0)        # (A, F) the read's weights
            own = s[torch.arange(len(target)), target]                   # (A,)
            weights[i] += list(zip(own.tolist(), (s.sum(-1) - own).tolist()))
            beta, keep = (g.expand(-1, -1, mem.cfg.rank) for g in (beta, keep))  # (H, T, r) each
            row = []
            for erase in (mem.cfg.rule()["erase"], False):               # its own rule, then without the erase
                w = torch.cat([read_weights(k[h], beta[h], keep[h], q[h, at], erase) for h in range(len(k))],
                              1).mean(1)                                 # (A, T) mean over every head's rows
                wf = w[:, pos]                                           # (A, F) at the facts' values
                own = wf[torch.arange(len(target)), target]              # (A,)
                rivals = ((wf ** 2).sum(-1) - own ** 2).clamp_min(0).sqrt()  # (A,) the rivals' weights' L2 norm
                row += [own, rivals, w.sum(-1) - wf.sum(-1)]             # ... and every other token's, summed
            ruled[i] += torch.stack(row, 1).tolist()
            if mem.W_c is not None:                                      # the query's parts against the keys'
                what = lambda a: F.normalize(torch.tanh(mem._heads(a, mem.what_dim)[0]), dim=-1)  # (H, T, d_k / n)
                row = []
                for kp, qp in ((what(mem.key_parts(x_w, W, e_w)[0]), what(mem.query_parts(x_r, Q, e=e_r)[0])),
                               (kw, qw)):                                # what, then whom (whom_unit above)
                    c = (qp[:, at] @ kp[:, pos].transpose(-1, -2)).mean(0)  # (A, F) cosines, mean over heads
                    own = c[torch.arange(len(target)), target]
                    row += [own, (c.sum(-1) - own) / max(c.size(1) - 1, 1)]  # the asked fact's, a rival's mean
                parts[i] += torch.stack(row, 1).tolist()
        y = batch["qy"][0]                                               # (Q, Lq)
        firsts = {v: enc.encode_ordinary(" " + v)[0] for v in {q.a for q in ep.questions if q.a != tasks.UNKNOWN}}
        for j, q in enumerate(ep.questions):
            if q.a in firsts:
                at_answer = (y[j] != IGNORE_INDEX).nonzero().flatten()[:-1]  # the answer's tokens, not "\n"
                pred = int(logits[j, at_answer[0]].argmax())
                first.append(0 if pred == firsts[q.a] else 1 if pred in firsts.values() else 2)
                by_seen[firsts[q.a] in trained].append(int(pred == firsts[q.a]))
                for n, t in enumerate(at_answer.tolist()[:4]):           # each token, the ones before it given
                    per_token.setdefault(n, []).append(int(logits[j, t].argmax() == y[j, t]))
    mean = lambda xs: float(np.mean(xs)) if xs else None
    shares_first = np.bincount(first, minlength=3) / max(len(first), 1)
    pairs = lambda xs: tuple(float(v) for v in np.mean(xs, 0)) if xs else None
    return ({i: (mean(top[i]), mean(top_whom[i])) for i in top}, shares_first, [mean(per_token[n]) for n in sorted(per_token)],
            {k: (mean(v), len(v)) for k, v in by_seen.items()},
            {i: (pairs(weights[i]), pairs(shares[i]), pairs(ruled[i]), pairs(parts[i])) for i in top})


def main(argv=None):
    cfg = parse_config(sys.argv[1:] if argv is None else argv, DEFAULTS)
    n, convs, layers = cfg["n_people"], [int(x) for x in str(cfg["conv"]).split(",")], \
        [int(x) for x in str(cfg["layers"]).split(",")]
    if not 2 <= n <= 16 or min(convs) < 1:
        raise UserError("--n_people must be in 2..16 and --conv a list of whole numbers >= 1, e.g. --conv=1,4,8")
    if not (cfg["fit_lr"] > 0 and cfg["fit_steps"] >= 1 and cfg["fit_batch"] >= 0):
        raise UserError("--fit_lr must be > 0, --fit_steps >= 1 and --fit_batch >= 0 (0: every question each step)")
    if cfg["values"] not in ("pool", "nouns", "made_up"):
        raise UserError(f"--values={cfg['values']!r} is not valid; choose pool, nouns or made_up")
    if not os.path.exists(cfg["backbone"]):
        raise UserError(f"backbone {cfg['backbone']} not found: train one with `python train_backbone.py`")
    model = load_backbone(cfg["backbone"])[0].eval()
    if not all(0 <= layer < len(model.blocks) for layer in layers):
        raise UserError(f"--layers={cfg['layers']}: this backbone has layers 0..{len(model.blocks) - 1}")
    enc = load_tokenizer(cfg["data_dir"])
    rng = np.random.default_rng(cfg["seed"])
    words = lambda: (None if cfg["values"] == "pool" else tasks.noun_values() if cfg["values"] == "nouns"
                     else tasks.novel_values(rng))
    held_out = [tasks.make_shared(rng, n, split="train", values=words())  # train-side: never tune on held-out
                for _ in range(cfg["episodes"])]
    if cfg["memory"]:
        if not os.path.exists(cfg["memory"]):
            raise UserError(f"memory {cfg['memory']} not found: train one with `python train_memory.py`")
        mem = load_memory(cfg["memory"], model)[0]
        tops, (a, r, other), per_token, by_seen, reads = memory_lookup(mem, enc, held_out)
        print(f"3. the memory {cfg['memory']} on {cfg['episodes']} train-side episodes, N = {n} people share one "
              f"attribute, values: {cfg['values']}, 0 history tokens (chance {1 / n:.2f})")
        for i, (full, whom) in tops.items():
            print(f"  layer {i}: the read query picks the asked fact's key {full:.2f}"
                  + (f", its whom part alone {whom:.2f}" if whom is not None else ""))
            weights, share, ruled, parts = reads[i]
            if weights is not None:
                print(f"    the read's weights q̃·k̃: the asked fact {weights[0]:.2f}, its {n - 1} rivals together "
                      f"{weights[1]:.2f}" + (f"; the whom pool's weight on the name: at the key {share[0]:.2f}, "
                                             f"at the query {share[1]:.2f}" if share is not None else ""))
                print(f"    under its own rule, S q̃ = Σ_t w_t v_t (β, decay and erase): w at the asked fact's value "
                      f"{ruled[0]:.3f}, the rivals' w (L2 norm) {ruled[1]:.3f}, every other token's w summed "
                      f"{ruled[2]:.3f}; the same writes without the erase: {ruled[3]:.3f}, {ruled[4]:.3f}, {ruled[5]:.3f}")
            if parts is not None:
                print(f"    the query's parts against the keys' (cos): what {parts[0]:.2f} to the asked fact's, "
                      f"{parts[1]:.2f} to a rival's; whom {parts[2]:.2f} to the asked fact's, {parts[3]:.2f} to a rival's")
        print(f"  first answer token: the asked person's value {a:.2f}, a rival's {r:.2f}, neither {other:.2f} "
              f"(the attribute alone: {1 / n:.2f}, {1 - 1 / n:.2f}, 0)")
        print(f"  answer tokens 1-{len(per_token)}, each given the ones before it: "
              + " ".join(f"{x:.2f}" for x in per_token))
        fmt = lambda acc_n: "none" if acc_n[0] is None else f"{acc_n[0]:.2f} ({acc_n[1]} answers)"
        print(f"  first token right when some training value starts with it: {fmt(by_seen[True])}; "
              f"when none does: {fmt(by_seen[False])}")
        return

    print(f"1. attention at the answer slot, history in context, N = {n} people share one attribute "
          f"({cfg['episodes']} episodes; top: chance {1 / n:.2f})")
    for layer, s in enumerate(attention_lookup(model, enc, held_out)):
        h = int(np.argmax(s[:, 0]))
        print(f"  layer {layer}: head {h}: on the asked value {s[h, 0]:.3f}, on a rival's {s[h, 1]:.3f}, "
              f"top {s[h, 2]:.2f} | top of every head: {' '.join(f'{x:.2f}' for x in s[:, 2])}", flush=True)

    fit = [tasks.make_shared(rng, n, split="train") for _ in range(cfg["fit_episodes"])]
    how = f"batches of {cfg['fit_batch']} questions" if cfg["fit_batch"] else "all of them a step"
    print(f"2. memory keys fitted to find the person (InfoNCE on {cfg['fit_episodes']} train-side episodes, "
          f"{how}, {cfg['fit_steps']} Adam steps at lr {cfg['fit_lr']:g}, d_k = {cfg['key_dim']}; "
          f"top-1 on {cfg['episodes']} others, chance {1 / n:.2f})")
    for layer in layers:
        for K in convs:
            train, test = (key_features(model, enc, eps, layer, K) for eps in (fit, held_out))
            tr, te = fit_keys(train, test, cfg["key_dim"], cfg["fit_steps"], cfg["seed"], lr=cfg["fit_lr"],
                              batch=cfg["fit_batch"])
            print(f"  layer {layer}, key_conv = query_conv = {K}: top-1 {te:.2f} (on the fitted episodes {tr:.2f})",
                  flush=True)


if __name__ == "__main__":
    run_cli(main)

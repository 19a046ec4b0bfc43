"""
Freeze the backbone, attach δ-mem, train only the memory, and judge it against every baseline.

    python train_memory.py                        # the main job: data, backbone, memories, results
    python train_memory.py --preset=cpu_long      # ~1 hour on a CPU: a backbone and memory that bind
    python train_memory.py --write=segment --heads=4 --out_dir=out-msw
    python train_memory.py --eval_only --memory=out/memory_deltamem.pt --episodes=my.jsonl
    python train_memory.py --demo=my_sessions.txt   # your own chat; questions after a line ---, or typed

An episode is a history (dated chat sessions) plus questions. Training, per batch of episodes:
  1. write pass: stream every history window through the frozen GPT with writes on; the state runs
     through all windows, gradients flow back through every write (BPTT);
  2. read pass: writes off, the context is only "Q: ...\\nA:" (plus optionally the last W history
     tokens); cross-entropy on the answer tokens only;
  3. + 0.01 (mean β of the write pass - 0.05)²: write sparingly.
Then every condition of design.md §5 is evaluated on the same held-out episodes.
"""
import json
import os
from dataclasses import asdict
import sys
import time

import numpy as np
import torch
import torch.nn as nn

from nanodeltamem import (DeltaMemGPT, MemoryConfig, autodetect_device, load_backbone, load_checkpoint,
                          IGNORE_INDEX, unfit)
from train_backbone import (UserError, parse_config, fmt_time, writable_dir, greedy_answers, model_logits,
                            normalize_answer, exact_match, check_positive, check_ranges, check_device, score)
import train_backbone

DEFAULTS = dict(
    preset="cpu",
    backbone="out/backbone.pt",   # trained first (train_backbone.py) when missing and left at default
    out_dir="out",
    data_dir="data/pydoc",
    task="msqa",                  # msqa | recall | mix
    episode_preset="small",       # size of the training/evaluation episodes (data/tasks.py presets)
    # the memory (nanodeltamem.MemoryConfig)
    key_dim=8, rank=8, heads=1, write="token", sides="qo", update="delta", gates="rowwise",
    layers="all", alpha=16.0, gate_bias=-1.5, init="paper", chunk_size=8, key_conv=1,
    # training
    max_iters=120, batch_size=16, learning_rate=1e-2, min_lr=1e-3, warmup_iters=30, grad_clip=1.0,
    beta_target=0.05, beta_reg=0.01, read_window=0, seed=1337, device="auto",
    read_window_share=1.0,        # share of steps whose questions see the last read_window history tokens
                                  # (the others see none): 0.5 trains one memory for both read budgets
    general_reg=0.5, general_len=64,  # + general_reg x LM loss of corpus text read with the episode's state
    compile=False,                # torch.compile the training step (checkpoints never hold its wrapper)
    log_interval=20, val_episodes=64,
    # evaluation
    baselines="lora,hebbian",     # which trained baselines to train and compare ("" for none)
    eval_episodes=24,             # held-out episodes per split (iid and every held-out axis)
    budget=64,                    # the non-zero read budget (history tokens in context)
    eval_only=False, memory="", episodes="",
    demo="",                      # a sessions text file (or - for stdin): answers with and without memory
)
PRESETS = {
    "cpu": dict(),
    # ~1 hour on a 2-core CPU: the 3000-step backbone and the recipe that makes a memory bind there
    # (a key that sees the name, no forgetting, two middle layers; README, *What makes a memory bind*)
    "cpu_long": dict(backbone="out-long/backbone.pt", out_dir="out-long", max_iters=1500, update="deltanet",
                     key_conv=4, layers="1,2", learning_rate=3e-2, gate_bias=0.0),
    "gpu": dict(batch_size=32, max_iters=2000, eval_episodes=200, val_episodes=256, chunk_size=64,
                backbone="out-gpu/backbone.pt", out_dir="out-gpu"),  # chunk 64: few sequential steps
}
EVAL_SPLITS = ["iid", "names", "values", "statements", "questions", "distractors", "structure", "all"]


# ----------------------------------------------------------------------------------------------
# the parametric baseline: LoRA-style adapters on the same two sides, no memory at all
# ----------------------------------------------------------------------------------------------

class LoRA(nn.Module):
    """dq = s B_q A_q h, do = s B_o A_o h: a fixed low-rank update of W_q (and of the layer output)."""

    def __init__(self, d, rank, alpha, sides):
        super().__init__()
        self.down = nn.ModuleDict({s: nn.Linear(d, rank, bias=False) for s in sides})
        self.up = nn.ModuleDict({s: nn.Linear(rank, d, bias=False) for s in sides})
        for up in self.up.values():
            nn.init.zeros_(up.weight)                                     # starts as the backbone
        self.scale = alpha / rank

    def forward(self, h, *unused):
        out = {s: self.scale * self.up[s](self.down[s](h)) for s in self.down}  # (B, T, d) each
        return out.get("q"), out.get("o")


class LoRAGPT(DeltaMemGPT):
    """Same interface as DeltaMemGPT (so one loop trains both), but nothing is ever written."""

    def __init__(self, gpt, mcfg, rank):
        super().__init__(gpt, mcfg)
        self.memories = nn.ModuleDict({i: LoRA(gpt.config.n_embd, rank, mcfg.alpha, mcfg.sides)
                                       for i in self.memories})

    def reset_memory(self):
        pass

    def memory_state(self):
        return []

    def forward(self, idx, targets=None, write=False, mask=None, seg=None, cache=None, logits=True):
        if write:
            return None, None                                            # a LoRA has no memory to write
        return super().forward(idx, targets, cache=cache)


def lora_rank_for(mcfg, d):
    """The LoRA rank whose parameter count matches one δ-mem layer's (q and o sides)."""
    H, dk, r = mcfg.heads, mcfg.key_dim, mcfg.rank
    gate = H * (r if mcfg.gates == "rowwise" else 1)
    mem = d * H * (2 * dk + r) + (d + 1) * gate + len(mcfg.sides) * d * H * r
    return max(1, round(mem / (2 * len(mcfg.sides) * d)))


# ----------------------------------------------------------------------------------------------
# building models
# ----------------------------------------------------------------------------------------------

def memory_config(cfg, **over):
    layers = None if cfg["layers"] == "all" else tuple(int(x) for x in str(cfg["layers"]).split(","))
    kw = dict(key_dim=cfg["key_dim"], rank=cfg["rank"], heads=cfg["heads"], write=cfg["write"],
              sides=cfg["sides"], update=cfg["update"], gates=cfg["gates"], layers=layers, alpha=cfg["alpha"],
              gate_bias=cfg["gate_bias"], init=cfg["init"], chunk_size=cfg["chunk_size"],
              key_conv=cfg["key_conv"])
    kw.update(over)
    try:
        return MemoryConfig(**kw)
    except ValueError as e:
        raise UserError(f"--{e}")                                       # its messages start with the field's name


def condition_name(cfg):
    """deltamem for the defaults, with suffixes for variants (deltamem_ssw, deltamem_msw4, ...)."""
    name = "deltamem"
    if cfg["write"] == "segment":
        name += "_ssw"
    if cfg["heads"] > 1:
        name += f"_msw{cfg['heads']}"
    if cfg["sides"] != "qo":
        name += f"_{cfg['sides']}"
    if cfg["update"] == "hebbian":
        name = name.replace("deltamem", "hebbian")
    if cfg["update"] == "deltanet":
        name += "_deltanet"
    return name


def memory_kind(cfg):
    """train_one's kind for the memory of cfg: hebbian, or deltamem for the delta rules."""
    return "hebbian" if cfg["update"] == "hebbian" else "deltamem"


def build(kind, gpt, cfg):
    if kind == "lora":
        mcfg = memory_config(cfg, update="delta")
        return LoRAGPT(gpt, mcfg, lora_rank_for(mcfg, gpt.config.n_embd))
    if kind == "hebbian":
        return DeltaMemGPT(gpt, memory_config(cfg, update="hebbian"))
    return DeltaMemGPT(gpt, memory_config(cfg))


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------

def sample_episodes(rng, cfg, n, split="train"):
    from data import tasks
    out = []
    for _ in range(n):
        task = cfg["task"] if cfg["task"] != "mix" else ("msqa" if rng.random() < 0.5 else "recall")
        if task == "recall" and cfg.get("n_pairs"):                     # a fixed number of pairs (ablate.py)
            out.append(tasks.make_recall(rng, cfg["episode_preset"], split, n_pairs=cfg["n_pairs"]))
            continue
        out.append(tasks.make_episode(rng, task=task, preset=cfg["episode_preset"], split=split))
    return out


def beta_mean(model):
    """Mean write strength over the last write pass (the regulariser's input)."""
    vals = [m.last_beta for m in model.memories.values() if getattr(m, "last_beta", None) is not None]
    return torch.stack(vals).mean() if vals else None


def episode_loss(model, batch, cfg, device, general=None):
    """Write pass over the histories, then the answer loss of the read pass (+ the β regulariser).

    general: optional (x, y) rows of ordinary corpus text (B, 1, L): read with the same states, their LM
    loss (x general_reg) teaches the memory to stay quiet on text that is not about its history.
    """
    model.reset_memory()
    model(batch["hist"].to(device), write=True, mask=batch["mask"].to(device), seg=batch["seg"].to(device),
          logits=False)
    _, loss = model(batch["qx"].to(device), batch["qy"].to(device))
    b = beta_mean(model)
    if b is not None:
        loss = loss + cfg["beta_reg"] * (b - cfg["beta_target"]) ** 2
    if general is not None and cfg["general_reg"] > 0:
        loss = loss + cfg["general_reg"] * model(general[0].to(device), general[1].to(device))[1]
    return loss


class CorpusRows:
    """Rows of ordinary text from the corpus part of train.bin (never task documents)."""

    def __init__(self, data_dir):
        from data.prepare import load_meta, load_split
        self.data = load_split(data_dir, "train")
        self.n = load_meta(data_dir).get("train_corpus_tokens", len(self.data) - 1)

    def batch(self, n_rows, length, rng):
        ix = rng.integers(0, max(1, self.n - length - 1), n_rows)
        rows = torch.stack([torch.from_numpy(self.data[i:i + length + 1].astype(np.int64)) for i in ix])
        return rows[:, None, :-1], rows[:, None, 1:]                     # x, y: (B, 1, L) each


def read_window_at(it, cfg):
    """History tokens before the questions at step `it`: read_window on a read_window_share of the steps,
    spread evenly (0.5: every other step), 0 on the rest; a function of `it` alone, so a resume agrees."""
    share = cfg["read_window_share"]
    return cfg["read_window"] if int((it + 1) * share) > int(it * share) else 0


def train_one(kind, name, gpt, enc, cfg, device):
    """Train one memory (or the LoRA baseline); resumes from / reuses <out_dir>/memory_<name>.pt."""
    from data import tasks
    torch.manual_seed(cfg["seed"])                                       # the same init whatever ran before
    model = build(kind, gpt, cfg).to(device)                             # (a backbone trained, other memories)
    step = torch.compile(model) if cfg["compile"] else model             # runs the steps; saves use model
    path = os.path.join(cfg["out_dir"], f"memory_{name}.pt")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["learning_rate"], weight_decay=0.0)
    start, history = 0, []
    if os.path.exists(path):
        try:
            ckpt = load_checkpoint(path, required=("memory", "mem_config", "backbone_hash"))
        except ValueError as e:
            raise UserError(str(e))
        if ckpt["backbone_hash"] != model.backbone_hash or ckpt.get("train_config", {}).get("kind") != kind:
            raise UserError(f"{path} belongs to another backbone or model; delete it or use another --out_dir")
        saved = {**asdict(MemoryConfig()), **ckpt["mem_config"]}         # fields added since: their defaults
        if saved != asdict(model.mcfg):                                  # e.g. another --rank with the same out_dir
            raise UserError(f"{path} holds a memory with {ckpt['mem_config']}, not {asdict(model.mcfg)}: "
                            f"delete it, use the same options, or use another --out_dir")
        try:
            model.memories.load_state_dict(ckpt["memory"])
            if "optimizer" in ckpt:
                opt.load_state_dict(ckpt["optimizer"])
        except (TypeError, ValueError, KeyError, RuntimeError) as e:    # other shapes, another optimizer
            raise UserError(str(unfit(path, e)))
        start, history = ckpt.get("iter_num", cfg["max_iters"]), ckpt.get("history", [])
        if start >= cfg["max_iters"]:
            print(f"[{name}] already trained ({path}, {start} iterations): reusing it")
            return model
        print(f"[{name}] resuming from {path} at iteration {start}")
    t, f = model.param_counts()
    print(f"[{name}] training {t:,} parameters ({100 * t / (t + f):.2f}% of {t + f:,}); backbone frozen")
    pad = enc.eot_token
    corpus = CorpusRows(cfg["data_dir"]) if cfg["general_reg"] > 0 else None
    val_eps = sample_episodes(np.random.default_rng(cfg["seed"] + 7), cfg, cfg["val_episodes"], split="train")

    def save(it):
        model.save_memory(path, optimizer=opt.state_dict(), iter_num=it, history=history,
                          train_config=dict(cfg, kind=kind))

    t0 = t_last = time.time()
    running = []
    it = start
    stop = train_backbone.GracefulStop(path)                             # Ctrl-C / kill: stop between iterations
    try:
        while it < cfg["max_iters"]:
            stop.check()
            rng = np.random.default_rng([cfg["seed"], it])                # batch depends only on it
            eps = sample_episodes(rng, cfg, cfg["batch_size"])
            batch = tasks.collate_episodes(enc, eps, gpt.config.block_size, pad, read_window_at(it, cfg))
            if batch["qx"].size(-1) > gpt.config.block_size:
                raise UserError(f"[{name}] a question of {batch['qx'].size(-1)} tokens (with --read_window="
                                f"{cfg['read_window']}) does not fit the backbone's block_size="
                                f"{gpt.config.block_size}: use a smaller --read_window or a larger backbone")
            for g in opt.param_groups:
                g["lr"] = train_backbone.lr_at(it, cfg)
            model.train()
            general = corpus.batch(cfg["batch_size"], cfg["general_len"], rng) if corpus else None
            loss = episode_loss(step, batch, cfg, device, general)
            if not torch.isfinite(loss):
                raise UserError(f"[{name}] loss became {loss.item()} at iteration {it}; the last good checkpoint "
                                f"is {path}. Try a lower --learning_rate (now {cfg['learning_rate']})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
            opt.step()
            running.append(loss.item())
            it += 1
            if it % cfg["log_interval"] == 0 or it == cfg["max_iters"]:
                acc = answer_accuracy(model, enc, val_eps, cfg, device)
                dt = (time.time() - t_last) / len(running)
                ntok = batch["hist"].numel() + batch["qx"].numel()
                b = beta_mean(model)
                print(f"[{name}] iter {it:4d}/{cfg['max_iters']} | loss {np.mean(running):.3f} | val answer acc "
                      f"{acc:.2f} | β {b.item() if b is not None else 0:.3f} | {dt * 1000:.0f} ms/iter | "
                      f"{ntok / dt:,.0f} tok/s | ETA {fmt_time(dt * (cfg['max_iters'] - it))}", flush=True)
                history.append(dict(iter=it, train=float(np.mean(running)), val_acc=acc))
                running, t_last = [], time.time()
                save(it)
    except KeyboardInterrupt:
        save(it)
        print(f"\ninterrupted at iteration {it}: saved {path}. Re-run the same command to resume.", flush=True)
        sys.exit(130)
    finally:
        stop.restore()
    save(it)
    print(f"[{name}] trained in {fmt_time(time.time() - t0)}; saved {path}")
    return model


@torch.no_grad()
def answer_accuracy(model, enc, episodes, cfg, device):
    """Teacher-forced accuracy: every answer token is the argmax (a fast proxy for exact match)."""
    from data import tasks
    model.eval()
    batch = tasks.collate_episodes(enc, episodes, model.gpt.config.block_size, enc.eot_token, cfg["read_window"])
    model.reset_memory()
    model(batch["hist"].to(device), write=True, mask=batch["mask"].to(device), seg=batch["seg"].to(device),
          logits=False)
    logits, _ = model(batch["qx"].to(device))
    y = batch["qy"].flatten(0, 1).to(device)                            # (B·Q, Lq)
    ok = (logits.argmax(-1) == y) | (y == IGNORE_INDEX)
    has = (y != IGNORE_INDEX).any(-1)
    model.train()
    return float(ok.all(-1)[has].float().mean())


# ----------------------------------------------------------------------------------------------
# evaluation: every condition on the same held-out episodes
# ----------------------------------------------------------------------------------------------

STOPWORDS = set("q a the is does did what where which who in of to and at as s his her their now before "
                "after was we that it be has have with".split())


def words(text):
    import re
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in STOPWORDS}


def retrieval_context(enc, ep, q, budget):
    """Textual memory: history lines ranked by word overlap with the question, as many as fit the
    budget, put back in their original order."""
    lines = [(i, line) for i, line in enumerate(l for s in ep.sessions for l in s)]
    qw = words(q.q)
    ranked = sorted(lines, key=lambda il: (-len(words(il[1]) & qw), -il[0]))
    chosen, used = [], 0
    for i, line in ranked:
        if not words(line) & qw:
            break
        n = len(enc.encode_ordinary(line + "\n"))
        if used + n <= budget:
            chosen.append((i, line))
            used += n
    return enc.encode_ordinary("".join(line + "\n" for _, line in sorted(chosen)))


@torch.no_grad()
def write_states(model, enc, episodes, device, chunk=32):
    """Write every episode's history; returns, per memory layer, the final states (E, H, r, d_k)."""
    from data import tasks
    model.eval()
    per_layer = None
    for s in range(0, len(episodes), chunk):
        b = tasks.collate_episodes(enc, episodes[s:s + chunk], model.gpt.config.block_size, enc.eot_token)
        model.reset_memory()
        model(b["hist"].to(device), write=True, mask=b["mask"].to(device), seg=b["seg"].to(device), logits=False)
        states = model.memory_state()
        per_layer = states if per_layer is None else [torch.cat([a, x]) for a, x in zip(per_layer, states)]
    return per_layer


def run_condition(enc, episodes, context, model=None, gpt=None, device="cpu"):
    """Answer every question of every episode with the given read context; returns predictions."""
    from data import tasks
    # room for the longest gold answer (+ the newline): a 12-token answer must be decodable too
    new_tokens = max([6] + [len(enc.encode_ordinary(f" {q.a}\n")) for ep in episodes for q in ep.questions])
    block = (model.gpt if model is not None else gpt).config.block_size - new_tokens
    if block < 8:
        raise UserError(f"an answer of {new_tokens - 1} tokens leaves no room for its question in the backbone's "
                        f"block of {block + new_tokens} tokens: use shorter answers")
    prompts, owner, hist = [], [], []
    for e, ep in enumerate(episodes):
        for q in ep.questions:
            ask = tasks.question_prompt(enc, q)
            prompts.append((context(ep, q) + ask)[-block:])
            owner.append(e)
            hist.append(max(0, len(prompts[-1]) - len(ask)))             # history tokens actually kept
    hist_tokens = float(np.mean(hist))
    if model is None:
        fn = model_logits(gpt, device)
    else:
        states, read = write_states(model, enc, episodes, device), model_logits(model, device)
        def fn(idx, rows, cache):
            ids = torch.tensor([owner[r] for r in rows], device=device)
            model.set_memory_state([s[ids] for s in states])
            return read(idx, rows, cache)
    return greedy_answers(fn, prompts, enc, new_tokens), hist_tokens


def score_condition(preds, episodes):
    qs = [q for ep in episodes for q in ep.questions]
    per_family = score(preds, [q.a for q in qs], [q.family for q in qs])
    macro = per_family.pop("macro")
    stale = [normalize_answer(p) in {normalize_answer(s) for s in q.stale}    # answered an outdated value
             for p, q in zip(preds, qs) if q.family == "update" and q.stale]
    return dict(macro_em=macro, per_family=per_family, stale_rate=float(np.mean(stale)) if stale else None,
                n_questions=len(qs))


def conditions(cfg, enc, gpt, memories):
    """name -> (context function, model or None). memories: {name: trained model}."""
    from data import tasks
    W = cfg["budget"]
    none = lambda ep, q: []
    full = lambda ep, q: enc.encode_ordinary(tasks.render_history(ep))
    recent = lambda ep, q: tasks.recent_tokens(enc, ep, W)
    conds = {"no_history": (none, None), "full_context": (full, None), "recent_window": (recent, None),
             "retrieval": (lambda ep, q: retrieval_context(enc, ep, q, W), None)}
    for name, m in memories.items():
        conds[name] = (none, m)
        conds[f"{name}_w{W}"] = (recent, m)
        if name.startswith("deltamem"):
            conds[f"{name}_full_context"] = (full, m)
    return conds


def evaluate(cfg, enc, gpt, memories, device, episodes_by_split=None):
    from data import tasks
    if episodes_by_split is None:
        task = "msqa" if cfg["task"] in ("msqa", "mix") else "recall"
        episodes_by_split = {s: tasks.make_episodes(cfg["eval_episodes"], seed=10_000 + i, task=task,
                                                    preset=cfg["episode_preset"], split=s)
                             for i, s in enumerate(EVAL_SPLITS)}
    all_eps = [ep for eps in episodes_by_split.values() for ep in eps]
    conds = conditions(cfg, enc, gpt, memories)
    results, per_split = {}, {}
    qs = [q for ep in all_eps for q in ep.questions]
    outcomes = dict(family=[q.family for q in qs], correct={},          # per question: for the intervals
                    episode=[e for e, ep in enumerate(all_eps) for _ in ep.questions])
    t0 = time.time()
    print(f"evaluating {len(conds)} conditions on {len(all_eps)} held-out episodes "
          f"({len(qs)} questions; splits: {', '.join(episodes_by_split)})")
    for n, (name, (ctx, model)) in enumerate(conds.items()):
        preds, hist_tokens = run_condition(enc, all_eps, ctx, model, gpt, device)
        res = score_condition(preds, all_eps)
        params = model.param_counts()[0] if model is not None else 0
        results[name] = dict(res, history_tokens_in_context=hist_tokens, trainable_params=params)
        outcomes["correct"][name] = [exact_match(p, q.a) for p, q in zip(preds, qs)]
        i = 0
        for split, eps in episodes_by_split.items():
            nq = sum(len(e.questions) for e in eps)
            per_split.setdefault(split, {})[name] = score_condition(preds[i:i + nq], eps)["macro_em"]
            i += nq
        el = time.time() - t0
        print(f"  {name:28s} macro EM {res['macro_em']:.3f} | history tokens {hist_tokens:6.1f} | "
              f"ETA {fmt_time(el / (n + 1) * (len(conds) - n - 1))}", flush=True)
    return results, per_split, outcomes


@torch.no_grad()
def general_val_loss(cfg, enc, gpt, model, device, n_batches=8):
    """LM loss on held-out corpus text: bare backbone vs memory attached after an unrelated write."""
    from data import tasks
    from data.prepare import load_meta, load_split
    data = load_split(cfg["data_dir"], "val")
    n_corpus = load_meta(cfg["data_dir"]).get("val_corpus_tokens", len(data))
    T = gpt.config.block_size
    gen = torch.Generator().manual_seed(0)
    ix = torch.randint(max(1, n_corpus - T - 1), (n_batches * 8,), generator=gen).tolist()  # corpus text only
    x = torch.stack([torch.from_numpy(data[i:i + T].astype(np.int64)) for i in ix]).to(device)
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + T].astype(np.int64)) for i in ix]).to(device)
    base = float(np.mean([gpt(xb, yb)[1].item() for xb, yb in zip(x.split(8), y.split(8))]))
    eps = tasks.make_episodes(len(ix), seed=4242, task="msqa", preset=cfg["episode_preset"], split="iid")
    states = write_states(model, enc, eps, device)                      # an unrelated history
    losses = []
    for s in range(0, len(ix), 8):
        model.set_memory_state([st[s:s + 8] for st in states])
        losses.append(model(x[s:s + 8], y[s:s + 8])[1].item())
    return dict(backbone=base, with_memory=float(np.mean(losses)))


def results_table(results):
    fams = sorted({f for r in results.values() for f in r["per_family"]})
    head = "| condition | history tokens in context | trainable params | macro EM | " + " | ".join(fams) + " |"
    rows = [head, "|" + "---|" * (4 + len(fams))]
    for name, r in results.items():
        cells = [f"{r['per_family'].get(f, float('nan')):.2f}" for f in fams]
        rows.append(f"| {name} | {r['history_tokens_in_context']:.0f} | {r['trainable_params']:,} | "
                    f"**{r['macro_em']:.3f}** | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def resampled_macro(correct, family, counts):
    """Macro EM of one condition in every bootstrap resample. correct (Q,) per question; family (Q,) its
    family; counts (n, Q) how often the resample drew the question's episode. (n,)"""
    fams = sorted(set(family))
    onehot = (np.asarray(family)[:, None] == np.asarray(fams)[None]).astype(float)  # (Q, F)
    hits = (counts * np.asarray(correct, dtype=float)) @ onehot         # (n, F) right answers per family
    asked = counts @ onehot                                              # (n, F) questions per family
    per = np.where(asked > 0, hits / np.maximum(asked, 1), np.nan)       # a family not drawn: left out
    return np.nanmean(per, axis=1)                                       # (n,)


def ratio_intervals(outcomes, pairs, n=1000, seed=0, level=0.9):
    """Bootstrap intervals of ratios: resample the held-out episodes with replacement (an episode's
    questions move together), rescore every condition, and keep the middle `level` of each ratio.
    pairs: {key: (condition, [baselines])} for the ratio condition / best baseline, the best taken again
    in every resample. Returns {key: [low, high] or None (a baseline scored 0 in some resample)}."""
    episode = np.asarray(outcomes["episode"])
    E = int(episode.max()) + 1
    counts = np.random.default_rng(seed).multinomial(E, np.full(E, 1 / E), size=n)[:, episode]  # (n, Q)
    names = {c for num, dens in pairs.values() for c in (num, *dens)}
    m = {c: resampled_macro(outcomes["correct"][c], outcomes["family"], counts) for c in sorted(names)}  # (n,) each
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    out = dict(level=level, resamples=n)
    for key, (num, dens) in pairs.items():
        best = np.max([m[d] for d in dens], axis=0)                      # (n,)
        out[key] = [float(x) for x in np.percentile(m[num] / best, [lo, hi])] if (best > 0).all() else None
    return out


def ratios(results, dm_name, budget, outcomes=None):
    """δ-mem / frozen backbone and δ-mem / best non-δ-mem, at 0 history tokens (and at the budget);
    with per-question outcomes, also their 90% bootstrap intervals over the episodes (ci90)."""
    ratio = lambda a, b: a / b if b > 0 else None                      # None: the baseline scored 0
    dm = results[dm_name]["macro_em"]
    non0 = {n: r["macro_em"] for n, r in results.items()
            if not n.startswith("deltamem") and r["history_tokens_in_context"] < 0.5}
    best0 = max(non0, key=non0.get)
    out = dict(vs_frozen_backbone=ratio(dm, results["no_history"]["macro_em"]),
               vs_best_non_deltamem=ratio(dm, non0[best0]), best_non_deltamem=best0)
    pairs = dict(vs_frozen_backbone=(dm_name, ["no_history"]), vs_best_non_deltamem=(dm_name, sorted(non0)))
    w = f"{dm_name}_w{budget}"
    if w in results:
        nonw = {n: r["macro_em"] for n, r in results.items() if not n.startswith("deltamem")
                and 0.5 <= r["history_tokens_in_context"] <= budget + 0.5}
        if nonw:
            bw = max(nonw, key=nonw.get)
            out[f"vs_best_non_deltamem_at_{budget}"] = ratio(results[w]["macro_em"], nonw[bw])
            out[f"best_non_deltamem_at_{budget}"] = bw
            pairs[f"vs_best_non_deltamem_at_{budget}"] = (w, sorted(nonw))
    if outcomes is not None:
        out["ci90"] = ratio_intervals(outcomes, pairs)
    return out


def write_results(cfg, results, per_split, general, dm_name, extra=None, outcomes=None):
    out = dict(conditions=results, per_split=per_split, general_val_loss=general,
               ratios=ratios(results, dm_name, cfg["budget"], outcomes), config=cfg, **(extra or {}))
    path = os.path.join(cfg["out_dir"], "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(path + ".tmp", path)
    table = results_table(results)
    r = out["ratios"]
    x = lambda v: f"**{v:.2f}x**" if v is not None else "n/a (the baseline scored 0)"
    ci = lambda key: (f" (90% bootstrap interval over the episodes: {r['ci90'][key][0]:.2f}x–{r['ci90'][key][1]:.2f}x)"
                      if r.get("ci90", {}).get(key) else "")
    md = (f"# Results ({cfg['task']}, episodes: {cfg['episode_preset']}, held-out splits: "
          f"{', '.join(per_split)})\n\n{table}\n\n"
          f"- δ-mem / frozen backbone (0 history tokens): {x(r['vs_frozen_backbone'])}{ci('vs_frozen_backbone')}\n"
          f"- δ-mem / best non-δ-mem at 0 history tokens ({r['best_non_deltamem']}): "
          f"{x(r['vs_best_non_deltamem'])}{ci('vs_best_non_deltamem')}\n")
    W = cfg["budget"]
    if f"vs_best_non_deltamem_at_{W}" in r:
        md += (f"- δ-mem / best non-δ-mem at {W} history tokens ({r[f'best_non_deltamem_at_{W}']}): "
               f"{x(r[f'vs_best_non_deltamem_at_{W}'])}{ci(f'vs_best_non_deltamem_at_{W}')}\n")
    if general:
        md += (f"- general validation loss: backbone {general['backbone']:.4f}, with memory attached after an "
               f"unrelated write {general['with_memory']:.4f} "
               f"({100 * (general['with_memory'] / general['backbone'] - 1):+.2f}%)\n")
    md += "\nmacro EM per held-out split:\n\n| condition | " + " | ".join(per_split) + " |\n|---|" + \
          "---|" * len(per_split) + "\n"
    for name in results:
        md += f"| {name} | " + " | ".join(f"{per_split[s][name]:.2f}" for s in per_split) + " |\n"
    tmp = os.path.join(cfg["out_dir"], "results.md.tmp")
    with open(tmp, "w") as f:                                            # atomic: tmp file, then rename
        f.write(md)
    os.replace(tmp, os.path.join(cfg["out_dir"], "results.md"))
    print("\n" + md)
    return out


# ----------------------------------------------------------------------------------------------
# the main job
# ----------------------------------------------------------------------------------------------

def ensure_backbone(cfg):
    """Load the backbone; train it first (saying so) when the default checkpoint is missing."""
    path = cfg["backbone"]
    ours = path in (DEFAULTS["backbone"], PRESETS.get(cfg["preset"], {}).get("backbone"))
    args = [f"--preset={cfg['preset']}", f"--out_dir={os.path.dirname(path) or '.'}", f"--data_dir={cfg['data_dir']}"]
    if not os.path.exists(path):
        if not ours:
            raise UserError(f"backbone checkpoint {path} not found: train one with "
                            f"`python train_backbone.py --out_dir={os.path.dirname(path) or '.'}`")
        print(f"{path} not found: pretraining the backbone first (python train_backbone.py "
              f"--preset={cfg['preset']})")
        train_backbone.train(parse_config(args, train_backbone.DEFAULTS, train_backbone.PRESETS))
    elif ours:                                                           # an interrupted pretraining resumes
        try:
            ckpt = load_checkpoint(path, required=("model", "config"))
        except ValueError as e:
            raise UserError(str(e))
        done, total = ckpt.get("iter_num", 0), ckpt.get("train_config", {}).get("max_iters", 0)
        if done < total:
            print(f"{path} stopped at iteration {done} of {total}: resuming its pretraining first")
            train_backbone.train(parse_config(args + ["--resume"], train_backbone.DEFAULTS, train_backbone.PRESETS))
    try:
        gpt, ckpt = load_backbone(path)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e))
    return gpt, ckpt


def check_config(cfg):
    """Every flag's range, before any work starts (the checks that need the backbone: check_fits)."""
    from data import tasks
    check_positive(cfg, ("max_iters", "batch_size", "learning_rate", "eval_episodes", "log_interval"))
    if cfg["task"] not in ("msqa", "recall", "mix"):
        raise UserError(f"--task={cfg['task']!r} is not valid; choose one of msqa, recall, mix")
    if cfg["episode_preset"] not in tasks.PRESETS:
        raise UserError(f"--episode_preset={cfg['episode_preset']!r} is not valid; choose one of "
                        f"{', '.join(tasks.PRESETS)}")
    whole = lambda lo: (lambda v: v >= lo, f"a whole number >= {lo}")
    check_ranges(cfg, dict(key_dim=whole(1), rank=whole(1), heads=whole(1), chunk_size=whole(1),
        key_conv=whole(1), budget=whole(1), val_episodes=whole(1), warmup_iters=whole(0), read_window=whole(0),
        min_lr=(lambda v: 0 <= v <= cfg["learning_rate"], "a number in [0, --learning_rate]"),
        grad_clip=(lambda v: v > 0, "a number > 0, e.g. 1.0"), alpha=(lambda v: v > 0, "a number > 0, e.g. 16"),
        beta_target=(lambda v: 0 <= v <= 1, "a number in [0, 1], e.g. 0.05"),
        beta_reg=(lambda v: v >= 0, "a number >= 0, e.g. 0.01"),
        general_reg=(lambda v: v >= 0, "a number >= 0, e.g. 0.5 (0 turns it off)"), general_len=whole(1),
        read_window_share=(lambda v: 0 <= v <= 1, "a number in [0, 1], e.g. 0.5")))
    check_device(cfg["device"])
    if cfg["layers"] != "all" and not all(x.strip().isdigit() for x in str(cfg["layers"]).split(",")):
        raise UserError(f"--layers={cfg['layers']} is not valid: use all or comma-separated layer indices, e.g. 0,2")
    for base in [b for b in cfg["baselines"].split(",") if b]:
        if base not in ("lora", "hebbian"):
            raise UserError(f"--baselines: unknown baseline {base!r}; choose from lora, hebbian (or an empty list)")
    memory_config(cfg)                                                   # write, sides, update, gates, init


def check_fits(cfg, gpt):
    """The memory flags that depend on the backbone: rank within the width, layers that exist."""
    d, n = gpt.config.n_embd, gpt.config.n_layer
    if cfg["rank"] > d:
        raise UserError(f"--rank={cfg['rank']} is larger than the backbone's width {d}: use 1..{d}")
    layers = memory_config(cfg).layers or ()
    if any(i >= n for i in layers) or len(set(layers)) != len(layers):
        raise UserError(f"--layers={cfg['layers']}: the backbone has layers 0..{n - 1}; use all or distinct "
                        f"indices among them")


def main(argv=None):
    cfg = parse_config(sys.argv[1:] if argv is None else argv, DEFAULTS, PRESETS)
    check_config(cfg)
    writable_dir(cfg["out_dir"])
    demo_in = demo_inputs(cfg) if cfg["demo"] else None                 # bad demo input fails before any loading
    from data.prepare import load_tokenizer
    train_backbone.ensure_data(cfg["data_dir"])
    enc = load_tokenizer(cfg["data_dir"])
    device = autodetect_device() if cfg["device"] == "auto" else cfg["device"]
    torch.manual_seed(cfg["seed"])
    gpt, bckpt = ensure_backbone(cfg)
    if gpt.config.vocab_size != enc.n_vocab:
        raise UserError(f"backbone {cfg['backbone']} has vocabulary {gpt.config.vocab_size} but {cfg['data_dir']} "
                        f"has {enc.n_vocab}: use the data it was trained on (--data_dir)")
    gpt.to(device)
    if cfg["eval_only"]:
        return eval_only(cfg, enc, gpt, device)
    if demo_in is not None:
        return demo(enc, gpt, device, *demo_in)
    check_fits(cfg, gpt)
    memories = {}
    dm_name = condition_name(cfg)
    memories[dm_name] = train_one(memory_kind(cfg), dm_name, gpt, enc, cfg, device)
    for base in [b for b in cfg["baselines"].split(",") if b]:
        if base not in ("lora", "hebbian"):
            raise UserError(f"--baselines: unknown baseline {base!r}; choose from lora, hebbian")
        if base == "hebbian" and cfg["update"] == "hebbian":
            continue
        memories[base] = train_one(base, base, gpt, enc, cfg, device)
    results, per_split, outcomes = evaluate(cfg, enc, gpt, memories, device)
    general = general_val_loss(cfg, enc, gpt, memories[dm_name], device)
    write_results(cfg, results, per_split, general, dm_name, outcomes=outcomes)
    plot_results(results, os.path.join(cfg["out_dir"], "results.png"))


def eval_only(cfg, enc, gpt, device):
    from data import tasks
    if not cfg["memory"] or not cfg["episodes"]:
        raise UserError("--eval_only needs --memory=CKPT and --episodes=FILE.jsonl")
    try:
        model, ckpt = DeltaMemGPT.load_memory(cfg["memory"], gpt)
        episodes = tasks.load_jsonl(cfg["episodes"])
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e))
    model.to(device)
    name = condition_name(dict(cfg, **{k: v for k, v in asdict(model.mcfg).items() if k in cfg}))
    results, per_split, outcomes = evaluate(cfg, enc, gpt, {name: model}, device, {"file": episodes})
    write_results(cfg, results, per_split, None, name, dict(episodes=cfg["episodes"], memory=cfg["memory"]),
                  outcomes)


# ----------------------------------------------------------------------------------------------
# demo: your own sessions, the same questions answered with and without the memory
# ----------------------------------------------------------------------------------------------

DEMO_CONDITIONS = ["no memory (question only)", "δ-mem (question only)", "full context (history in the window)"]
DEMO_NEW_TOKENS = 16                                                     # longest answer the demo decodes


def parse_sessions(text, name):
    """Plain text -> (Episode, questions): one chat line per line; a blank line or a line starting
    with "Session" starts a new session; lines after a line "---" are questions, one per line."""
    from data import tasks
    sessions, questions, current, asking = [], [], [], False
    for line in text.splitlines():
        line = line.rstrip()
        if asking:
            if line.strip():
                questions.append(line.strip().removeprefix("Q:").strip())
            continue
        if line.strip() == "---" or not line.strip() or line.startswith("Session"):
            if current:                                                  # close the session in progress
                sessions.append(current)
            current, asking = [], line.strip() == "---"
            if line.startswith("Session"):                               # the header stays its session's first line
                current = [line]
        else:
            current.append(line)
    if current:
        sessions.append(current)
    if not sessions:
        raise UserError(f"{name} has no chat lines: write one line per chat line, a blank line between sessions")
    return tasks.Episode(sessions=sessions, questions=[]), (questions if asking else None)


def demo_inputs(cfg):
    """The sessions (and questions, if given after ---) and the memory checkpoint, checked up front."""
    name = "stdin" if cfg["demo"] == "-" else cfg["demo"]
    try:
        text = sys.stdin.read() if cfg["demo"] == "-" else open(cfg["demo"], encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--demo={cfg['demo']}: cannot read it ({e.__class__.__name__}): pass a UTF-8 text file")
    ep, questions = parse_sessions(text, name)
    if cfg["demo"] == "-" and not questions:                             # stdin is spent: nothing left to ask from
        raise UserError("--demo=-: put the questions after a line --- in the text you pipe in")
    path = cfg["memory"] or os.path.join(cfg["out_dir"], f"memory_{condition_name(cfg)}.pt")
    if not os.path.exists(path):
        raise UserError(f"memory checkpoint {path} not found: train one with `python train_memory.py` "
                        f"(or pass --memory=CKPT)")
    return ep, questions, path


def demo_states(model, enc, ep, device):
    """The memory's states after writing ep's sessions (collate_episodes wants a question: a blank one)."""
    from data import tasks
    return write_states(model, enc, [tasks.Episode(ep.sessions, [tasks.Question("", "", "demo")])], device)


@torch.no_grad()
def demo_answers(enc, gpt, model, states, ep, questions, device, new_tokens=DEMO_NEW_TOKENS):
    """For each question: (no memory, δ-mem, full context) greedy answers, the memory holding `states`."""
    from data import tasks
    block = gpt.config.block_size - new_tokens
    asks = [tasks.question_prompt(enc, tasks.Question(q, "", "demo")) for q in questions]
    for q, a in zip(questions, asks):
        if len(a) > block:
            raise UserError(f"question {q[:40]!r} is {len(a)} tokens, the backbone reads at most {block}: shorten it")
    hist = enc.encode_ordinary(tasks.render_history(ep))
    bare, read = model_logits(gpt, device), model_logits(model, device)

    def with_memory(idx, rows, cache):                                   # every row reads the one written state
        model.set_memory_state([s[[0] * len(rows)] for s in states])
        return read(idx, rows, cache)
    none = greedy_answers(bare, asks, enc, new_tokens)
    mem = greedy_answers(with_memory, asks, enc, new_tokens)
    full = greedy_answers(bare, [(hist + a)[-block:] for a in asks], enc, new_tokens)  # oldest history cut first
    return list(zip(none, mem, full))


def demo(enc, gpt, device, ep, questions, path):
    """Write the sessions into the memory once, then answer each question three ways, side by side."""
    from data import tasks
    try:
        model, _ = DeltaMemGPT.load_memory(path, gpt)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e))
    model.to(device)
    states = demo_states(model, enc, ep, device)                         # the history, written once
    n_hist = len(enc.encode_ordinary(tasks.render_history(ep)))
    print(f"memory {path}: wrote {len(ep.sessions)} sessions ({n_hist} history tokens) into its state; "
          f"full context reads history + question cut to the last {gpt.config.block_size - DEMO_NEW_TOKENS} tokens")
    width = max(len(c) for c in DEMO_CONDITIONS)

    def show(q):
        for cond, ans in zip(DEMO_CONDITIONS, demo_answers(enc, gpt, model, states, ep, [q], device)[0]):
            print(f"  {cond:<{width}} | {ans.strip()}")                     # greedy_answers cut it at the newline
    if questions is not None:
        for q in questions:
            print(f"Q: {q}")
            show(q)
        return
    while True:                                                          # interactive: empty line or EOF ends
        try:
            q = input("question> ").strip().removeprefix("Q:").strip()
        except EOFError:
            break
        if not q:
            break
        show(q)


def plot_results(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(results)
    fams = sorted({f for r in results.values() for f in r["per_family"]})
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.9), 4.5))
    w = 0.8 / (len(fams) + 1)
    for j, f in enumerate(fams + ["macro"]):
        vals = [results[n]["macro_em"] if f == "macro" else results[n]["per_family"].get(f, 0) for n in names]
        ax.bar(np.arange(len(names)) + j * w, vals, w, label=f, edgecolor="black" if f == "macro" else None)
    ax.set_xticks(np.arange(len(names)) + 0.4 - w / 2)
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("exact match")
    ax.set_title("held-out episodes: exact match per condition and question family")
    ax.legend(fontsize=7, ncol=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}")


if __name__ == "__main__":
    train_backbone.run_cli(main, on_interrupt="\ninterrupted; trained memories are kept in --out_dir: "
                                             "re-run the same command to resume")  # e.g. during evaluation

"""
Freeze the backbone, attach δ-mem, train only the memory, and judge it against every baseline.

    python train_memory.py                        # the main job: data, backbone, memories, results
    python train_memory.py --preset=cpu_long      # 2x backbone steps, 1500 memory steps, deltanet rule
    python train_memory.py --write=segment --heads=4 --out_dir=out-msw
    python train_memory.py --eval_only --memory=out/memory_deltamem.pt --episodes=my.jsonl
    python train_memory.py --demo=my_sessions.txt   # your own chat; questions after a line ---, or typed

An episode is a history (dated chat sessions) plus questions. A training step, per batch of episodes:
  1. write pass: stream every history window through the frozen GPT with writes on; the state runs
     through all windows, gradients flow back through every write (BPTT);
  2. read pass: writes off, the context is only "Q: ...\\nA:" (plus the last --read_window history
     tokens, 0 by default), one question per stated fact (--dense_questions);
  3. the loss (episode_loss; the weights are DEFAULTS'):
       cross-entropy on the answer tokens
     + bind_reg 1.0 x binding_loss: at each answer's first bind_tokens 2 tokens, an InfoNCE over the
       episode's facts picks the asked fact's write key at the same token of its value; its whom part
       also has a "nobody" slot (bind_null 0.5) that a person never named must pick
     + context_reg 0.5 x the LM loss of the episode's own history (+ 2 answers) read with its state
     + general_reg 1.0 x the LM loss of corpus text (rows of the block) read with the state: stay quiet off-topic
       (these two on an aux_share 0.5 of the steps: the step's most costly tokens after the questions)
     + beta_reg 0.01 x (mean β of the write pass - beta_target 0.05)²: write sparingly.
Then every condition (no_history, full_context, recent_window, retrieval, deltamem, lora, hebbian and their
variants) is evaluated on the same held-out episodes: <out_dir>/results.{md,json,png}.
"""
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, replace
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanodeltamem import DeltaMemGPT, MemoryConfig, autodetect_device, IGNORE_INDEX
import train_backbone
from train_backbone import (MEMORY_ENTRIES, check_backbone_file, check_memory_file, ensure_data, fit, fmt_ms_per_iter,
                            fmt_time, greedy_answers, load_backbone, load_checkpoint, load_memory, load_weights,
                            model_logits, presets, run_cli, save_memory, writable_dir)
from data import tasks
from data.config import UserError, check_device, check_positive, check_ranges, parse_config
from data.tasks import exact_match, normalize_answer, score

DEFAULTS = dict(
    preset="cpu",
    backbone="",                  # "": <out_dir>/backbone.pt, pretrained there first (train_backbone.py) when missing
    out_dir="out",
    data_dir="data/pydoc",
    task="msqa",                  # msqa | recall | overwrites (recall, keys reassigned in later sessions) | mix
    episode_preset="small",       # size of the training/evaluation episodes (data/tasks.py presets)
    n_pairs=0,                    # task=recall: stored pairs per episode (0: the episode preset's)
    max_pairs=0,                  # task=recall: N drawn per episode, log-uniform in [2, max_pairs] (0: n_pairs)
    # the memory (nanodeltamem.MemoryConfig)
    # (the recipe that binds, README "What makes a memory bind": a decay gate of its own, keys of what ⊗ whom,
    # two middle layers, the binding term and a question per fact; --update=delta is the paper's rule)
    key_dim=256, rank=32, heads=1, write="token", sides="qo", update="gated", gates="rowwise",
    layers="1,2", alpha=16.0, gate_bias=-1.5, init="paper", chunk_size=8, key_conv=4, query_conv=1, decay_bias=6.0,
    name_dim=32, name_pool=16,    # > 0: keys are what (d_k / name_dim) ⊗ whom (name_dim), whom a content-weighted
                                  # mean of the last name_pool tokens (trained by the binding term alone); 0: d_k
                                  # of what alone (the keys before 2026-12-04: --key_dim=8 --name_dim=0)
    whom_from="tokens",           # the whom content of: tokens (their own embeddings: a name reads alike in
                                  # statement and question) | h (the layer input, before 2026-12-07)
    whom_score="h+tokens",        # the whom pool's score of: h+tokens (the layer input and the token's own
                                  # embedding) | h (the score before 4be90fd)
    name_lr_scale=0.1,            # the whom part learns at this times the learning rate
    # training (more steps of fewer episodes: 500 x 8 takes the time of 300 x 16 and answers better)
    max_iters=500, batch_size=8, learning_rate=3e-2, min_lr=1e-3, warmup_iters=20, grad_clip=1.0,
    beta_target=0.05, beta_reg=0.01, read_window=0, seed=1337, device="auto",
    read_window_share=1.0,        # share of steps whose questions see the last read_window history tokens
                                  # (the others see none): 0.5 trains one memory for both read budgets
    general_reg=1.0, general_len=0,    # + general_reg x LM loss of corpus text read with the episode's state, in
                                  # rows of general_len tokens (0: the backbone's block_size, as the general loss is scored)
    state_margin=0.0,             # + state_margin x softplus(1 - (loss with another episode's state - own loss))
    bind_reg=1.0,                 # + bind_reg x InfoNCE: the query at an answer must pick the asked fact's key
    bind_rivals="all",            # ... among all the episode's facts | same: only facts of the asked attribute
    bind_tokens=2,                # ... at the answer's first 1 or 2 tokens (the second reads the value's second)
    bind_null=0.5,                # > 0: the whom part's softmax gains a "nobody" slot scored bind_null: a person
                                  # never named must pick it, the asked person's fact must beat it (0: off)
    context_reg=0.5,              # + context_reg x LM loss of the episode's own history read with its state
    aux_share=0.5,                # share of steps that add the context and general terms (spread evenly)
    dense_questions=True,         # training msqa episodes ask about every stated fact (reads are cheap)
    max_questions=0,              # at most this many of an episode's questions per step, drawn at random (0: all)
    shared_share=0.5,             # share of training msqa episodes whose facts use only 2 attributes, so that
                                  # people share them and only the person tells the facts apart
    absent_questions=1,           # + this many questions per training msqa episode about a person never mentioned,
                                  # of an attribute the episode states (answer `unknown`: only the person tells)
    novel_values=0.0,             # share of training msqa episodes whose values are made-up words (tasks.novel_values):
                                  # the value path must copy a word's tokens, not learn a code for the pools' words
    compile=False,                # torch.compile the training step (checkpoints never hold its wrapper)
    log_interval=25, eval_interval=100, val_episodes=64,  # progress line / validation and instruments
    diagnose=True,                # retention, key separation and read margin per layer in the progress line
    # evaluation
    baselines="lora,hebbian",     # which trained baselines to train and compare ("" for none)
    eval_episodes=24,             # held-out episodes per split (iid and every held-out axis)
    eval_read_window=64,          # the evaluation's non-zero read window: the last history tokens in context
                                  # (the _w64 conditions; --read_window is the same quantity in training)
    eval_only=False, memory="", episodes="",
    demo="",                      # a sessions text file (or - for stdin): answers with and without memory
)
PRESETS = presets("memory")                                       # train_backbone.PRESET_TABLE
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

    def forward(self, h, *unused, **unused_kw):
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
        return super().forward(idx, targets, cache=cache, logits=logits)


def lora_rank_for(mcfg, d):
    """The LoRA rank whose parameter count matches one δ-mem layer's (q and o sides)."""
    from nanodeltamem import DeltaMemory
    mem = sum(p.numel() for p in DeltaMemory(d, mcfg).parameters())     # projections, gates, conv, corrections
    return max(1, round(mem / (2 * len(mcfg.sides) * d)))


# ----------------------------------------------------------------------------------------------
# building models
# ----------------------------------------------------------------------------------------------

def memory_config(cfg, **over):
    layers = None if cfg["layers"] == "all" else tuple(int(x) for x in str(cfg["layers"]).split(","))
    kw = dict(key_dim=cfg["key_dim"], rank=cfg["rank"], heads=cfg["heads"], write_unit=cfg["write"],
              sides=cfg["sides"], update=cfg["update"], gates=cfg["gates"], layers=layers, alpha=cfg["alpha"],
              gate_bias=cfg["gate_bias"], init=cfg["init"], chunk_size=cfg["chunk_size"],
              key_conv=cfg["key_conv"], query_conv=cfg["query_conv"], decay_bias=cfg["decay_bias"],
              name_dim=cfg["name_dim"], name_pool=cfg["name_pool"], whom_from=cfg["whom_from"],
              whom_score=cfg["whom_score"])
    kw.update(over)
    try:
        return MemoryConfig(**kw)
    except ValueError as e:                                              # its messages start with the field's
        raise UserError("--" + str(e).replace("write_unit=", "write=", 1)) from None  # name (the flag's)


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
    elif cfg["update"] != DEFAULTS["update"]:                            # the paper's coupled rule: _paper
        name += {"delta": "_paper"}.get(cfg["update"], f"_{cfg['update']}")
    return name


def memory_kind(cfg):
    """train_one's kind for the memory of cfg: hebbian, or deltamem for the delta rules."""
    return "hebbian" if cfg["update"] == "hebbian" else "deltamem"


def build(kind, gpt, cfg):
    if kind == "lora":
        mcfg = memory_config(cfg)                                        # the same budget as δ-mem's
        return LoRAGPT(gpt, mcfg, lora_rank_for(mcfg, gpt.config.n_embd))
    if kind == "hebbian":
        return DeltaMemGPT(gpt, memory_config(cfg, update="hebbian"))
    return DeltaMemGPT(gpt, memory_config(cfg))


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------

def sample_episodes(rng, cfg, n, split="train"):
    out = []
    for _ in range(n):
        task = cfg["task"] if cfg["task"] != "mix" else ("msqa" if rng.random() < 0.5 else "recall")
        if task == "recall" and cfg.get("max_pairs"):                    # N spread over a range (sweeps)
            pairs = int(round(2 ** rng.uniform(1, np.log2(cfg["max_pairs"]))))
            out.append(tasks.make_recall(rng, cfg["episode_preset"], split, n_pairs=pairs))
            continue
        if task == "recall" and cfg["n_pairs"]:                          # a fixed number of pairs
            out.append(tasks.make_recall(rng, cfg["episode_preset"], split, n_pairs=cfg["n_pairs"]))
            continue
        if task == "msqa" and (cfg["dense_questions"] or cfg["shared_share"] > 0 or cfg["absent_questions"]
                               or cfg["novel_values"] > 0):
            attrs = 2 if cfg["shared_share"] > 0 and rng.random() < cfg["shared_share"] else 0  # 2: shared
            novel = cfg["novel_values"] > 0 and rng.random() < cfg["novel_values"]
            out.append(tasks.make_msqa(rng, cfg["episode_preset"], split, dense=cfg["dense_questions"], attrs=attrs,
                                       absent=cfg["absent_questions"],
                                       values=tasks.novel_values(rng) if novel else None))
            continue
        out.append(tasks.make_episode(rng, task=task, preset=cfg["episode_preset"], split=split))
    return out


def mean_beta(model):
    """Mean write strength over the last write pass (the regulariser's input)."""
    vals = [m.mean_beta for m in model.memories.values() if getattr(m, "mean_beta", None) is not None]
    return torch.stack(vals).mean() if vals else None


def episode_loss(model, batch, cfg, device, general=None, sites=None, context=None):
    """Write pass over the histories, then the answer loss of the read pass (+ the β regulariser).

    general: optional (x, y) rows of ordinary corpus text (B, 1, L): read with the same states, their LM
    loss (x general_reg) teaches the memory to stay quiet on text that is not about its history.
    context: optional (x, y) rows of each episode's own history and first answers (B, 1, L), read with its
    own state: their LM loss (x context_reg) teaches the memory not to break the backbone's reading when
    the history is in the context too (the paper's protocol).
    sites: binding_sites of the batch, for the binding term (x bind_reg).
    """
    model.reset_memory()
    with LayerInputs(model) as seen:
        model(batch["hist"].to(device), write=True, mask=batch["mask"].to(device), seg=batch["seg"].to(device),
              logits=False)
        writes = dict(seen)                                              # (h, e), each (B·W, L, d), per memory layer
        qx, qy = batch["qx"].to(device), batch["qy"].to(device)
        _, loss = model(qx, qy, logits=False)                            # (B·Q, Lq): the head only at answers
        reads = dict(seen)                                               # (h, e), each (B·Q, Lq, d)
    if sites is not None and cfg["bind_reg"] > 0:
        bind = binding_loss(model, writes, reads, sites, batch["hist"].size(1), qx.size(1),
                            same_kind=cfg["bind_rivals"] == "same", null=cfg["bind_null"])
        if bind is not None:
            loss = loss + cfg["bind_reg"] * bind
    if cfg["state_margin"] > 0 and model.memory_state():                 # the official trainer's state anchor:
        own = model.memory_state()                                       # the answers must cost more with the
        model.set_memory_state([s.roll(1, 0) for s in own])              # next episode's state than with their
        _, shuffled = model(qx, qy, logits=False)                        # own, so the prior alone earns nothing
        model.set_memory_state(own)
        loss = loss + cfg["state_margin"] * F.softplus(1.0 - (shuffled - loss))
    b = mean_beta(model)
    if b is not None:
        loss = loss + cfg["beta_reg"] * (b - cfg["beta_target"]) ** 2
    if general is not None and cfg["general_reg"] > 0:
        loss = loss + cfg["general_reg"] * model(general[0].to(device), general[1].to(device), logits=False)[1]
    if context is not None and cfg["context_reg"] > 0:
        loss = loss + cfg["context_reg"] * model(context[0].to(device), context[1].to(device), logits=False)[1]
    return loss


def context_rows(enc, episodes, block_size, pad):
    """Each episode's history and its first two questions with answers, as the backbone pretrained on
    them (the last block_size + 1 tokens): x, y (B, 1, L), y = IGNORE_INDEX on padding."""
    docs = [enc.encode_ordinary(tasks.render_history(ep) + "".join(tasks.render_qa(q) for q in ep.questions[:2]))
            [-(block_size + 1):] for ep in episodes]
    L = max(len(d) for d in docs) - 1
    x = torch.full((len(docs), 1, L), pad, dtype=torch.long)
    y = torch.full((len(docs), 1, L), IGNORE_INDEX, dtype=torch.long)
    for i, d in enumerate(docs):
        x[i, 0, :len(d) - 1], y[i, 0, :len(d) - 1] = torch.tensor(d[:-1]), torch.tensor(d[1:])
    return x, y


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


def on_share(it, share):
    """Whether step `it` is one of a `share` of the steps, spread evenly (0.5: every other step)."""
    return int((it + 1) * share) > int(it * share)


def read_window_at(it, cfg):
    """History tokens before the questions at step `it`: read_window on a read_window_share of the steps,
    0 on the rest; a function of `it` alone, so a resume agrees."""
    return cfg["read_window"] if on_share(it, cfg["read_window_share"]) else 0


def step_inputs(enc, cfg, it, block_size, corpus=None):
    """Training step `it`'s inputs, a function of `it` alone (a resume sees the same batches): the collated
    episodes, and episode_loss's general / sites / context for the recipe's terms that are switched on."""
    rng = np.random.default_rng([cfg["seed"], it])
    eps = sample_episodes(rng, cfg, cfg["batch_size"])
    aux = on_share(it, cfg["aux_share"])                                 # the context and general terms
    general = corpus.batch(cfg["batch_size"], cfg["general_len"] or block_size, rng) if corpus and aux else None
    if cfg["max_questions"]:                                             # a random few of each episode's questions
        eps = [replace(ep, questions=[ep.questions[i] for i in sorted(rng.permutation(len(ep.questions))
                                                                      [:cfg["max_questions"]])]) for ep in eps]
    batch = tasks.collate_episodes(enc, eps, block_size, enc.eot_token, read_window_at(it, cfg))
    sites = binding_sites(enc, eps, batch, block_size, cfg["bind_tokens"]) if cfg["bind_reg"] > 0 else None
    context = context_rows(enc, eps, block_size, enc.eot_token) if cfg["context_reg"] > 0 and aux else None
    return batch, dict(general=general, sites=sites, context=context)


def param_groups(model, cfg):
    """The optimizer's groups: the whom part (W_c, W_s, W_se) learns at name_lr_scale times the rate, the
    rest at the rate."""
    params = [p for p in model.parameters() if p.requires_grad]
    whom = [p for n, p in model.named_parameters() if p.requires_grad and n.split(".")[-2] in ("W_c", "W_s", "W_se")]
    rest = [p for p in params if all(p is not w for w in whom)]
    return [dict(params=rest)] + ([dict(params=whom, lr_scale=cfg["name_lr_scale"])] if whom else [])


def train_one(kind, name, gpt, enc, cfg, device):
    """Train one memory (or the LoRA baseline); resumes from / reuses <out_dir>/memory_<name>.pt."""
    torch.manual_seed(cfg["seed"])                                       # the same init whatever ran before
    model = build(kind, gpt, cfg).to(device)                             # (a backbone trained, other memories)
    step = torch.compile(model) if cfg["compile"] else model             # runs the steps; saves use model
    path = memory_path(cfg, name)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg["learning_rate"], weight_decay=0.0)
    start, history = 0, []
    if os.path.exists(path):
        ckpt = load_checkpoint(path, required=MEMORY_ENTRIES)
        if ckpt["backbone_hash"] != model.backbone_hash or ckpt.get("train_config", {}).get("kind") != kind:
            raise UserError(f"{path} belongs to another backbone or model; delete it or use another --out_dir")
        saved = {**asdict(MemoryConfig()), **ckpt["mem_config"]}         # fields added since: their defaults
        if saved != asdict(model.mcfg):                                  # e.g. another --rank with the same out_dir
            raise UserError(f"{path} holds a memory with {ckpt['mem_config']}, not {asdict(model.mcfg)}: "
                            f"delete it, use the same options, or use another --out_dir")
        load_weights(path, ckpt, "memory", model.memories, opt)
        start, history = ckpt.get("iter_num", cfg["max_iters"]), ckpt.get("history", [])
        if start >= cfg["max_iters"]:
            print(f"[{name}] already trained ({path}, {start} iterations): reusing it")
            return model
        print(f"[{name}] resuming from {path} at iteration {start}")
    t, f = model.param_counts()
    print(f"[{name}] training {t:,} parameters ({100 * t / (t + f):.2f}% of {t + f:,}); backbone frozen")
    corpus = CorpusRows(cfg["data_dir"]) if cfg["general_reg"] > 0 else None
    val_eps = sample_episodes(np.random.default_rng(cfg["seed"] + 7),   # the same for every recipe
                              dict(cfg, dense_questions=False, shared_share=0.0, absent_questions=0, novel_values=0.0),
                              cfg["val_episodes"], split="train")
    val_shared, val_new = [], []
    if cfg["task"] in ("msqa", "mix"):
        vrng, nrng = np.random.default_rng(cfg["seed"] + 8), np.random.default_rng(cfg["seed"] + 9)
        n = cfg["val_episodes"] // 2                                     # 4 people who share an attribute, and
        val_shared = [tasks.make_shared(vrng, 4, "train") for _ in range(n)]  # values never written in training
        val_new = [tasks.make_msqa(nrng, cfg["episode_preset"], "train", values=tasks.noun_values()) for _ in range(n)]

    def save(it):
        save_memory(model, path, optimizer=opt.state_dict(), iter_num=it, history=history,
                    train_config=dict(cfg, kind=kind))

    if cfg["diagnose"] and kind != "lora" and start == 0:                # the instruments at init
        print(f"[{name}] at init: {diagnosis_line(diagnose(model, enc, val_eps + val_shared, device))}", flush=True)

    def loss_at(it):
        batch, extra = step_inputs(enc, cfg, it, gpt.config.block_size, corpus)
        if batch["qx"].size(-1) > gpt.config.block_size:
            raise UserError(f"[{name}] a question of {batch['qx'].size(-1)} tokens (with --read_window="
                            f"{cfg['read_window']}) does not fit the backbone's block_size="
                            f"{gpt.config.block_size}: use a smaller --read_window or a larger backbone")
        model.train()
        return episode_loss(step, batch, cfg, device, **extra)

    losses = {}

    def log(it, loss, lr, dt):
        b = mean_beta(model)
        losses[it] = loss
        print(f"[{name}] iter {it:4d}/{cfg['max_iters']} | loss {loss:.3f} | β {b.item() if b is not None else 0:.3f}"
              f" | {1 / dt:.1f} steps/s | ETA {fmt_time(dt * (cfg['max_iters'] - it))}", flush=True)

    def evaluate(it):                                                    # train-side validation, the instruments
        acc, abst = answer_accuracy(model, enc, val_eps, cfg, device)
        shared, unknown = answer_accuracy(model, enc, val_shared, cfg, device) if val_shared else (None, None)
        new = answer_accuracy(model, enc, val_new, cfg, device)[0] if val_new else None
        diag = diagnose(model, enc, val_eps + val_shared, device) if cfg["diagnose"] and kind != "lora" else {}
        by_name = f" | shared N=4 {shared:.2f} (chance 0.25) unknown {unknown:.2f}" if shared is not None else ""
        by_name += f" | new words {new:.2f}" if new is not None else ""
        print(f"[{name}]   val fact acc {acc:.2f} abstention {abst:.2f}{by_name}", flush=True)
        if diag:
            print(f"[{name}]   {diagnosis_line(diag)}", flush=True)
        history.append(dict(iter=it, train=losses.get(it), val_acc=acc, val_abstention=abst,
                            val_shared_acc=shared, val_shared_unknown=unknown, val_new_acc=new, diagnostics=diag))
        save(it)

    t0 = time.time()
    it = fit(loss_at, params, opt, cfg, start, path, save, log, evaluate, tag=f"[{name}] ",
             resume_hint="Re-run the same command to resume.")
    save(it)
    print(f"[{name}] trained in {fmt_time(time.time() - t0)}; saved {path}")
    return model


@torch.no_grad()
def answer_accuracy(model, enc, episodes, cfg, device):
    """Teacher-forced accuracy with no history in context (the headline's condition): every answer token
    is the argmax (a fast proxy for exact match), on the fact questions (every family but abstention)
    and on the abstention questions: (fact, abstention)."""
    model.eval()
    batch = tasks.collate_episodes(enc, episodes, model.gpt.config.block_size, enc.eot_token)  # 0 history tokens
    model.reset_memory()
    model(batch["hist"].to(device), write=True, mask=batch["mask"].to(device), seg=batch["seg"].to(device),
          logits=False)
    logits, _ = model(batch["qx"].to(device))
    y = batch["qy"].flatten(0, 1).to(device)                            # (B·Q, Lq)
    ok = (logits.argmax(-1) == y) | (y == IGNORE_INDEX)
    has = (y != IGNORE_INDEX).any(-1)                                   # (B·Q,) real questions
    Q = batch["qx"].size(1)
    abst = torch.tensor([i < len(ep.questions) and ep.questions[i].family == "abstention"
                         for ep in episodes for i in range(Q)], device=device)
    model.train()
    acc = lambda sel: float(ok.all(-1)[sel].float().mean()) if sel.any() else float("nan")
    return acc(has & ~abst), acc(has & abst)


# ----------------------------------------------------------------------------------------------
# diagnostics: why a memory does or does not bind (train-side episodes only)
# ----------------------------------------------------------------------------------------------

def fact_sites(enc, ep, window):
    """Where an episode's facts sit in its memory stream, and which fact each question asks.

    Returns (sites, slots, asked, kinds, whose): sites [(window, offset, n)] of every stated value's first
    token and its number of tokens n;
    slots [int] which (subject, slot) each statement is about (an update restates its slot: the delta
    rule should write it under the same key); asked [site index or None] per question: the latest
    statement of the gold answer (None: abstention, a session number, or an answer not stated); kinds
    [int] which attribute (or relation word) each statement states: facts of one kind are the rivals
    that only the person tells apart; whose [int] which person each statement is about."""
    runs = []                                                            # (window, first token) of every line
    for w, (_, seg) in enumerate(tasks.encode_history(enc, ep, window)):
        runs += [(w, i) for i, s in enumerate(seg) if i == 0 or seg[i - 1] != s]
    lines = [line for session in ep.sessions for line in session]
    if len(runs) != len(lines):                                          # a line cut across windows: skip it
        return [], [], [None] * len(ep.questions), [], []
    sites, slots, values, slot_id, kinds, kind_id, whose, who_id = [], [], [], {}, [], {}, [], {}
    for (w, start), line in zip(runs, lines):
        for subject, slot, value in tasks.line_facts(line, ep.task):
            at = line.rfind(" " + value)                                 # values come last in their statement
            sites.append((w, start + len(enc.encode_ordinary(line[:at])), len(enc.encode_ordinary(" " + value))))
            slots.append(slot_id.setdefault((subject, slot), len(slot_id)))
            kinds.append(kind_id.setdefault(slot, len(kind_id)))
            whose.append(who_id.setdefault(subject, len(who_id)))
            values.append(value)
    asked = []
    for q in ep.questions:
        hits = [i for i, v in enumerate(values) if v == q.a and q.family != "abstention"]
        asked.append(hits[-1] if hits else None)
    return sites, slots, asked, kinds, whose


class LayerInputs:
    """with LayerInputs(model) as seen: ... -> seen[i] is memory layer i's last input (h, e): its attention
    input h (N, L, d) and the tokens' embeddings e (N, L, d) (DeltaMemory.forward)."""

    def __init__(self, model):
        self.model, self.seen, self.hooks = model, {}, []

    def __enter__(self):
        for i, mem in self.model.memories.items():
            self.hooks.append(mem.register_forward_pre_hook(
                lambda m, args, kw, i=i: self.seen.__setitem__(i, (args[0], kw.get("e"))), with_kwargs=True))
        return self.seen

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()


def streams(seen, B):
    """A LayerInputs entry (h, e) as B streams: x (B, T, d) and e (B, T, d) or None."""
    h, e = seen
    return h.reshape(B, -1, h.size(-1)), (e.reshape(B, -1, e.size(-1)) if e is not None else None)


def binding_sites(enc, episodes, batch, block_size, tokens=1):
    """Per episode: stream positions (F,) of its facts' value tokens, their slot ids (F,), [(question,
    read position, asked fact, j)] for the questions whose answer is a stated fact, their kind ids (F,),
    person ids (F,) (fact_sites, in the batch's padded layout) and the answer slots' read positions of the
    questions about a person the history never names (tasks.absent_person). j < tokens is which answer
    token reads (0: the answer slot reads the value's first token; 1: the answer's first token reads its
    second, for values of two tokens or more)."""
    W, L = batch["hist"].shape[1:]
    Lq = batch["qx"].size(-1)
    answer_at = (batch["qy"] != IGNORE_INDEX).float().argmax(-1)        # (B, Q) the last prompt token
    out = []
    for b, ep in enumerate(episodes):
        sites, slots, asked, kinds, whose = fact_sites(enc, ep, block_size)
        pos = torch.tensor([w * L + o for w, o, _ in sites], dtype=torch.long)
        reads = [(q, q * Lq + int(answer_at[b, q]) + j, a, j) for j in range(tokens)
                 for q, a in enumerate(asked) if a is not None and sites[a][2] > j]
        absent = [q * Lq + int(answer_at[b, q]) for q, x in enumerate(ep.questions) if tasks.absent_person(ep, x)]
        out.append((pos, torch.tensor(slots, dtype=torch.long), reads if len(set(slots)) > 1 else [],
                    torch.tensor(kinds, dtype=torch.long), torch.tensor(whose, dtype=torch.long),
                    absent if len(pos) else []))
    return out


def binding_loss(model, writes, reads, sites, W, Q, tau=0.1, same_kind=False, null=0.0):
    """Key-query matching, trained directly: at each answer token that binding_sites names (the j-th), a
    softmax over the episode's facts of q̃·k̃ / tau must pick the asked fact's write key at its value's j-th
    token (an InfoNCE term; the rest of the memory is untouched).
    Older statements of the asked slot are left out of the softmax: the delta rule overwrites them under
    the same key. same_kind: the only rivals are facts of the asked fact's attribute (other people's), the
    ones that only the person tells apart. With name_dim > 0 the keys' whom part (DeltaMemory.whom) gets
    a term of its own, trained by nothing else: the same softmax with only other people's facts of the
    asked attribute as rivals, so that nothing but the person can win it (with the person's facts of
    other attributes as positives, a code of "not this attribute" would win it without the name).
    null > 0: the whom softmax gains a slot of its own with the fixed score null / tau, a person the history
    never names must pick it against every stated fact (nothing stored is about them), and the asked
    person's fact must beat it: whom·whom' of two people must stay below null, of one person above it.
    writes / reads: LayerInputs of the write and read passes; sites: binding_sites."""
    losses = []
    for i, mem in model.memories.items():
        if not hasattr(mem, "key_parts"):                                 # LoRA: no keys
            continue
        B, who = len(sites), getattr(mem, "W_c", None) is not None      # who: the keys have a whom part
        (x_w, e_w), (x_r, e_r) = streams(writes[i], B), streams(reads[i], B)  # (B, T, d), (B, Q·Lq, d)
        n_r, dev = len(reads[i][0]) // B, x_w.device
        groups, kb, kt, qb, qt, ab, at = [], [], [], [], [], [], []      # every episode's answer tokens: the
        for b, (pos, _, rows, _, _, absent) in enumerate(sites):         # rows each reads, gathered at once
            for j in sorted({r[3] for r in rows}):                       # the answer's j-th token reads the
                asked = [r for r in rows if r[3] == j]                   # value's j-th: facts' keys there
                nobody = absent if j == 0 and null > 0 else []           # answer slots of people never named
                groups.append((b, asked, len(nobody)))
                kb += [b] * len(pos); kt += (pos + j).tolist()
                qb += [b] * len(asked); qt += [p for _, p, _, _ in asked]
                ab += [b] * len(nobody); at += nobody
        kb, kt, qb, qt, ab, at = (torch.tensor(v, dtype=torch.long, device=dev) for v in (kb, kt, qb, qt, ab, at))

        def unit_rows(parts, bi, ti):                                    # parts (B, T, ·): what, whom or None ->
            a, c = parts                                                 # unit vectors (H, len(ti), d_k) at the
            return mem.unit(a[bi, ti][None], None if c is None else c[bi, ti][None])[0]  # rows (bi, ti) only
        k_all = unit_rows(mem.key_parts(x_w, W, e_w), kb, kt)            # (H, ΣF, d_k)
        q_all = unit_rows(mem.query_parts(x_r, n_r, e=e_r), qb, qt)      # (H, ΣA, d_k)
        if who:                                                          # whom parts alone, unit (H, Σ·, n)
            kw_all = mem.whom_unit(x_w, W, e_w)[kb, :, kt].transpose(0, 1)
            qw_r = mem.whom_unit(x_r, n_r, e_r)                          # (B, H, Q·Lq, n)
            qw_all, aw_all = qw_r[qb, :, qt].transpose(0, 1), qw_r[ab, :, at].transpose(0, 1)
        with_null = lambda lg: torch.cat([lg, lg.new_full((len(lg), 1), null / tau)], 1)  # (·, F) -> (·, F + 1)
        k0 = q0 = a0 = 0                                                 # where each group's rows start
        for b, asked, n_absent in groups:
            pos, slots, _, kinds, whose, _ = sites[b]
            nf, na = len(pos), len(asked)
            target = torch.tensor([a for _, _, a, _ in asked], device=dev)
            ks, qs = k_all[:, k0:k0 + nf], q_all[:, q0:q0 + na]          # (H, F, d_k), (H, A, d_k)
            logits = (qs @ ks.transpose(-1, -2)).mean(0) / tau          # (A, F)
            same = slots[target.cpu()][:, None] == slots[None, :]        # (A, F) the asked slot's statements
            same[torch.arange(len(target)), target] = False              # ... but the asked one itself
            if same_kind:                                                # and facts of other attributes
                same |= kinds[target.cpu()][:, None] != kinds[None, :]
            losses.append(F.cross_entropy(logits.masked_fill(same.to(dev), float("-inf")), target))
            if who:                                                      # whom: the asked fact among
                kw, qw = kw_all[:, k0:k0 + nf], qw_all[:, q0:q0 + na]    # other people's of its attribute
                logits = (qw @ kw.transpose(-1, -2)).mean(0) / tau      # (A, F)
                t = target.cpu()
                rival = (whose[t][:, None] != whose[None, :]) & (kinds[t][:, None] == kinds[None, :])
                rival[torch.arange(len(t)), t] = True                    # (A, F) the candidates
                some = rival.sum(-1) > 1                                 # (A,) questions with a rival
                if null > 0:                                             # + the null slot, every question's rival
                    logits = with_null(logits)                           # (A, F + 1)
                    rival = torch.cat([rival, torch.ones(na, 1, dtype=torch.bool)], 1)
                    some = torch.ones(na, dtype=torch.bool)
                if some.any():
                    logits = logits.masked_fill(~rival.to(dev), float("-inf"))
                    losses.append(F.cross_entropy(logits[some.to(dev)], target[some.to(dev)]))
                if n_absent:                                             # a person never named: the null slot
                    aw = aw_all[:, a0:a0 + n_absent]                     # against every stated fact
                    logits = with_null((aw @ kw.transpose(-1, -2)).mean(0) / tau)  # (N, F + 1)
                    losses.append(F.cross_entropy(logits, torch.full((n_absent,), nf, device=dev)))
            k0, q0, a0 = k0 + nf, q0 + na, a0 + n_absent
    return torch.stack(losses).mean() if losses else None


def retention(keep, real, pos):
    """∏ keep over the real tokens after each position: keep (H, T, r|1), real (T,) bool, pos (F,) ->
    (F,) mean over heads and rows of what is left of a value written at pos when the history ends."""
    logkeep = torch.where(real[None, :, None], keep.clamp_min(1e-30).log(), torch.zeros_like(keep))
    after = logkeep.flip(1).cumsum(1).flip(1) - logkeep                 # (H, T, r|1) Σ log keep over later tokens
    return after[:, pos].exp().mean(-1).mean(0)                         # (F,)


def key_separation(keys, slots, kinds=None):
    """Mean |cos| between the unit write keys (H, F, d_k) of facts about different slots (F,): 0
    orthogonal, 1 all collide. kinds (F,): only pairs of one kind (same attribute, other person) count.
    None when no pair counts."""
    other = slots[:, None] != slots[None, :]                             # (F, F)
    if kinds is not None:
        other &= kinds[:, None] == kinds[None, :]
    return (keys @ keys.transpose(-1, -2)).abs()[:, other.to(keys.device)].mean() if other.any() else None


def read_margin(query, keys, slots, asked, kinds=None):
    """cos(query, the asked fact's key) - max cos(query, the keys of facts about other slots), mean over
    heads. query (H, d_k), keys (H, F, d_k) unit vectors, slots (F,); 1 for orthogonal keys and the asked
    key as query. kinds (F,): only facts of the asked fact's kind are rivals (then the attribute's type
    earns nothing). None when there is no rival."""
    c = (keys @ query[..., None])[..., 0]                               # (H, F)
    rival = slots != slots[asked]
    if kinds is not None:
        rival &= kinds == kinds[asked]
    if not rival.any():
        return None
    others = c[:, rival.to(c.device)]                                    # (H, F') the rivals
    return (c[:, asked] - others.max(1).values).mean()


@torch.no_grad()
def diagnose(model, enc, episodes, device):
    """Per memory layer, over train-side episodes (design: instruments first):

      retention   ∏ keep_t from each fact's value token to the end of the history (mean, min): how much of
                  a written value (and of its gradient) is left when the question reads;
      key_sep     mean |cos| between the write keys of facts about different slots (1: all keys collide);
      margin      cos(q at the answer, k of the asked fact) - max cos(q, k of facts about other slots):
                  > 0 when the read finds the asked fact first;
      same_sep, same_margin   the same two with only rivals of the asked fact's attribute (other people):
                  what is left once the attribute's type earns nothing. By name, same_margin > 0.
      nobody      max cos(q at the answer, k of any stated fact) for a person the history never names:
                  how much of someone else's value the read returns where the answer is `unknown`.
    """
    model.eval()
    batch = tasks.collate_episodes(enc, episodes, model.gpt.config.block_size, enc.eot_token)
    W, L = batch["hist"].shape[1:]
    with LayerInputs(model) as seen:                                     # each memory layer's input h
        model.reset_memory()
        model(batch["hist"].to(device), write=True, mask=batch["mask"].to(device), seg=batch["seg"].to(device),
              logits=False)
        writes = dict(seen)                                              # (h, e), each (B·W, L, d), per layer
        model(batch["qx"].to(device))
        reads = dict(seen)                                               # (h, e), each (B·Q, Lq, d), per layer
    B = len(episodes)
    real = batch["mask"].reshape(B, W * L).to(device)                    # (B, T)
    sites = binding_sites(enc, episodes, batch, model.gpt.config.block_size)
    out = {}
    for i, mem in model.memories.items():
        (x_w, e_w), (x_r, e_r) = streams(writes[i], B), streams(reads[i], B)  # (B, W·L, d), (B, Q·Lq, d)
        k, _, _, keep = mem.write_terms(x_w, W, e=e_w)                   # (B, H, T, d_k), (B, H, T, r|1)
        q = mem.read_query(x_r, len(reads[i][0]) // B, e=e_r)            # (B, H, Q·Lq, d_k)
        ret, sep, margin, same_sep, same_margin, nobody = [], [], [], [], [], []
        for b, (pos, slots, asked, kinds, _, absent) in enumerate(sites):
            if len(pos) == 0:
                continue
            pos = pos.to(device)
            ret += retention(keep[b], real[b], pos).tolist()
            sep.append(key_separation(k[b, :, pos], slots))
            same_sep.append(key_separation(k[b, :, pos], slots, kinds))
            margin += [read_margin(q[b, :, at], k[b, :, pos], slots, a) for _, at, a, _ in asked]
            same_margin += [read_margin(q[b, :, at], k[b, :, pos], slots, a, kinds) for _, at, a, _ in asked]
            nobody += [(k[b, :, pos] @ q[b, :, at, :, None])[..., 0].mean(0).max() for at in absent]
        given = lambda xs: [x.item() for x in xs if x is not None]      # None: an episode without such rivals
        mean = lambda xs: float(np.mean(given(xs))) if given(xs) else None
        out[i] = dict(retention_mean=float(np.mean(ret)) if ret else None,
                      retention_min=float(np.min(ret)) if ret else None, key_sep=mean(sep), margin=mean(margin),
                      same_sep=mean(same_sep), same_margin=mean(same_margin), nobody=mean(nobody))
    model.train()
    return out


def diagnosis_line(diag):
    """One short line: the layers' diagnostics, layer by layer."""
    f = lambda v: "–" if v is None else f"{v:.2f}"
    return " ".join(f"L{i}[ret {f(d['retention_mean'])}/{f(d['retention_min'])} sep {f(d['key_sep'])} "
                    f"margin {f(d['margin'])} | same attribute: sep {f(d.get('same_sep'))} "
                    f"margin {f(d.get('same_margin'))} | nobody {f(d.get('nobody'))}]" for i, d in diag.items())


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


def fact_em(per_family):
    """The headline: macro EM over the families whose answer is stated in the history (all but abstention),
    so a memory that only learned to say `unknown` scores 0 on it."""
    facts = [v for f, v in per_family.items() if f != "abstention"]
    return float(np.mean(facts)) if facts else 0.0


def is_stale(pred, q):
    """Did the answer give an outdated value of the slot (q.stale)?"""
    return normalize_answer(pred) in {normalize_answer(s) for s in q.stale}


def score_condition(preds, episodes):
    qs = [q for ep in episodes for q in ep.questions]
    per_family = score(preds, [q.a for q in qs], [q.family for q in qs])
    macro = per_family.pop("macro")
    stale = [is_stale(p, q) for p, q in zip(preds, qs) if q.stale]
    unknown = [exact_match(p, tasks.UNKNOWN) for p, q in zip(preds, qs) if q.family != "abstention"]
    later = [(p, q) for p, q, ep in zip(preds, qs, [ep for ep in episodes for _ in ep.questions])
             if tasks.overwritten_later(ep, q)]                          # updates only an erase can keep
    return dict(fact_em=fact_em(per_family), macro_em=macro, per_family=per_family,
                abstention=per_family.get("abstention"),                # `unknown` when nothing was said
                unknown_on_facts=float(np.mean(unknown)) if unknown else None,  # `unknown` to a stated fact
                stale_rate=float(np.mean(stale)) if stale else None, n_questions=len(qs),
                updated_em=float(np.mean([exact_match(p, q.a) for p, q in later])) if later else None,
                updated_stale=float(np.mean([is_stale(p, q) for p, q in later])) if later else None,
                n_updated=len(later))


def conditions(cfg, enc, gpt, memories):
    """name -> (context function, model or None). memories: {name: trained model}."""
    W = cfg["eval_read_window"]
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
    if episodes_by_split is None:
        task = "msqa" if cfg["task"] in ("msqa", "mix") else cfg["task"]
        episodes_by_split = {s: tasks.make_episodes(cfg["eval_episodes"], seed=10_000 + i, task=task,
                                                    preset=cfg["episode_preset"], split=s)
                             for i, s in enumerate(EVAL_SPLITS)}
    all_eps = [ep for eps in episodes_by_split.values() for ep in eps]
    conds = conditions(cfg, enc, gpt, memories)
    results, per_split = {}, {}
    qs = [q for ep in all_eps for q in ep.questions]
    outcomes = dict(family=[q.family for q in qs], correct={}, stale={},  # per question: for the intervals
                    episode=[e for e, ep in enumerate(all_eps) for _ in ep.questions],
                    updated=[tasks.overwritten_later(ep, q) for ep in all_eps for q in ep.questions])
    t0 = time.time()
    print(f"evaluating {len(conds)} conditions on {len(all_eps)} held-out episodes "
          f"({len(qs)} questions; splits: {', '.join(episodes_by_split)})")
    for n, (name, (ctx, model)) in enumerate(conds.items()):
        preds, hist_tokens = run_condition(enc, all_eps, ctx, model, gpt, device)
        res = score_condition(preds, all_eps)
        params = model.param_counts()[0] if model is not None else 0
        results[name] = dict(res, history_tokens_in_context=hist_tokens, trainable_params=params)
        outcomes["correct"][name] = [exact_match(p, q.a) for p, q in zip(preds, qs)]
        outcomes["stale"][name] = [is_stale(p, q) for p, q in zip(preds, qs)]
        i = 0
        for split, eps in episodes_by_split.items():
            nq = sum(len(e.questions) for e in eps)
            per_split.setdefault(split, {})[name] = score_condition(preds[i:i + nq], eps)["fact_em"]
            i += nq
        el = time.time() - t0
        print(f"  {name:28s} fact EM {res['fact_em']:.3f} | abstention {res['abstention'] or 0:.2f} | "
              f"macro EM {res['macro_em']:.3f} | history tokens {hist_tokens:6.1f} | "
              f"ETA {fmt_time(el / (n + 1) * (len(conds) - n - 1))}", flush=True)
    return results, per_split, outcomes


def evaluate_shared(cfg, enc, gpt, memories, device, ns=tasks.SHARED_N):
    """By the person: every condition at 0 history tokens (and full context) on held-out episodes where N
    people share one attribute (tasks.make_shared, train-side words, fresh seeds), kept apart from the
    headline. Returns {condition: {N: {"em": EM on the people's facts, "abstention": 'unknown' for a
    person never mentioned}}} and chance = 1/N."""
    eps = {n: [tasks.make_shared(np.random.default_rng([20_000, n, i]), n) for i in range(cfg["eval_episodes"])]
           for n in ns}
    conds = {k: v for k, v in conditions(cfg, enc, gpt, memories).items()
             if not k.endswith(f"_w{cfg['eval_read_window']}") and k != "recent_window"}
    print(f"by name: {len(conds)} conditions on {cfg['eval_episodes']} held-out episodes each where N = "
          f"{', '.join(map(str, ns))} people share one attribute")
    out = {}
    for name, (ctx, model) in conds.items():
        for n, e in eps.items():
            preds, _ = run_condition(enc, e, ctx, model, gpt, device)
            per = score_condition(preds, e)["per_family"]
            out.setdefault(name, {})[str(n)] = dict(em=per["single_hop"], abstention=per["abstention"])
        print(f"  {name:28s} " + " | ".join(f"N={n}: {out[name][str(n)]['em']:.2f} (chance {1 / n:.2f})"
                                             for n in ns), flush=True)
    return dict(conditions=out, chance={str(n): 1 / n for n in ns}, episodes_per_n=cfg["eval_episodes"])


def shared_table(shared):
    """Markdown: EM per N against chance, and abstention on the person never mentioned."""
    ns = list(shared["chance"])
    md = ("| condition | " + " | ".join(f"N = {n}" for n in ns) + " | 'unknown' for an absent person |\n|---|"
          + "---|" * (len(ns) + 1) + "\n| chance (1/N) | " + " | ".join(f"{shared['chance'][n]:.2f}" for n in ns)
          + " | |\n")
    for name, r in shared["conditions"].items():
        md += (f"| {name} | " + " | ".join(f"{r[n]['em']:.2f}" for n in ns) + " | "
               + " ".join(f"{r[n]['abstention']:.2f}" for n in ns) + " |\n")
    return md


@torch.no_grad()
def general_val_loss(cfg, enc, gpt, model, device, n_batches=8):
    """LM loss on held-out corpus text: bare backbone vs memory attached after an unrelated write."""
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
    fams = sorted({f for r in results.values() for f in r["per_family"]} - {"abstention"})  # it has its column
    pct = lambda v: f"{v:.2f}" if v is not None else "–"
    head = ("| condition | history tokens in context | trainable params | **fact EM** | abstention | `unknown` to "
            "a fact | macro EM | " + " | ".join(fams) + " |")
    rows = [head, "|" + "---|" * (7 + len(fams))]
    for name, r in results.items():
        cells = [f"{r['per_family'].get(f, float('nan')):.2f}" for f in fams]
        rows.append(f"| {name} | {r['history_tokens_in_context']:.0f} | {r['trainable_params']:,} | "
                    f"**{r['fact_em']:.3f}** | {pct(r.get('abstention'))} | {pct(r.get('unknown_on_facts'))} | "
                    f"{r['macro_em']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def resampled_fact_em(correct, family, counts):
    """Fact EM (macro over every family but abstention) of one condition in every bootstrap resample.
    correct (Q,) per question; family (Q,) its family; counts (n, Q) how often the resample drew the
    question's episode. (n,)"""
    fams = sorted(set(family) - {"abstention"})
    onehot = (np.asarray(family)[:, None] == np.asarray(fams)[None]).astype(float)  # (Q, F)
    hits = (counts * np.asarray(correct, dtype=float)) @ onehot         # (n, F) right answers per family
    asked = counts @ onehot                                              # (n, F) questions per family
    per = np.where(asked > 0, hits / np.maximum(asked, 1), np.nan)       # a family not drawn: left out
    return np.nanmean(per, axis=1)                                       # (n,)


def ratio_intervals(outcomes, pairs, n=1000, seed=0, level=0.9):
    """Bootstrap intervals of fact-EM ratios: resample the held-out episodes with replacement (an episode's
    questions move together), rescore every condition, and keep the middle `level` of each ratio.
    pairs: {key: (condition, [baselines])} for the ratio condition / best baseline, the best taken again
    in every resample. Returns {key: [low, high] or None (a baseline scored 0 in some resample)}."""
    episode = np.asarray(outcomes["episode"])
    E = int(episode.max()) + 1
    counts = np.random.default_rng(seed).multinomial(E, np.full(E, 1 / E), size=n)[:, episode]  # (n, Q)
    names = {c for num, dens in pairs.values() for c in (num, *dens)}
    m = {c: resampled_fact_em(outcomes["correct"][c], outcomes["family"], counts) for c in sorted(names)}  # (n,)
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    out = dict(level=level, resamples=n)
    for key, (num, dens) in pairs.items():
        best = np.max([m[d] for d in dens], axis=0)                      # (n,)
        out[key] = [float(x) for x in np.percentile(m[num] / best, [lo, hi])] if (best > 0).all() else None
    return out


def ratios(results, dm_name, budget, outcomes=None):
    """On fact EM: δ-mem / frozen backbone, δ-mem / best non-δ-mem at 0 history tokens (and at the budget),
    δ-mem / full context, and δ-mem attached to full context / full context; with per-question outcomes,
    also their 90% bootstrap intervals over the episodes (ci90)."""
    ratio = lambda a, b: a / b if b > 0 else None                      # None: the baseline scored 0
    em = {n: r["fact_em"] for n, r in results.items()}
    non0 = {n: v for n, v in em.items() if not n.startswith("deltamem") and results[n]["history_tokens_in_context"] < 0.5}
    best0 = max(non0, key=non0.get)
    out = dict(vs_frozen_backbone=ratio(em[dm_name], em["no_history"]),
               vs_best_non_deltamem=ratio(em[dm_name], non0[best0]), best_non_deltamem=best0)
    pairs = dict(vs_frozen_backbone=(dm_name, ["no_history"]), vs_best_non_deltamem=(dm_name, sorted(non0)))
    if "full_context" in em:
        out["vs_full_context"] = ratio(em[dm_name], em["full_context"])
        pairs["vs_full_context"] = (dm_name, ["full_context"])
        if f"{dm_name}_full_context" in em:                              # the paper's protocol: memory + context
            out["full_context_with_memory_vs_without"] = ratio(em[f"{dm_name}_full_context"], em["full_context"])
    w = f"{dm_name}_w{budget}"
    if w in results:
        nonw = {n: v for n, v in em.items() if not n.startswith("deltamem")
                and 0.5 <= results[n]["history_tokens_in_context"] <= budget + 0.5}
        if nonw:
            bw = max(nonw, key=nonw.get)
            out[f"vs_best_non_deltamem_at_{budget}"] = ratio(em[w], nonw[bw])
            out[f"best_non_deltamem_at_{budget}"] = bw
            pairs[f"vs_best_non_deltamem_at_{budget}"] = (w, sorted(nonw))
    if outcomes is not None:
        out["ci90"] = ratio_intervals(outcomes, pairs)
        out.update(overwrite_ratios(outcomes, dm_name))
    return out


def overwrite_ratios(outcomes, dm_name, baseline="hebbian"):
    """Where the delta rule should win: on the updates only an erase can keep (tasks.overwritten_later),
    δ-mem / hebbian on EM and on the stale rate (an older value answered; lower is better), each with its
    90% bootstrap interval over the episodes. {} without such questions or a hebbian memory."""
    keep = np.flatnonzero(outcomes.get("updated", []))
    if not len(keep) or baseline not in outcomes["correct"] or dm_name not in outcomes["correct"]:
        return {}
    out = {}
    for key, per_question in (("updates_vs_hebbian", outcomes["correct"]), ("stale_vs_hebbian", outcomes["stale"])):
        sub = dict(family=["update"] * len(keep), episode=np.asarray(outcomes["episode"])[keep],
                   correct={c: np.asarray(per_question[c], dtype=float)[keep] for c in (dm_name, baseline)})
        num, den = sub["correct"][dm_name].mean(), sub["correct"][baseline].mean()
        out[key] = float(num / den) if den > 0 else None
        out.setdefault("ci90_overwrites", {})[key] = ratio_intervals(sub, {key: (dm_name, [baseline])})[key]
    return out


def write_results(cfg, results, per_split, general, dm_name, extra=None, outcomes=None):
    out = dict(conditions=results, per_split=per_split, general_val_loss=general,
               ratios=ratios(results, dm_name, cfg["eval_read_window"], outcomes), config=cfg, **(extra or {}))
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
          f"Ratios of fact EM (every family but abstention):\n\n"
          f"- δ-mem / frozen backbone (0 history tokens): {x(r['vs_frozen_backbone'])}{ci('vs_frozen_backbone')}\n"
          f"- δ-mem / best non-δ-mem at 0 history tokens ({r['best_non_deltamem']}): "
          f"{x(r['vs_best_non_deltamem'])}{ci('vs_best_non_deltamem')}\n")
    if "vs_full_context" in r:
        md += f"- δ-mem (0 history tokens) / full context: {x(r['vs_full_context'])}{ci('vs_full_context')}\n"
    if r.get("full_context_with_memory_vs_without") is not None:
        md += f"- full context with δ-mem attached / without: {x(r['full_context_with_memory_vs_without'])}\n"
    W = cfg["eval_read_window"]
    if f"vs_best_non_deltamem_at_{W}" in r:
        md += (f"- δ-mem / best non-δ-mem at {W} history tokens ({r[f'best_non_deltamem_at_{W}']}): "
               f"{x(r[f'vs_best_non_deltamem_at_{W}'])}{ci(f'vs_best_non_deltamem_at_{W}')}\n")
    if general:
        md += (f"- general validation loss: backbone {general['backbone']:.4f}, with memory attached after an "
               f"unrelated write {general['with_memory']:.4f} "
               f"({100 * (general['with_memory'] / general['backbone'] - 1):+.2f}%)\n")
    n_upd = next(iter(results.values())).get("n_updated")
    if n_upd:                                                            # where the delta rule should win
        md += (f"\nUpdates across sessions ({n_upd} questions whose latest value was said in a later session than "
               f"every older one: only a memory that erases holds the latest; stale = an older value answered):\n\n"
               "| condition | EM | stale rate |\n|---|---|---|\n"
               + "".join(f"| {n} | {v['updated_em']:.2f} | {v['updated_stale']:.2f} |\n" for n, v in results.items()))
        if r.get("updates_vs_hebbian") is not None:
            iv = lambda key: "–".join(f"{v:.2f}x" for v in r["ci90_overwrites"][key]) if r["ci90_overwrites"][key] else "n/a"
            md += (f"\n- δ-mem / hebbian (the same recipe): EM {x(r['updates_vs_hebbian'])} (90% bootstrap interval "
                   f"{iv('updates_vs_hebbian')}), stale rate {x(r['stale_vs_hebbian'])} ({iv('stale_vs_hebbian')})\n")
    md += "\nfact EM per held-out split:\n\n| condition | " + " | ".join(per_split) + " |\n|---|" + \
          "---|" * len(per_split) + "\n"
    for name in results:
        md += f"| {name} | " + " | ".join(f"{per_split[s][name]:.2f}" for s in per_split) + " |\n"
    if "shared" in out:                                                  # evaluate_shared's table
        md += ("\nBy the person: EM when N people share one attribute (held-out episodes, one question per "
               "person; 0 history tokens unless the name says full context):\n\n" + shared_table(out["shared"]))
    tmp = os.path.join(cfg["out_dir"], "results.md.tmp")
    with open(tmp, "w") as f:                                            # atomic: tmp file, then rename
        f.write(md)
    os.replace(tmp, os.path.join(cfg["out_dir"], "results.md"))
    print("\n" + md)
    return out


# ----------------------------------------------------------------------------------------------
# the main job
# ----------------------------------------------------------------------------------------------

def backbone_path(cfg):
    """Where the backbone is read from: --backbone, or by default <out_dir>/backbone.pt."""
    return cfg["backbone"] or os.path.join(cfg["out_dir"], "backbone.pt")


def memory_path(cfg, name):
    """Where a run writes (and resumes, and reuses) the memory `name`."""
    return os.path.join(cfg["out_dir"], f"memory_{name}.pt")


def find_backbone(cfg, defaults=None, column=None, trainable=True):
    """(path, ours): where the backbone is read from, and whether --backbone was left at the script's
    default (defaults and column: the script's DEFAULTS and presets, train_memory's unless told), the
    one backbone it pretrains when missing. trainable=False (a memory to evaluate): it must exist too,
    since a memory only works on the backbone it was trained with. A missing file is one line."""
    path = backbone_path(cfg)
    ours = cfg["backbone"] == {**(defaults or DEFAULTS), **(column or PRESETS).get(cfg["preset"], {})}["backbone"]
    if not os.path.exists(path):
        if not ours:
            raise UserError(f"backbone checkpoint {path} not found: train one with "
                            f"`python train_backbone.py --out_dir={os.path.dirname(path) or '.'}`")
        if not trainable:
            raise UserError(f"backbone checkpoint {path} not found: pass the one the memory was trained with, "
                            f"e.g. --backbone=out/backbone.pt (the main job's)")
    return path, ours


def ensure_backbone(cfg, defaults=None, column=None):
    """(GPT, checkpoint) of the backbone; the default one is pretrained first (saying so) when it is
    missing, and resumed when its pretraining was interrupted. defaults, column: as find_backbone."""
    path, ours = find_backbone(cfg, defaults, column)
    args = [f"--preset={cfg['preset']}", f"--out_dir={os.path.dirname(path) or '.'}", f"--data_dir={cfg['data_dir']}",
            f"--seed={cfg['seed']}"]                                     # a seed trains its own backbone too
    if not os.path.exists(path):
        print(f"backbone: {path} not found: pretraining it now and writing it there "
              f"(python train_backbone.py {' '.join(args)})")
        train_backbone.train(parse_config(args, train_backbone.DEFAULTS, train_backbone.PRESETS))
    elif ours:                                                           # an interrupted pretraining resumes
        ckpt = load_checkpoint(path, required=("model", "config"))
        done, total = ckpt.get("iter_num", 0), ckpt.get("train_config", {}).get("max_iters", 0)
        if done < total:
            print(f"backbone: {path} stopped at iteration {done} of {total}: resuming its pretraining there first")
            train_backbone.train(parse_config(args + ["--resume"], train_backbone.DEFAULTS, train_backbone.PRESETS))
    gpt, ckpt = load_backbone(path)
    print(f"backbone: read from {path} ({ckpt.get('iter_num', '?')} iterations, pretraining speed "
          f"{fmt_ms_per_iter(ckpt.get('ms_per_iter'))})")
    return gpt, ckpt


def check_config(cfg):
    """Every flag's range, before any work starts (the checks that need the backbone: check_fits)."""
    check_positive(cfg, ("max_iters", "batch_size", "learning_rate", "eval_episodes", "log_interval", "eval_interval"))
    if cfg["task"] not in ("msqa", "recall", "overwrites", "mix"):
        raise UserError(f"--task={cfg['task']!r} is not valid; choose one of msqa, recall, overwrites, mix")
    if cfg["bind_rivals"] not in ("all", "same"):
        raise UserError(f"--bind_rivals={cfg['bind_rivals']!r} is not valid; choose all or same")
    if not 0 <= cfg["bind_null"] < 1:
        raise UserError(f"--bind_null={cfg['bind_null']!r} is out of range: use 0 (off) or a cosine in (0, 1)")
    if cfg["bind_tokens"] not in (1, 2) or isinstance(cfg["bind_tokens"], bool):
        raise UserError(f"--bind_tokens={cfg['bind_tokens']!r} is not valid; choose 1 or 2")
    if cfg["episode_preset"] not in tasks.PRESETS:
        raise UserError(f"--episode_preset={cfg['episode_preset']!r} is not valid; choose one of "
                        f"{', '.join(tasks.PRESETS)}")
    whole = lambda lo: (lambda v: v >= lo, f"a whole number >= {lo}")
    check_ranges(cfg, dict(eval_read_window=whole(1), val_episodes=whole(1), warmup_iters=whole(0), read_window=whole(0),
        min_lr=(lambda v: 0 <= v <= cfg["learning_rate"], "a number in [0, --learning_rate]"),
        grad_clip=(lambda v: v > 0, "a number > 0, e.g. 1.0"), alpha=(lambda v: v > 0, "a number > 0, e.g. 16"),
        beta_target=(lambda v: 0 <= v <= 1, "a number in [0, 1], e.g. 0.05"),
        beta_reg=(lambda v: v >= 0, "a number >= 0, e.g. 0.01"),
        general_reg=(lambda v: v >= 0, "a number >= 0, e.g. 0.5 (0 turns it off)"), general_len=whole(0),
        read_window_share=(lambda v: 0 <= v <= 1, "a number in [0, 1], e.g. 0.5"),
        shared_share=(lambda v: 0 <= v <= 1, "a number in [0, 1], e.g. 0.5"),
        novel_values=(lambda v: 0 <= v <= 1, "a number in [0, 1], e.g. 0.5"),
        name_lr_scale=(lambda v: v > 0, "a number > 0, e.g. 0.1"),
        aux_share=(lambda v: 0 < v <= 1, "a number in (0, 1], e.g. 0.5"), max_questions=whole(0),
        absent_questions=whole(0),
        n_pairs=(lambda v: 0 <= v <= len(tasks.pools_for("train")["names"]), "0 or a number of pairs, e.g. 8"),
        max_pairs=(lambda v: v == 0 or 2 <= v <= len(tasks.pools_for("train")["names"]), "0 or a number >= 2, e.g. 32")))
    check_device(cfg["device"])
    if cfg["layers"] != "all" and not all(x.strip().isdigit() for x in str(cfg["layers"]).split(",")):
        raise UserError(f"--layers={cfg['layers']} is not valid: use all or comma-separated layer indices, e.g. 0,2")
    for base in [b for b in cfg["baselines"].split(",") if b]:
        if base not in ("lora", "hebbian"):
            raise UserError(f"--baselines: unknown baseline {base!r}; choose from lora, hebbian (or an empty list)")
    if cfg["eval_only"] and not cfg["memory"]:
        raise UserError("--eval_only needs --memory=CKPT (and --episodes=FILE.jsonl, or the held-out splits "
                        "of --episode_preset)")
    memory_config(cfg)                            # MemoryConfig checks the memory's own flags (sizes, choices)


def check_memory_path(cfg, path):
    """A memory checkpoint to read (--memory, or the demo's default): it exists and check_memory_file."""
    if not os.path.exists(path):
        fix = ("check --memory (train_memory.py writes <out_dir>/memory_<name>.pt)" if cfg["memory"] else
               "train one with `python train_memory.py` (or pass --memory=CKPT)")
        raise UserError(f"memory checkpoint {path} not found: {fix}")
    check_memory_file(path)


def check_files(cfg, defaults=None, column=None):
    """Every file the command names, checked before any data is prepared or any model trained: it exists,
    loads without running code and holds the right entries (whether a memory belongs to the backbone
    needs the backbone: load_memory). defaults, column: as find_backbone.
    Returns (the episodes of --episodes, the demo's inputs), each None when not asked for."""
    if cfg["memory"] and not cfg["demo"]:                               # the demo checks the memory it reads
        check_memory_path(cfg, cfg["memory"])
    episodes = None
    if cfg["episodes"]:
        try:
            episodes = tasks.load_jsonl(cfg["episodes"])
        except tasks.TaskFileError as e:
            raise UserError(str(e)) from None
    demo_in = demo_inputs(cfg) if cfg["demo"] else None
    path, _ = find_backbone(cfg, defaults, column, trainable=not (cfg["eval_only"] or cfg["demo"]))
    if os.path.exists(path):
        check_backbone_file(path)
    return episodes, demo_in


def memories_to_train(cfg):
    """[(kind, name)] of the main job: the memory of the flags, then the baselines."""
    out = [(memory_kind(cfg), condition_name(cfg))]
    for base in [b for b in cfg["baselines"].split(",") if b]:
        if not (base == "hebbian" and cfg["update"] == "hebbian"):         # the memory is hebbian already
            out.append((base, base))
    return out


def check_fits(cfg, gpt):
    """The memory flags that depend on the backbone (layers that exist, heads x rank within the width:
    DeltaMemGPT checks them, here its error becomes the one-line message; general rows within the block)."""
    try:
        DeltaMemGPT(gpt, memory_config(cfg))
    except ValueError as e:
        raise UserError(f"--layers={cfg['layers']} --heads={cfg['heads']} --rank={cfg['rank']}: {e}") from None
    if cfg["general_len"] > gpt.config.block_size:
        raise UserError(f"--general_len={cfg['general_len']} does not fit the backbone's block_size="
                        f"{gpt.config.block_size}: use at most that, or 0 for the block")


class Timing:
    """Wall time per stage of a run and the backbone's pretraining speed: the run's last line and
    results.json's "timing", so a user can scale the times to their machine."""

    def __init__(self):
        self.start, self.stages, self.backbone_ms_per_iter = time.time(), {}, None

    @contextmanager
    def stage(self, name):
        t = time.time()
        yield
        self.stages[name] = self.stages.get(name, 0.0) + time.time() - t

    def as_dict(self):
        return dict(backbone_ms_per_iter=self.backbone_ms_per_iter, stages=dict(self.stages),
                    total=time.time() - self.start)

    def summary(self):
        stages = " | ".join(f"{name} {fmt_time(s)}" for name, s in self.stages.items())
        return (f"timing: {stages} | total {fmt_time(time.time() - self.start)}; backbone pretraining speed "
                f"{fmt_ms_per_iter(self.backbone_ms_per_iter)} (compare it with another machine's to scale times)")


def main(argv=None):
    timing = Timing()
    cfg = parse_config(sys.argv[1:] if argv is None else argv, DEFAULTS, PRESETS)
    check_config(cfg)
    episodes, demo_in = check_files(cfg)                                 # before any work starts
    if not (cfg["eval_only"] or cfg["demo"]):
        for _, name in memories_to_train(cfg):                           # what this run would resume or reuse
            if os.path.exists(memory_path(cfg, name)):
                check_memory_file(memory_path(cfg, name))
    writable_dir(cfg["out_dir"])
    from data.prepare import load_tokenizer
    with timing.stage("data"):
        ensure_data(cfg["data_dir"])
        enc = load_tokenizer(cfg["data_dir"])
    device = autodetect_device() if cfg["device"] == "auto" else cfg["device"]
    torch.manual_seed(cfg["seed"])
    with timing.stage("backbone"):
        gpt, bckpt = ensure_backbone(cfg)
    timing.backbone_ms_per_iter = bckpt.get("ms_per_iter")
    if gpt.config.vocab_size != enc.n_vocab:
        raise UserError(f"backbone {backbone_path(cfg)} has vocabulary {gpt.config.vocab_size} but "
                        f"{cfg['data_dir']} has {enc.n_vocab}: use the data it was trained on (--data_dir)")
    gpt.to(device)
    if cfg["eval_only"]:
        eval_only(cfg, enc, gpt, device, episodes, timing)
    elif demo_in is not None:
        demo(enc, gpt, device, *demo_in)
    else:
        main_job(cfg, enc, gpt, device, timing)
    print(timing.summary())


def main_job(cfg, enc, gpt, device, timing):
    """Train the memory and the baselines, evaluate every condition, write results.{json,md,png}."""
    check_fits(cfg, gpt)
    memories = {}
    for kind, name in memories_to_train(cfg):
        with timing.stage(name):
            memories[name] = train_one(kind, name, gpt, enc, cfg, device)
    dm_name = condition_name(cfg)
    with timing.stage("evaluation"):
        results, per_split, outcomes = evaluate(cfg, enc, gpt, memories, device)
        shared = evaluate_shared(cfg, enc, gpt, memories, device) if cfg["task"] in ("msqa", "mix") else None
        general = general_val_loss(cfg, enc, gpt, memories[dm_name], device)
    extra = dict(timing=timing.as_dict(), **({} if shared is None else dict(shared=shared)))
    write_results(cfg, results, per_split, general, dm_name, extra, outcomes)
    plot_results(results, os.path.join(cfg["out_dir"], "results.png"))


def eval_only(cfg, enc, gpt, device, episodes, timing):
    """Evaluate the memory of --memory on the episodes of --episodes (None: the preset's held-out splits)."""
    try:
        model, ckpt = load_memory(cfg["memory"], gpt)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e))
    model.to(device)
    saved = dict(asdict(model.mcfg), write=model.mcfg.write_unit)       # the flag --write is MemoryConfig.write_unit
    name = condition_name(dict(cfg, **{k: v for k, v in saved.items() if k in cfg}))
    with timing.stage("evaluation"):
        results, per_split, outcomes = evaluate(cfg, enc, gpt, {name: model}, device,
                                                None if episodes is None else {"file": episodes})
    write_results(cfg, results, per_split, None, name,
                  dict(episodes=cfg["episodes"], memory=cfg["memory"], timing=timing.as_dict()), outcomes)


# ----------------------------------------------------------------------------------------------
# demo: your own sessions, the same questions answered with and without the memory
# ----------------------------------------------------------------------------------------------

DEMO_CONDITIONS = ["no memory (question only)", "δ-mem (question only)", "full context (history in the window)"]
DEMO_NEW_TOKENS = 16                                                     # longest answer the demo decodes


def parse_sessions(text, name):
    """Plain text -> (Episode, questions): one chat line per line; a blank line or a line starting
    with "Session" starts a new session; lines after a line "---" are questions, one per line."""
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
    path = cfg["memory"] or memory_path(cfg, condition_name(cfg))
    check_memory_path(cfg, path)
    return ep, questions, path


def demo_states(model, enc, ep, device):
    """The memory's states after writing ep's sessions (collate_episodes wants a question: a blank one)."""
    return write_states(model, enc, [tasks.Episode(ep.sessions, [tasks.Question("", "", "demo")])], device)


@torch.no_grad()
def demo_answers(enc, gpt, model, states, ep, questions, device, new_tokens=DEMO_NEW_TOKENS):
    """For each question: (no memory, δ-mem, full context) greedy answers, the memory holding `states`."""
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
    try:
        model, _ = load_memory(path, gpt)
    except FileNotFoundError as e:
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
    for j, f in enumerate(fams + ["fact EM"]):
        vals = [results[n].get("fact_em", fact_em(results[n]["per_family"])) if f == "fact EM"   # older files:
                else results[n]["per_family"].get(f, 0) for n in names]                        # from families
        ax.bar(np.arange(len(names)) + j * w, vals, w, label=f, edgecolor="black" if f == "fact EM" else None)
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
    run_cli(main, on_interrupt="\ninterrupted; trained memories are kept in --out_dir: "
                                             "re-run the same command to resume")  # e.g. during evaluation

"""
Pretrain the backbone GPT on the prepared mix (corpus + task-format documents).

    python train_backbone.py                      # cpu preset: 4 layers, width 128, block 256, smeared keys
    python train_backbone.py --smear_keys=1       # plain attention (nanoGPT's): it recalls pairs at 1/N
    python train_backbone.py --preset=gpu         # 6 layers, width 384, block 512
    python train_backbone.py --max_iters=200 --out_dir=out-small
    python train_backbone.py --resume             # continue from <out_dir>/backbone.pt

Any config key below can be overridden with --key=value. nanoGPT's anatomy: config, data, model,
optimizer, a training loop with periodic evaluation and checkpoints, then a short report. One marked
block, SHARED TRAINING PIECES (the loop fit, checkpoints, greedy answers), is what train_memory.py and the
tools in dev/ import; the rest is this script's own.
"""
import math
import os
import pickle
import re
import shlex
import signal
import sys
import threading
import time

import numpy as np
import torch

from nanodeltamem import GPT, GPTConfig, DeltaMemGPT, MemoryConfig, autodetect_device, unfit
from data.config import UserError, check_device, check_positive, check_ranges, parse_config  # the flag parser

# ----------------------------------------------------------------------------------------------
# config: defaults, then a preset, then --key=value overrides
# ----------------------------------------------------------------------------------------------
DEFAULTS = dict(
    preset="cpu",
    data_dir="data/pydoc",      # made by data/prepare.py (run automatically for the default corpus)
    out_dir="out",
    resume=False,
    seed=1337,
    device="auto",              # auto: cuda > mps > cpu
    compile=False,
    # model
    n_layer=4, n_head=4, n_embd=128, block_size=256, dropout=0.0, smear_keys=4,
    # optimisation
    # (the steps form the lookup, not the rows: 8 rows a step cost ~2/3 of 16's, dev/LOG.md 2026-12-03)
    batch_size=8, max_iters=1500, learning_rate=6e-3, min_lr=1e-3, warmup_iters=100,
    weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0,
    # logging / evaluation
    eval_interval=250, eval_iters=8, log_interval=25, eval_episodes=100,
)
# every preset of every script in one table: what it changes in that script's defaults
# (dev/ablate.py takes the memory's column and then its own)
PRESET_TABLE = {
    "cpu": dict(backbone=dict(), memory=dict(), ablate=dict()),             # the defaults
    # 2x the backbone's steps, and a 5x longer memory run with the deltanet rule (no forgetting)
    # (train_memory.py reads and writes its backbone in its --out_dir; the sweeps read the main job's)
    "cpu_long": dict(backbone=dict(max_iters=3000, out_dir="out-long"),
                     memory=dict(out_dir="out-long", max_iters=1500, update="deltanet", gate_bias=0.0),
                     ablate=dict(out_dir="out-long-ablate", backbone="out-long/backbone.pt")),
    # a 6-layer, width-384 backbone; the memory's chunk 64 means few sequential scan steps
    "gpu": dict(backbone=dict(n_layer=6, n_head=6, n_embd=384, block_size=512, batch_size=64, max_iters=3000,
                              learning_rate=1e-3, min_lr=1e-4, warmup_iters=200, eval_interval=500, eval_iters=20,
                              out_dir="out-gpu"),
                memory=dict(batch_size=32, max_iters=2000, eval_episodes=200, val_episodes=256, chunk_size=64,
                            out_dir="out-gpu"),
                ablate=dict(out_dir="out-gpu-ablate", backbone="out-gpu/backbone.pt")),
}


def presets(script):
    """One script's column of PRESET_TABLE: {preset: overrides} (script: backbone, memory or ablate)."""
    col = lambda row: {**row["memory"], **row["ablate"]} if script == "ablate" else dict(row[script])
    return {name: col(row) for name, row in PRESET_TABLE.items()}


PRESETS = presets("backbone")
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "smear_keys")


# ==============================================================================================
# SHARED TRAINING PIECES: the API that train_memory.py, dev/ablate.py and dev/bench.py import (with
# PRESET_TABLE / presets above; the flag parser and UserError are data/config.py's). Below the block,
# everything is this script's own (train_memory.py calls its train() to pretrain a missing backbone).
#   running a script   run_cli, ensure_data, writable_dir, fmt_time, fmt_ms_per_iter
#   the one loop       fit (lr_at, GracefulStop): the backbone's and every memory's
#   checkpoints        save_atomic, load_checkpoint, load_weights, check_backbone_file, check_memory_file,
#                      load_backbone, save_memory, load_memory (MEMORY_ENTRIES)
#   answers            greedy_answers, model_logits
# ==============================================================================================

def writable_dir(path):
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write_test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to out_dir {path!r} ({e.strerror}): pass --out_dir=<a writable folder>")


def fmt_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def fmt_ms_per_iter(ms):
    """The backbone's pretraining speed for a summary; None (a checkpoint older than the measure): unknown."""
    return "unknown" if ms is None else f"{ms:.0f} ms/iter"


def ensure_data(data_dir):
    """Load the prepared data; prepare the default corpus on the spot if it is missing."""
    from data.prepare import DataError, load_meta, prepare
    try:
        return load_meta(data_dir)
    except DataError as e:
        if os.path.normpath(data_dir) != os.path.normpath(DEFAULTS["data_dir"]):
            raise UserError(str(e))
        print(f"{data_dir} is missing: preparing it now (python data/prepare.py)")
        prepare(corpus="pydoc")
        return load_meta(data_dir)


def run_cli(fn, on_interrupt=None):
    """Run a script's main: a mistake the user can fix is one line on stderr and exit code 2; with
    on_interrupt, a Ctrl-C outside a training loop prints that line and exits 130."""
    from data.prepare import DataError
    try:
        return fn()
    except (UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if on_interrupt is None:
            raise
        print(on_interrupt, file=sys.stderr)
        sys.exit(130)


class GracefulStop:
    """Ctrl-C (SIGINT) or `kill` (SIGTERM) only sets a flag: the training loop checks it between
    iterations, so the checkpoint it then saves never holds a half-applied optimizer step. A second
    Ctrl-C stops at once, without saving (the last periodic checkpoint stays). restore() undoes it."""

    def __init__(self, ckpt_path):
        self.ckpt_path, self.requested = ckpt_path, False
        main = threading.current_thread() is threading.main_thread()  # signals can only be caught there
        self.old = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}

    def restore(self):
        for sig, old in self.old.items():
            signal.signal(sig, old)

    def handle(self, signum, frame):
        if self.requested:
            print(f"\nstopped without saving; the last checkpoint is {self.ckpt_path}", flush=True)
            raise SystemExit(130)
        self.requested = True
        print("\nstopping after this iteration to save a checkpoint (Ctrl-C again: stop now)", flush=True)

    def check(self):
        """Called at an iteration boundary: turns a pending stop request into KeyboardInterrupt."""
        if self.requested:
            raise KeyboardInterrupt


def lr_at(it, cfg):
    """Linear warmup, then cosine decay to min_lr."""
    if it < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (it + 1) / cfg["warmup_iters"]
    frac = (it - cfg["warmup_iters"]) / max(1, cfg["max_iters"] - cfg["warmup_iters"])
    return cfg["min_lr"] + 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))) * (cfg["learning_rate"] - cfg["min_lr"])


def fit(loss_at, params, optimizer, cfg, start, ckpt_path, save, log, evaluate=None, tag="", resume_hint=""):
    """The one training loop, the backbone's and every memory's (minGPT's Trainer.run).

    For it = start .. max_iters - 1: the learning rate lr_at(it), loss = loss_at(it) (its batch must depend
    on it alone, so a resumed run sees the same batches), a one-line error on a non-finite loss, then
    backward, clip to grad_clip, step. Every log_interval steps and at the end, log(it, mean loss, lr,
    seconds per step); every eval_interval steps (default: log_interval) and at the end, evaluate(it).
    Ctrl-C or kill stops between steps: save(it), then resume_hint, exit 130. Returns the last iteration.
    """
    stop = GracefulStop(ckpt_path)                                       # Ctrl-C / kill: stop between steps
    it, running, t_last = start, [], time.time()
    every = cfg.get("eval_interval", cfg["log_interval"])
    try:
        while it < cfg["max_iters"]:
            stop.check()
            lr = lr_at(it, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)                # a group may learn at its own rate
            loss = loss_at(it)
            if not torch.isfinite(loss):
                raise UserError(f"{tag}loss became {loss.item()} at iteration {it}; the last good checkpoint is "
                                f"{ckpt_path}. Try a lower --learning_rate (now {cfg['learning_rate']})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
            optimizer.step()
            running.append(loss.item())
            it += 1
            last = it == cfg["max_iters"]
            if it % cfg["log_interval"] == 0 or last:
                log(it, float(np.mean(running)), lr, (time.time() - t_last) / len(running))
                running = []
            if evaluate is not None and (it % every == 0 or last):
                evaluate(it)
            if not running:
                t_last = time.time()                                     # evaluation is not training time
    except KeyboardInterrupt:
        save(it)
        print(f"\ninterrupted at iteration {it}: checkpoint saved to {ckpt_path}.\n{resume_hint}", flush=True)
        sys.exit(130)
    finally:
        stop.restore()
    return it


# checkpoints: written atomically, read without running code, every entry type-checked

def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: an interrupted save never leaves half a file."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


# the type of every entry the project's checkpoints hold ("tensors": a state_dict, names -> tensors);
# an entry of another type is refused in one line, before any code trips over it
ENTRY_TYPES = dict(model="tensors", config=dict, optimizer=dict, iter_num=int, history=list, train_config=dict,
                   data=dict, memory="tensors", mem_config=dict, backbone_hash=str, ms_per_iter=float)
MEMORY_ENTRIES = ("memory", "mem_config", "backbone_hash")              # what every memory checkpoint holds


def load_checkpoint(path, required=()):
    """torch.load with one-line errors for a missing, truncated or foreign file.

    weights_only=True: unpickling builds only tensors and plain Python values, so a crafted file cannot
    run code while it loads; the project's checkpoints hold nothing else (configs are dicts).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch names the refused object as "GLOBAL module.name" (older releases: "Unsupported class ...")
        refused = re.search(r"(?:GLOBAL|Unsupported class) ([\w.]+)", str(e))
        if refused is None:                                              # not a pickle at all
            raise UserError(f"checkpoint {path} is corrupt or truncated (UnpicklingError); "
                            f"delete it and train again") from None
        raise UserError(f"{path} holds objects that loading would have to run code for ({refused[1]}); this "
                        f"project never writes such files: delete it and train again, or re-save it with plain "
                        f"tensors and dicts") from None
    except Exception as e:
        raise UserError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}); "
                        f"delete it and train again") from None
    missing = [k for k in required if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path} is not the right kind of checkpoint (missing {', '.join(missing)}); "
                        f"pass the right file, or delete it and train again")
    for key, kind in ENTRY_TYPES.items():
        if isinstance(ckpt, dict) and key in ckpt and not _is_a(ckpt[key], kind):
            want = "dict of tensors" if kind == "tensors" else kind.__name__
            raise UserError(f"{path} is not the right kind of checkpoint ({key!r} is {type(ckpt[key]).__name__}, "
                            f"expected {want}); pass the right file, or delete it and train again")
    return ckpt


def _is_a(value, kind):
    if kind == "tensors":
        return isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values())
    return isinstance(value, kind)


def load_weights(path, ckpt, key, module, optimizer=None):
    """A resumed run's weights (ckpt[key]) and optimizer state; what does not fit this code is one line."""
    try:
        module.load_state_dict(ckpt[key])
        if optimizer is not None and "optimizer" in ckpt:
            optimizer.load_state_dict(ckpt["optimizer"])
    except (TypeError, ValueError, KeyError, RuntimeError) as e:        # other shapes, another optimizer
        raise UserError(str(unfit(path, e))) from None


BACKBONE_ENTRIES = ("model", "config")                                  # what every backbone checkpoint holds


def checked_config(path, ckpt, key, kind):
    """kind(**ckpt[key]), e.g. the GPTConfig of a backbone checkpoint; a config this code does not know
    (an unknown key, an invalid value) is one line."""
    try:
        return kind(**ckpt[key])
    except (TypeError, ValueError) as e:
        raise UserError(str(unfit(path, e))) from None


def check_backbone_file(path):
    """Before any work starts: the file loads without running code, holds a backbone's entries with the
    right types and a config this code builds (its weights are checked when it loads: load_backbone)."""
    checked_config(path, load_checkpoint(path, required=BACKBONE_ENTRIES), "config", GPTConfig)


def check_memory_file(path):
    """Before any work starts: as check_backbone_file, for a memory checkpoint (whether it belongs to the
    backbone is checked once that is loaded: load_memory)."""
    checked_config(path, load_checkpoint(path, required=MEMORY_ENTRIES), "mem_config", MemoryConfig)


def load_backbone(path):
    """A GPT from a train_backbone.py checkpoint (unwrapped weights + config)."""
    ckpt = load_checkpoint(path, required=BACKBONE_ENTRIES)
    try:
        model = GPT(GPTConfig(**ckpt["config"]))
    except (TypeError, ValueError, AssertionError) as e:                 # unknown config keys
        raise UserError(str(unfit(path, e))) from None
    load_weights(path, ckpt, "model", model)
    return model, ckpt


def save_memory(model, path, **extra):
    """A memory checkpoint: the memory's weights and config, bound to its backbone (DeltaMemGPT.checkpoint)."""
    save_atomic(model.checkpoint(**extra), path)


def load_memory(path, gpt):
    """(DeltaMemGPT, checkpoint) from save_memory's file; another backbone or shape is one line."""
    ckpt = load_checkpoint(path, required=MEMORY_ENTRIES)
    try:
        return DeltaMemGPT.from_checkpoint(ckpt, gpt, name=path), ckpt
    except ValueError as e:
        raise UserError(str(e)) from None


# greedy answers, for every evaluation

def model_logits(model, device):
    """greedy_answers' logits_fn for a model that needs no per-row state: its logits (b, T, V) on the CPU."""
    return lambda idx, rows, cache: model(idx.to(device), cache=cache)[0].float().cpu()


@torch.no_grad()
def greedy_answers(logits_fn, prompts, enc, max_new_tokens=6, batch_size=64):
    """Greedy-decode an answer for every prompt (a list of token lists), stopping at a newline.

    logits_fn(idx (b, T), rows, cache) -> logits (b, T, V); `rows` are the prompts' indices, so a memory
    model can give each row its own episode's state; `cache` is the model's decoding cache (GPT.forward):
    the first call gets the prompts, every later call only the token just chosen. Prompts of equal
    length share a batch.
    """
    newline = enc.encode_ordinary("\n")[0]
    out = [None] * len(prompts)
    by_len = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for _, rows_all in sorted(by_len.items()):
        for s in range(0, len(rows_all), batch_size):
            rows = rows_all[s:s + batch_size]
            idx = torch.tensor([prompts[i] for i in rows], dtype=torch.long)  # (b, T) the prompts
            cache, new = {}, []
            for _ in range(max_new_tokens):
                nxt = logits_fn(idx, rows, cache)[:, -1].argmax(-1, keepdim=True)  # (b, 1)
                new.append(nxt)
                idx = nxt                                                # next call: the new token only
                if bool((torch.cat(new, 1) == newline).any(1).all()):
                    break
            new = torch.cat(new, 1).tolist()
            for i, toks in zip(rows, new):
                toks = toks[:toks.index(newline)] if newline in toks else toks
                out[i] = enc.decode(toks).split("\n")[0]                   # also a newline inside a token
    return out


# ==============================================================================================
# (end of the shared training pieces) the backbone script's own from here on: how to resume it,
# what it learned (its report after training), then its training
# ==============================================================================================

def resume_command(cfg):
    """The command line that resumes this run: every option that differs from its default, plus --resume."""
    base = dict(DEFAULTS, **PRESETS[cfg["preset"]])
    args = [shlex.quote(f"--{k}={v}") for k, v in cfg.items() if k not in ("resume", "preset") and v != base[k]]
    preset = [f"--preset={cfg['preset']}"] if cfg["preset"] != DEFAULTS["preset"] else []
    return " ".join(["python train_backbone.py", "--resume", *preset, *args])


def context_exact_match(model, enc, episodes, with_history, device="cpu", max_new_tokens=6):
    """Exact match of the bare backbone on task questions, with the history in its context or not.

    The prompt is the history (left-truncated to fit the block) + "Q: <question>\\nA:".
    Returns {family: accuracy} and the macro average under "macro".
    """
    from data import tasks
    block = model.config.block_size - max_new_tokens
    prompts, gold, fams = [], [], []
    for ep in episodes:
        hist = enc.encode_ordinary(tasks.render_history(ep)) if with_history else []
        for q in ep.questions:
            prompts.append((hist + tasks.question_prompt(enc, q))[-block:])
            gold.append(q.a)
            fams.append(q.family)
    preds = greedy_answers(model_logits(model, device), prompts, enc, max_new_tokens)
    return tasks.score(preds, gold, fams)


def binding_exact_match(model, enc, pairs=(1, 2, 4, 8), n_episodes=40, device="cpu", seed=4321):
    """Does the backbone bind a value to its name? Exact match on plain recall ("- Alice: tiger." lines,
    then "Alice?") with N stored pairs in its context, each name asked once. A backbone that finds *a*
    stored value but not *the asked one's* scores 1/N; binding scores well above it.
    Returns {N: accuracy}."""
    from data import tasks
    rng = np.random.default_rng(seed)
    out = {}
    for n in pairs:
        episodes = [tasks.make_recall(rng, "small", "iid", n_pairs=n, mix={"recall": 1.0}) for _ in range(n_episodes)]
        out[n] = context_exact_match(model, enc, episodes, True, device)["macro"]
    return out


def shared_exact_match(model, enc, ns=None, n_episodes=40, device="cpu", seed=4322):
    """Does the backbone read its context by the person? Exact match with the history in context on
    msqa episodes where N people share one attribute (tasks.make_shared): the attribute alone gives 1/N.
    Returns {N: (fact EM, abstention on a person never mentioned)}."""
    from data import tasks
    rng = np.random.default_rng(seed)
    out = {}
    for n in ns or tasks.SHARED_N:
        res = context_exact_match(model, enc, [tasks.make_shared(rng, n) for _ in range(n_episodes)], True, device)
        out[n] = (res["single_hop"], res["abstention"])
    return out


def probe_accuracy(features, labels, train_share=2 / 3, ridge=1.0):
    """Held-out accuracy of a linear (ridge-regression) classifier: features (N, d), labels (N,) ints.
    The first train_share of the rows fit it, the rest test it."""
    X = np.c_[features, np.ones(len(features))]                          # (N, d + 1) with a bias column
    Y = np.eye(labels.max() + 1)[labels]                                 # (N, classes) one-hot targets
    n = int(len(X) * train_share)
    W = np.linalg.solve(X[:n].T @ X[:n] + ridge * np.eye(X.shape[1]), X[:n].T @ Y[:n])  # (d + 1, classes)
    return float((np.argmax(X[n:] @ W, 1) == labels[n:]).mean())


@torch.no_grad()
def subject_probe(model, enc, n_names=40, reps=6, seed=0, device="cpu"):
    """Where does the backbone keep a fact's subject? Per layer, the accuracy of a linear probe that
    reads a name off the layer's attention input (what the memory reads too):
      "answer": at the last token of "Q: <name>?\nA:", where it must know whom it is asked about;
      "value":  at the value token of a history line "- <name>: <value>.", where a lookup by attention,
                or a token-level memory write, needs the subject next to the value;
      "chance": 1 / the number of names.
    A backbone that reads facts from its context needs both high. None when the
    tokenizer has fewer than 2 single-token names or no single-token value (tiny test vocabularies)."""
    from data import tasks
    one = lambda w: len(enc.encode_ordinary(w)) == 1 and len(enc.encode_ordinary(" " + w)) == 1
    pools = tasks.pools_for("pretrain")
    names = [w for w in pools["names"] if one(w)][:n_names]
    values = [w for vs in pools["values"].values() for w in vs if one(w)]
    if len(names) < 2 or not values:
        return None                                                      # a tokenizer that splits every name
    rng = np.random.default_rng(seed)
    feats = {"answer": [], "value": []}
    hidden = []
    hooks = [b.ln_1.register_forward_hook(lambda m, i, o: hidden.append(o[0])) for b in model.blocks]
    model.eval()
    try:
        for _ in range(reps):
            for name in names:
                other, v = rng.choice(names), rng.choice(values)
                prefix = enc.encode_ordinary(f"- {other}: {rng.choice(values)}.\nNo further notes.\n")
                for kind, ids, pos in (
                        ("answer", prefix + enc.encode_ordinary(f"Q: {name}?\nA:"), -1),
                        ("value", prefix + enc.encode_ordinary(f"- {name}:") + enc.encode_ordinary(f" {v}")
                         + enc.encode_ordinary(".\n"), None)):
                    pos = pos if pos is not None else len(ids) - len(enc.encode_ordinary(".\n")) - 1
                    hidden.clear()
                    model(torch.tensor([ids], device=device))
                    feats[kind].append([h[pos].float().cpu().numpy() for h in hidden])  # per layer (C,)
    finally:
        for h in hooks:
            h.remove()
    labels = np.tile(np.arange(len(names)), reps)
    out = {kind: [probe_accuracy(np.stack([f[l] for f in fs]), labels) for l in range(len(model.blocks))]
           for kind, fs in feats.items()}
    return dict(out, chance=1 / len(names))


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------

class Rows:
    """Training rows of block_size + 1 tokens from a .bin file laid out as [corpus][EOT doc EOT doc ...].

    With probability task_share a row starts at a task document's first token (the whole episode then
    sits in the context, as the backbone must learn to answer from it); otherwise at a random corpus
    offset. The choice depends only on the generator, so a run resumes with the same batches.
    """

    def __init__(self, data, corpus_tokens, eot, task_share, block_size):
        self.data, self.T, self.share, self.n_corpus = data, block_size, task_share, corpus_tokens
        tail = np.asarray(data[corpus_tokens + 1:])
        ends = np.flatnonzero(tail == eot)                               # every document ends with EOT
        starts = corpus_tokens + 1 + np.concatenate([[0], ends[:-1] + 1]) if len(ends) else np.array([], int)
        self.doc_starts = starts[starts + block_size + 1 <= len(data)]
        if self.n_corpus < block_size + 2 and not len(self.doc_starts):
            raise UserError(f"the prepared data has fewer than block_size={block_size} tokens: use a bigger corpus "
                            f"or a smaller --block_size")

    def batch(self, batch_size, gen):
        task = torch.rand(batch_size, generator=gen) < self.share
        if not len(self.doc_starts):
            task[:] = False
        if self.n_corpus < self.T + 2:
            task[:] = True
        off = torch.randint(max(1, self.n_corpus - self.T - 1), (batch_size,), generator=gen).numpy()
        doc = self.doc_starts[torch.randint(max(1, len(self.doc_starts)), (batch_size,), generator=gen).numpy()
                              % max(1, len(self.doc_starts))] if len(self.doc_starts) else off
        ix = np.where(task.numpy(), doc, off)
        rows = torch.stack([torch.from_numpy(self.data[i:i + self.T + 1].astype(np.int64)) for i in ix])
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()       # x, y: (B, T) each


def make_optimizer(model, cfg):
    decay = [p for p in model.parameters() if p.dim() >= 2]              # matrices and embeddings
    no_decay = [p for p in model.parameters() if p.dim() < 2]            # LayerNorm gains, biases
    groups = [dict(params=decay, weight_decay=cfg["weight_decay"]), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]))


def save_loss_plot(history, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("train", "-"), ("val", "o-")):
        pts = [(h["iter"], h[key]) for h in history if h.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=key, markersize=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train(cfg):
    """Train (or resume) the backbone described by cfg; returns the checkpoint path."""
    from data.prepare import DataError, load_split, load_tokenizer
    check_positive(cfg, ("max_iters", "batch_size", "block_size", "n_layer", "n_head", "n_embd",
                         "learning_rate", "eval_interval", "eval_iters", "log_interval"))
    if cfg["n_embd"] % cfg["n_head"]:
        raise UserError(f"--n_embd={cfg['n_embd']} must be divisible by --n_head={cfg['n_head']}")
    unit = "a number in [0, 1), e.g. 0.9"
    check_ranges(cfg, dict(dropout=(lambda v: 0 <= v < 1, "a number in [0, 1), e.g. 0.0"),
                           min_lr=(lambda v: 0 <= v <= cfg["learning_rate"], "a number in [0, --learning_rate]"),
                           warmup_iters=(lambda v: v >= 0, "a whole number >= 0, e.g. 100"),
                           weight_decay=(lambda v: v >= 0, "a number >= 0, e.g. 0.1"),
                           beta1=(lambda v: 0 <= v < 1, unit), beta2=(lambda v: 0 <= v < 1, unit),
                           grad_clip=(lambda v: v > 0, "a number > 0, e.g. 1.0"),
                           eval_episodes=(lambda v: v >= 0, "a whole number >= 0, e.g. 100")))
    check_device(cfg["device"])
    ckpt_path = os.path.join(cfg["out_dir"], "backbone.pt")
    resumed = None
    if cfg["resume"]:                                                    # checked before any data is prepared
        if not os.path.exists(ckpt_path):
            raise UserError(f"--resume: no checkpoint at {ckpt_path}; train first (drop --resume)")
        resumed = load_checkpoint(ckpt_path, required=("model", "config", "optimizer", "iter_num"))
    writable_dir(cfg["out_dir"])
    meta = ensure_data(cfg["data_dir"])
    try:
        train_data, val_data = load_split(cfg["data_dir"], "train"), load_split(cfg["data_dir"], "val")
    except DataError as e:
        raise UserError(str(e))
    device = autodetect_device() if cfg["device"] == "auto" else cfg["device"]
    torch.manual_seed(cfg["seed"])
    gconf = GPTConfig(vocab_size=meta["vocab_size"], **{k: cfg[k] for k in MODEL_KEYS})
    model = GPT(gconf)
    optimizer = make_optimizer(model, cfg)
    start, history = 0, []
    if resumed is not None:
        if resumed["config"] != gconf.__dict__:
            raise UserError(f"{ckpt_path} holds a model with config {resumed['config']}, not {gconf.__dict__}: "
                            f"resume with the same options, or use another --out_dir")
        load_weights(ckpt_path, resumed, "model", model, optimizer)
        start, history = resumed["iter_num"], resumed.get("history", [])
        print(f"resuming from {ckpt_path} at iteration {start}")
    model.to(device)
    n_params = model.num_params()
    print(f"backbone: {n_params / 1e6:.2f}M parameters, {gconf.n_layer} layers, width {gconf.n_embd}, "
          f"block {gconf.block_size}, vocab {gconf.vocab_size}; device {device}; "
          f"{len(train_data):,} training tokens")
    train_step = torch.compile(model) if cfg["compile"] else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    share = meta.get("task_share", 0.0)
    train_rows = Rows(train_data, meta.get("train_corpus_tokens", len(train_data) - 1), meta["eot_id"], share,
                      gconf.block_size)
    val_rows = Rows(val_data, meta.get("val_corpus_tokens", len(val_data) - 1), meta["eot_id"], share, gconf.block_size)
    val_gen = torch.Generator().manual_seed(cfg["seed"] + 1)            # the same val batches every time
    val_batches = [val_rows.batch(cfg["batch_size"], val_gen) for _ in range(cfg["eval_iters"])]

    @torch.no_grad()
    def val_loss():
        model.eval()
        with autocast:
            losses = [train_step(x.to(device), y.to(device))[1].item() for x, y in val_batches]
        model.train()
        return float(np.mean(losses))

    clock = dict(at=start, steps=0, seconds=0.0)                         # this run's training steps and their time

    def ms_per_iter():
        """Mean ms per training step (evaluation left out) of this run; of the resumed run when this one
        trained none; None when neither measured it (a checkpoint older than the measure)."""
        if clock["steps"]:
            return 1000 * clock["seconds"] / clock["steps"]
        return resumed.get("ms_per_iter") if resumed is not None else None

    def save(it):
        raw = getattr(model, "_orig_mod", model)                          # never the compile wrapper
        ms = ms_per_iter()
        save_atomic(dict(model=raw.state_dict(), config=gconf.__dict__, optimizer=optimizer.state_dict(),
                         iter_num=it, history=history, train_config=cfg,
                         data=dict(dir=cfg["data_dir"], vocab_size=meta["vocab_size"],
                                   corpus_sha256=meta.get("corpus_sha256")),
                         **({} if ms is None else dict(ms_per_iter=ms))), ckpt_path)  # a user scales times by it

    def loss_at(it):
        gen = torch.Generator().manual_seed(cfg["seed"] * 100003 + it)  # the batch depends only on it
        x, y = train_rows.batch(cfg["batch_size"], gen)
        with autocast:
            return train_step(x.to(device), y.to(device))[1]

    tokens_per_iter = cfg["batch_size"] * gconf.block_size

    def log(it, loss, lr, dt):
        clock["steps"] += it - clock["at"]                               # dt: seconds per step since the last log
        clock["seconds"] += dt * (it - clock["at"])
        clock["at"] = it
        print(f"iter {it:5d}/{cfg['max_iters']} | loss {loss:.3f} | lr {lr:.1e} | {dt * 1000:.0f} ms/iter | "
              f"{tokens_per_iter / dt:,.0f} tok/s | ETA {fmt_time(dt * (cfg['max_iters'] - it))}", flush=True)
        history.append(dict(iter=it, train=loss))

    def evaluate(it):
        vl = val_loss()
        history.append(dict(iter=it, val=vl))
        save(it)
        print(f"iter {it:5d} | val loss {vl:.3f} | saved {ckpt_path}", flush=True)

    t0 = time.time()
    it = fit(loss_at, list(model.parameters()), optimizer, cfg, start, ckpt_path, save, log, evaluate,
             resume_hint=f"Resume with: {resume_command(cfg)}")
    if it == start and start > 0:
        print(f"{ckpt_path} already trained for {start} iterations (--max_iters={cfg['max_iters']})")
    print(f"training took {fmt_time(time.time() - t0)} | pretraining speed {fmt_ms_per_iter(ms_per_iter())} "
          f"(compare it with another machine's to scale times)")
    if history:
        plot = os.path.join(cfg["out_dir"], "backbone_loss.png")
        save_loss_plot(history, plot, f"backbone pretraining ({n_params / 1e6:.2f}M params)")
        print(f"loss curve: {plot}")
    report(model, load_tokenizer(cfg["data_dir"]), cfg, device)
    return ckpt_path


def report(model, enc, cfg, device):
    """A few lines of sampled text, then exact match on unseen task episodes with/without history."""
    from data import tasks
    model.eval()
    start = torch.tensor([enc.encode_ordinary("\n")], device=device)
    torch.manual_seed(cfg["seed"])
    sample = model.generate(start, 80, temperature=0.8, top_k=50)[0].tolist()
    print("--- sample ---\n" + enc.decode(sample[1:]).strip() + "\n--------------")
    episodes = tasks.make_episodes(cfg["eval_episodes"], seed=987654, task="msqa", preset="small", split="iid")
    for with_history in (True, False):
        res = context_exact_match(model, enc, episodes, with_history, device)
        fams = " ".join(f"{f} {v:.2f}" for f, v in res.items() if f != "macro")
        print(f"exact match on {len(episodes)} unseen small episodes, history "
              f"{'in context  ' if with_history else 'not in context'}: macro {res['macro']:.2f} ({fams})")
    bind = binding_exact_match(model, enc, device=device)
    print(f"binding: recall from context with N = {' '.join(map(str, bind))} stored pairs: "
          f"{' '.join(f'{a:.2f}' for a in bind.values())} (1/N, a stored value at random: "
          f"{' '.join(f'{1 / n:.2f}' for n in bind)})")
    shared = shared_exact_match(model, enc, device=device)
    print(f"by name: full context with N = {' '.join(map(str, shared))} people who share one attribute: "
          f"{' '.join(f'{em:.2f}' for em, _ in shared.values())} (1/N: {' '.join(f'{1 / n:.2f}' for n in shared)}); "
          f"'unknown' for a person never mentioned {' '.join(f'{a:.2f}' for _, a in shared.values())}")
    probe = subject_probe(model, enc, device=device)
    fmt = lambda accs: " ".join(f"{a:.2f}" for a in accs)
    if probe is not None:
        print(f"where is a fact's subject (linear probe, layers 0..{len(probe['answer']) - 1}, chance "
              f"{probe['chance']:.3f}): "
              f"at the answer position {fmt(probe['answer'])} | at the fact's value token {fmt(probe['value'])}")


def main(argv=None):
    run_cli(lambda: train(parse_config(sys.argv[1:] if argv is None else argv, DEFAULTS, PRESETS)))


if __name__ == "__main__":
    main()

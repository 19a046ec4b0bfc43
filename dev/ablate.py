"""
Ablations and pictures: change d_k or the rank, see what happens.

    python dev/ablate.py                                   # d_k x r grid (25 cells) -> out-ablate/ablate.csv + heatmap
    python dev/ablate.py --key_dim=2,4,8 --rank=8 --write=token,segment --update=delta,hebbian --max_iters=60
    python dev/ablate.py --capacity [--quick]              # state size: recall EM vs stored pairs N, one line per d_k,
                                                           # gated vs hebbian -> capacity.json + capacity.png
    python dev/ablate.py --rank_sweep [--quick]            # rank: EM on iid and on unseen value words, r = 2..32
                                                           # -> rank.json + rank.png
    python dev/ablate.py --state_capacity                  # the state alone, keys given, nothing trained (seconds)
    python dev/ablate.py --overwrites [--quick]            # slots restated in later sessions: 4 rules x 3 seeds
    python dev/ablate.py --work [--memory=CKPT]            # the state S and β token by token on one recall episode
    python dev/ablate.py --results=out/results.json        # per-family bars of a train_memory.py evaluation
    python dev/ablate.py --plots                           # redraw the pictures from the CSVs, train nothing

Comma lists on the swept flags (key_dim, rank, write, sides, update, key_conv, n_pairs) give their cartesian
product; every cell trains one memory in <out_dir>/cells/<cell>/ (train_memory.train_one, so an
interrupted cell resumes), is scored at 0 history tokens in context on held-out episodes, and appends
one row to the CSV. Cells already in the CSV are skipped, so re-running the same command resumes.
write=msw is token writes with --msw_heads states (MSW). Any train_memory.py flag works here too.
--capacity trains one memory per (d_k, rule) on recall episodes whose N is spread over [2, max N] and scores
it at each N of --n_pairs (one row per N); --rank_sweep trains one per r at --n_pairs=8 and scores it at
N = 8 and N = 1 on the iid and values splits. Both use the recipe that binds recall pairs by name
(SWEEP_RECIPE); --quick runs the two ends of the swept axis in fewer steps (a class period).
--state_capacity needs no backbone: it writes random unit keys and values straight into the scan
(delta_rule_scan) and rewrites state_capacity.csv + state_capacity.png in seconds.
"""
import csv
import hashlib
import io
import itertools
import json
import os
import platform
import sys
import time

import numpy as np
import torch

# run as `python dev/ablate.py`, sys.path[0] is dev/; put the repo root first so the project imports
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import train_memory as TM  # noqa: E402
from nanodeltamem import DeltaMemGPT, MemoryConfig, autodetect_device, delta_rule_scan  # noqa: E402
from train_backbone import fmt_time, load_checkpoint, load_memory, presets, run_cli, writable_dir  # noqa: E402
from data import tasks  # noqa: E402
from data.config import UserError, check_positive, parse_config  # noqa: E402
from data.tasks import exact_match  # noqa: E402

DEFAULTS = dict(
    TM.DEFAULTS,
    key_dim=8, name_dim=0,        # the sweeps vary d_k itself, so their keys are what alone (no whom part),
    whom_from="h", whom_score="h",  # (a whom part's source and score, were one asked for: those of that time)
    shared_share=0.0,             # and their episodes are the plain ones, as when their numbers were measured
    rank=8, bind_tokens=1,        # (with the rank and binding term of that time,
    bind_null=0.0,                # no "nobody" slot (a whom part's; none here),
    general_len=128,              # general-text rows of 128 tokens,
    batch_size=16,                # and batches of 16 episodes)
    out_dir="out-ablate",
    backbone="out/backbone.pt",   # the main job's (pretrained there first when missing), not one per sweep
    max_iters=120,                # per cell, as train_memory.py: ~2 min a cell, the 25-cell CPU grid 50 min (measured)
    val_episodes=32,              # the training log's answer accuracy (cheaper than train_memory's 64)
    eval_episodes=16,             # held-out episodes per split, per cell
    splits="iid",                 # which held-out splits to score (train_memory.EVAL_SPLITS)
    msw_heads=4,                  # states per layer for write=msw
    capacity=False,               # the state-size sweep: d_k x rule, scored at N stored pairs (task=recall)
    rank_sweep=False,             # the rank sweep: r at fixed d_k, scored on iid and values (task=recall)
    overwrites=False,             # the overwrite experiment (task=overwrites, axes update x seed)
    quick=False,                  # --overwrites for class: one seed, 60 steps, 8 episodes (about a minute)
    work=False,                   # draw the memory at work (one episode, token by token)
    layer=-1,                     # which memory layer --work shows (-1: the last)
    plots=False,                  # only redraw the pictures from existing CSVs
    results="",                   # a train_memory.py results.json: draw its per-family bars
    state_capacity=False,         # the state alone, keys given, nothing trained (seconds; no backbone)
    state_passes=10,              # ... how often the history writes each pair
    state_beta=1.0,               # ... the fixed write strength β
    state_episodes=1000,          # ... random episodes per point
)
PRESETS = presets("ablate")                       # PRESET_TABLE: the memory's, then its own out_dir and backbone
# training settings added after sweeps existed: hashed only when set to something else than this value
# (which changes nothing), so the finished cells of an older sweep keep their names and are skipped
ADDED_LATER = {"read_window_share": 1.0, "decay_bias": 6.0, "state_margin": 0.0, "bind_reg": 0.0,
               "dense_questions": False, "context_reg": 0.0, "shared_share": 0.0,
               "aux_share": 1.0, "max_questions": 0, "query_conv": 1,
               "bind_rivals": "all", "max_pairs": 0, "name_dim": 0, "name_pool": 16, "name_lr_scale": 0.1,
               "bind_tokens": 1, "absent_questions": 0, "novel_values": 0.0, "bind_null": 0.0, "whom_from": "h",
               "whom_score": "h"}
AXES = ("key_dim", "rank", "write", "sides", "update", "key_conv", "n_pairs", "seed")
GRID = dict(key_dim=[2, 4, 8, 16, 32], rank=[1, 2, 4, 8, 16])            # the default cells
# the state-size sweep: one memory per (d_k, rule), trained on recall episodes whose N is spread log-uniformly
# over [2, max N] (train_memory --max_pairs), then scored at each N of the n_pairs list
CAPACITY = dict(key_dim=[4, 8, 16, 32], update=["gated", "hebbian"])
CAPACITY_N = [2, 4, 8, 16, 32]
# the recipe that binds recall pairs by name (README "Ablations of state size and rank"): a read query that
# sees the question's name (query_conv 8); at most 8 questions per episode and no context or general term,
# so that 32-pair histories train in minutes; --quick: the two ends of the d_k axis, 200 steps
SWEEP_RECIPE = dict(query_conv=8, max_questions=8, context_reg=0.0, general_reg=0.0)
CAPACITY_DEFAULTS = {False: dict(SWEEP_RECIPE, max_iters=500, eval_episodes=24),
                     True: dict(SWEEP_RECIPE, max_iters=200, eval_episodes=12)}
CAPACITY_QUICK = dict(key_dim=[4, 32])
# the rank sweep: one memory per r at fixed d_k, trained on 8 pairs, scored on iid and on `values` (value words
# never written in training), at N = 8 and at N = 1 (one pair, nothing to confuse it with: the value path alone)
RANK = dict(rank=[2, 4, 8, 16, 32])
RANK_DEFAULTS = {False: dict(SWEEP_RECIPE, max_iters=600, eval_episodes=24, key_dim=16, n_pairs=8),
                 True: dict(SWEEP_RECIPE, max_iters=300, eval_episodes=12, key_dim=16, n_pairs=8)}
RANK_QUICK = dict(rank=[2, 32])
RANK_SPLITS = ["iid", "values"]
# the rules the overwrite experiment compares: the default, the paper's, no decay, no erase
OVERWRITES = dict(update=["gated", "delta", "deltanet", "hebbian"], seed=[1337, 1, 2])
# msqa, the main job's recipe and steps (with the sweeps' plain keys), scored on the update questions whose
# older values all sit in earlier sessions (overwritten_later); --task=overwrites: the recall variant, which
# this backbone cannot read even with the history in context (README, "Where the delta rule wins")
OVERWRITE_DEFAULTS = {False: dict(task="msqa", max_iters=400, eval_episodes=64),
                      True: dict(task="msqa", max_iters=60, eval_episodes=16)}  # --quick: one seed
WRITES = {"token": "token", "tsw": "token", "segment": "segment", "ssw": "segment", "msw": "msw"}
FAMILIES = ["single_hop", "multi_hop", "update", "temporal", "abstention", "recall", "forgetting", "two_hop"]
COLUMNS = (["cell", "key_dim", "rank", "write", "heads", "sides", "update", "key_conv", "n_pairs", "task",
            "episode_preset", "max_iters", "batch_size", "learning_rate", "seed", "backbone", "eval_episodes", "splits",
            "macro_em", "acc"] + [f"em_{f}" for f in FAMILIES] +
           ["n_questions", "train_seconds", "eval_seconds", "machine", "fact_em", "stale_rate", "updated_em",
            "updated_stale", "n_updated"])
NOT_TRAINING = {"out_dir", "device", "log_interval", "eval_interval", "val_episodes", "eval_episodes", "splits",
                "eval_read_window", "baselines", "eval_only", "memory", "episodes", "capacity", "work", "layer", "plots", "results",
                "state_capacity", "state_passes", "state_beta", "state_episodes", "diagnose", "overwrites", "quick",
                "eval_pairs", "eval_splits", "rank_sweep"}


# ----------------------------------------------------------------------------------------------
# the command line: comma lists on the swept flags -> cells
# ----------------------------------------------------------------------------------------------

def parse_args(argv):
    """(cfg, axes): cfg from the usual --key=value parser, axes {flag: [values]} from comma lists."""
    rest, given = [], {}
    for arg in argv:
        key, eq, val = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if key in AXES and eq:
            given[key] = [v.strip() for v in val.split(",") if v.strip()]
            if not given[key]:
                raise UserError(f"--{key} is empty: give one value or a comma list, e.g. --{key}=2,4,8")
        else:
            rest.append(arg)
    cfg = parse_config(rest, DEFAULTS, PRESETS)
    if cfg["overwrites"]:                                                # the experiment's own defaults, then
        cfg = parse_config(rest, dict(DEFAULTS, **OVERWRITE_DEFAULTS[cfg["quick"]]), PRESETS)  # the flags given
    elif cfg["capacity"]:
        cfg = parse_config(rest, dict(DEFAULTS, **CAPACITY_DEFAULTS[cfg["quick"]]), PRESETS)
    elif cfg["rank_sweep"]:
        cfg = parse_config(rest, dict(DEFAULTS, **RANK_DEFAULTS[cfg["quick"]]), PRESETS)
    if cfg["capacity"] + cfg["rank_sweep"] + cfg["overwrites"] + cfg["state_capacity"] > 1:
        raise UserError("--capacity, --rank_sweep, --overwrites and --state_capacity are separate sweeps: give one")
    axes = {k: [str(cfg[k])] for k in AXES}
    if not cfg["work"]:                                                  # --work draws one memory
        default = (STATE_CAPACITY if cfg["state_capacity"] else CAPACITY if cfg["capacity"] else
                   RANK if cfg["rank_sweep"] else OVERWRITES if cfg["overwrites"] else GRID)
        axes.update({k: [str(v) for v in vs] for k, vs in default.items()})
        quick = CAPACITY_QUICK if cfg["capacity"] else RANK_QUICK if cfg["rank_sweep"] else {}
        if cfg["quick"]:
            axes.update({k: [str(v) for v in vs] for k, vs in quick.items()})
    axes.update(given)
    for w in axes["write"]:
        if w not in WRITES:
            raise UserError(f"--write: {w!r} is not valid; choose from token (tsw), segment (ssw), msw")
    bad = [s for s in cfg["splits"].split(",") if s not in TM.EVAL_SPLITS]
    if bad:
        raise UserError(f"--splits: unknown split {bad[0]!r}; choose from {', '.join(TM.EVAL_SPLITS)}")
    if cfg["capacity"]:                                                  # N is a property of recall episodes:
        ns = [flag_value("n_pairs", n) for n in given.get("n_pairs", CAPACITY_N)]  # scored at each N, trained
        if min(ns) < 2:                                                  # on N spread over [2, max N]
            raise UserError(f"--capacity scores N >= 2 stored pairs: --n_pairs={','.join(map(str, ns))}")
        cfg.update(task="recall", max_pairs=max(ns), eval_pairs=sorted(set(ns)))
        axes["n_pairs"] = ["0"]
    if cfg["rank_sweep"]:                                                # trained on n_pairs, scored at N = 1 too
        if len(axes["n_pairs"]) != 1 or len(axes["key_dim"]) != 1:
            raise UserError("--rank_sweep trains at one --n_pairs and one --key_dim (e.g. --n_pairs=8 --key_dim=16)")
        n = flag_value("n_pairs", axes["n_pairs"][0])
        if n < 2:
            raise UserError(f"--rank_sweep trains on N >= 2 stored pairs, got --n_pairs={n}")
        cfg.update(task="recall", eval_pairs=sorted({1, n}), eval_splits=RANK_SPLITS)
    if cfg["overwrites"] and cfg["quick"] and "seed" not in given:
        axes["seed"] = axes["seed"][:1]                                  # --quick: one seed
    return cfg, axes


def flag_value(key, value):
    """One comma-list value, type-checked as if typed as --key=value."""
    return parse_config([f"--{key}={value}"], DEFAULTS, PRESETS)[key]


def make_cells(cfg, axes):
    """One config per point of the cartesian product; each value checked as if typed as a flag."""
    cells = []
    for values in itertools.product(*(axes[k] for k in AXES)):
        over = dict(zip(AXES, values))
        cell = dict(cfg)
        for k, v in over.items():                                        # type-check each value as a flag
            cell[k] = flag_value(k, v)
        cell["write_axis"] = WRITES[cell["write"]]
        cell["write"] = "token" if cell["write_axis"] == "msw" else cell["write_axis"]
        if cell["write_axis"] == "msw":
            cell["heads"] = cfg["msw_heads"]
        check_positive(cell, ("key_dim", "rank", "heads", "key_conv"))
        TM.memory_config(cell)                                           # invalid sides/update: one-line error
        cell["cell"] = cell_name(cell)
        cells.append(cell)
    return cells


def cell_name(cell):
    """Readable axes + a hash of every other training setting, so a changed setting is a new cell."""
    name = f"dk{cell['key_dim']}_r{cell['rank']}_{cell['write_axis']}_{cell['sides']}_{cell['update']}"
    if cell["key_conv"] > 1:
        name += f"_kc{cell['key_conv']}"
    if cell["n_pairs"]:
        name += f"_n{cell['n_pairs']}"
    if cell["seed"] != DEFAULTS["seed"]:
        name += f"_s{cell['seed']}"
    inert = {}                        # a setting that changes nothing in this cell is hashed at its old default,
    if cell["general_reg"] == 0:      # so that a new default does not rename finished cells it cannot touch
        inert["general_len"] = 64
    if cell["task"] == "recall":
        inert["absent_questions"] = 0
    train = {k: v for k, v in sorted({**cell, **inert}.items()) if k not in NOT_TRAINING
             and not (k in ADDED_LATER and v == ADDED_LATER[k])}
    return name + "_" + hashlib.sha1(json.dumps(train, default=str).encode()).hexdigest()[:6]


def machine():
    """Where the seconds in a row were measured."""
    if torch.cuda.is_available():
        return f"cuda {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"cpu {platform.machine()} x{os.cpu_count()} cores ({torch.get_num_threads()} threads), torch {torch.__version__}"


# ----------------------------------------------------------------------------------------------
# one CSV, one row per finished cell
# ----------------------------------------------------------------------------------------------

def read_rows(path):
    """The finished rows of a CSV (a row cut short by a crash is ignored)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [r for r in rows if None not in r.values() and r.get("machine")]


def append_row(path, row):
    """One write of one whole line (header first on a new file): a crash never leaves half a row mid-file."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        writer.writeheader()
    else:
        with open(path, newline="") as f:
            head = f.readline().strip()
        if head != ",".join(COLUMNS):
            raise UserError(f"{path} has other columns than this version writes: move it away or pass another --out_dir")
    writer.writerow({k: row.get(k, "") for k in COLUMNS})
    with open(path, "a") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())


def done_key(row):
    return (str(row["cell"]), str(row["eval_episodes"]), str(row["splits"]), str(row["n_pairs"]))


# ----------------------------------------------------------------------------------------------
# train and score one cell; the sweep
# ----------------------------------------------------------------------------------------------

def eval_cell(cfg, enc, gpt, model, device):
    """Exact match at 0 history tokens in context (the memory only), on the held-out splits asked for.
    Episodes are drawn as train_memory.evaluate draws them (seed 10000 + split index)."""
    task = "msqa" if cfg["task"] in ("msqa", "mix") else cfg["task"]
    episodes = []
    for split in cfg["splits"].split(","):
        rng = np.random.default_rng(10_000 + TM.EVAL_SPLITS.index(split))
        episodes += TM.sample_episodes(rng, dict(cfg, task=task), cfg["eval_episodes"], split)
    preds, _ = TM.run_condition(enc, episodes, lambda ep, q: [], model, gpt, device)
    res = TM.score_condition(preds, episodes)
    gold = [q.a for ep in episodes for q in ep.questions]
    acc = float(np.mean([exact_match(p, g) for p, g in zip(preds, gold)]))
    return dict(fact_em=res["fact_em"], macro_em=res["macro_em"], acc=acc, n_questions=res["n_questions"],
                stale_rate=res["stale_rate"], updated_em=res["updated_em"], updated_stale=res["updated_stale"],
                n_updated=res["n_updated"], **{f"em_{f}": v for f, v in res["per_family"].items()})


def sweep(cells, enc, gpt, device, csv_path):
    """Train + score every cell not yet in csv_path; returns all rows of the CSV. A capacity cell
    (cfg eval_pairs) trains once and is scored at each N, one row per N."""
    points = [dict(c, n_pairs=n, max_pairs=0, splits=split) for c in cells for n in c.get("eval_pairs") or [c["n_pairs"]]
              for split in c.get("eval_splits") or [c["splits"]]]
    for p in points:                                                     # small N: more episodes, so that every
        if p.get("eval_pairs") and 0 < p["n_pairs"] < 8:                 # point asks about as many questions
            p["eval_episodes"] = p["eval_episodes"] * 8 // p["n_pairs"]
    done = {done_key(r) for r in read_rows(csv_path)}
    todo = [p for p in points if done_key(p) not in done]
    print(f"{len(points)} rows: {len(points) - len(todo)} already in {csv_path}, {len(todo)} to run")
    spent, models = [], {}
    for n, point in enumerate(todo):
        cfg = next(c for c in cells if c["cell"] == point["cell"])      # the training settings (max_pairs)
        cell_dir = os.path.join(cfg["out_dir"], "cells", cfg["cell"])
        os.makedirs(cell_dir, exist_ok=True)
        t0 = time.time()
        if cfg["cell"] not in models:                                    # trained (or reused) once per cell
            models = {cfg["cell"]: TM.train_one(TM.memory_kind(cfg), TM.condition_name(cfg), gpt, enc,
                                                dict(cfg, out_dir=cell_dir), device)}
        model = models[cfg["cell"]]
        t1 = time.time()
        scores = eval_cell(point, enc, gpt, model, device)
        t2 = time.time()
        row = dict(point, write=cfg["write_axis"], **scores, train_seconds=round(t1 - t0, 2),
                   eval_seconds=round(t2 - t1, 2), machine=machine())
        append_row(csv_path, row)
        spent.append(t2 - t0)
        at = (f" N={point['n_pairs']}" if cfg.get("eval_pairs") else "") + \
            (f" {point['splits']}" if cfg.get("eval_splits") else "")
        print(f"[row {n + 1}/{len(todo)}] {cfg['cell']}{at}: macro EM {scores['macro_em']:.3f} | acc "
              f"{scores['acc']:.3f} | train {fmt_time(t1 - t0)}, eval {fmt_time(t2 - t1)} | "
              f"ETA {fmt_time(np.mean(spent) * (len(todo) - n - 1))}", flush=True)
    return read_rows(csv_path)


# ----------------------------------------------------------------------------------------------
# pictures: each takes a path (or rows) and the PNG to write
# ----------------------------------------------------------------------------------------------

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _rows(rows_or_path):
    return read_rows(rows_or_path) if isinstance(rows_or_path, (str, os.PathLike)) else list(rows_or_path)


def _save(fig, path, tight=True):
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    print(f"plot: {path}")


def plot_heatmap(rows, path, metric="macro_em"):
    """Exact match over d_k x r; one panel per setting of the other axes (the latest row wins)."""
    plt = _plt()
    rows = [r for r in _rows(rows) if r.get(metric, "") != ""]
    if not rows:
        raise UserError(f"no rows with {metric} to draw a heatmap from")
    group = lambda r: f"{r['write']} {r['sides']} {r['update']}" + (f" N={r['n_pairs']}" if str(r["n_pairs"]) != "0" else "")
    groups = sorted({group(r) for r in rows})
    dks = sorted({int(r["key_dim"]) for r in rows})
    rks = sorted({int(r["rank"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(max(5.5, (0.8 * len(dks) + 2) * len(groups)), 0.6 * len(rks) + 2.2),
                             squeeze=False)
    for ax, g in zip(axes[0], groups):
        grid = np.full((len(rks), len(dks)), np.nan)                     # (r, d_k)
        for r in rows:
            if group(r) == g:
                grid[rks.index(int(r["rank"])), dks.index(int(r["key_dim"]))] = float(r[metric])
        im = ax.imshow(grid, origin="lower", cmap="viridis", vmin=0, vmax=max(1e-6, np.nanmax(grid)))
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if v < 0.6 * np.nanmax(grid) else "black")
        ax.set_xticks(range(len(dks)), dks)
        ax.set_yticks(range(len(rks)), rks)
        ax.set_xlabel("key dim d_k")
        ax.set_ylabel("rank r")
        ax.set_title(g, fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(f"{metric}, held-out, 0 history tokens in context", fontsize=10)
    _save(fig, path)


def knee(ns, accs, frac=0.5, ref=None):
    """The capacity knee: the largest N whose accuracy is still >= frac x ref (default: the best), before
    the first fall below it (None if ref is zero). The capacity sweep passes ref = the smallest N's."""
    best = (max(accs) if len(accs) else 0) if ref is None else ref
    if best <= 0:
        return None
    last = None
    for n, a in sorted(zip(ns, accs)):
        if a >= frac * best:
            last = n
        elif last is not None:                                           # the first fall after the good part
            break
    return last


def capacity_knee(ns, accs):
    """The sweep's knee: the largest N at >= half the EM at the smallest N; None when that EM is not above
    1/N (a stored value at random): a memory that does not bind even there has no capacity to measure."""
    ns, accs = zip(*sorted(zip(ns, accs)))
    return knee(ns, accs, ref=accs[0]) if accs[0] > 1 / ns[0] else None


def capacity_summary(rows, path, metric="em_recall"):
    """capacity.json from the capacity sweep's rows: {update: {d_k: {N: em}}} (em: the recall family's EM,
    keys as strings), plus "knee": {update: {d_k: N or null}} (capacity_knee)."""
    out = {}
    for r in _rows(rows):
        if str(r.get("n_pairs", "0")) in ("0", "") or r.get(metric, "") == "":
            continue
        out.setdefault(r["update"], {}).setdefault(str(int(r["key_dim"])), {})[str(int(r["n_pairs"]))] = \
            round(float(r[metric]), 4)
    if not out:
        raise UserError("no capacity rows (n_pairs > 0): run python dev/ablate.py --capacity first")
    knees = {}
    for update, lines in out.items():
        for dk, pts in lines.items():
            ns = sorted(int(n) for n in pts)
            pts = dict(sorted(pts.items(), key=lambda kv: int(kv[0])))
            lines[dk] = pts
            knees.setdefault(update, {})[dk] = capacity_knee(ns, [pts[str(n)] for n in ns])
    out["knee"] = knees
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(path + ".tmp", path)
    return out


def rank_summary(rows, path, metric="fact_em"):
    """rank.json from the rank sweep's rows: {r: {"iid": em, "values": em}} at the trained N, plus
    "iid_n1", "values_n1" at N = 1 (one pair: the value path alone). em: fact EM, keys as strings."""
    out = {}
    for r in _rows(rows):
        if r.get(metric, "") == "" or r["splits"] not in RANK_SPLITS:
            continue
        key = r["splits"] + ("_n1" if int(r["n_pairs"]) == 1 else "")
        out.setdefault(str(int(r["rank"])), {})[key] = round(float(r[metric]), 4)
    if not out:
        raise UserError("no rank rows: run python dev/ablate.py --rank_sweep first")
    out = dict(sorted(out.items(), key=lambda kv: int(kv[0])))
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(path + ".tmp", path)
    return out


def plot_rank(summary, path):
    """Fact EM against the rank r: iid and values (words never written in training), at the trained N
    (solid) and at N = 1 (dashed: one pair, only the value path can fail). Returns the curves' labels."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    rs = [int(r) for r in summary]
    for key, style, color, label in (("iid", "-", "C0", "iid"), ("values", "-", "C3", "values (unseen words)"),
                                     ("iid_n1", "--", "C0", "iid, N = 1"), ("values_n1", "--", "C3", "values, N = 1")):
        pts = [(r, summary[str(r)][key]) for r in rs if key in summary[str(r)]]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=".", color=color, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(rs, [str(r) for r in rs])
    ax.set_xlabel("rank r (the value's width)")
    ax.set_ylabel("fact exact match")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("rank: held-out recall, 0 history tokens in context", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)
    return [line.get_label() for line in ax.get_lines()]


def keys_given(dks, ns, updates, rank, passes, beta, episodes=500, seed=0):
    """{update: {d_k: {N: clean}}}: the state alone with random unit keys given (random_recall), the
    reference curve drawn beside a trained sweep."""
    g, out = torch.Generator().manual_seed(seed), {}
    for update, dk, n in itertools.product(updates, dks, ns):
        out.setdefault(update, {}).setdefault(dk, {})[n] = random_recall(g, episodes, n, dk, rank, update,
                                                                         passes, beta)[0]
    return out


def plot_capacity(rows, path, metric="em_recall", given=None):
    """Recall accuracy against stored pairs N: one colour per d_k (and write mode, key_conv, when several
    were swept), solid gated, dash-dot-dotted delta, dash-dotted deltanet, dashed hebbian; o = knee. Dotted: 1/N, what a memory
    that returns *a* stored value, not the asked one's, scores. Returns the curves' labels."""
    plt = _plt()
    rows = [r for r in _rows(rows) if str(r.get("n_pairs", "0")) not in ("0", "")]
    if not rows:
        raise UserError("no capacity rows (n_pairs > 0): run python dev/ablate.py --capacity first")
    rows = [dict(r, write=r.get("write") or "token") for r in rows]     # rows written before the write axis
    fig, axes = plt.subplots(1, 2 if given else 1, figsize=(11.5 if given else 6.5, 4.2), squeeze=False)
    ax = axes[0][0]
    writes = sorted({r["write"] for r in rows})
    kc = lambda r: int(r.get("key_conv") or 1)                         # rows written before the key_conv axis
    groups = sorted({(int(r["key_dim"]), r["write"], kc(r)) for r in rows})
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(groups)))
    for (dk, write, conv), color in zip(groups, colors):
        for update, style in (("gated", "-"), ("delta", (0, (5, 1, 1, 1))), ("deltanet", "-."), ("hebbian", "--")):
            pts = {int(r["n_pairs"]): float(r[metric] if r.get(metric, "") != "" else r["acc"]) for r in rows
                   if (int(r["key_dim"]), r["write"], kc(r), r["update"]) == (dk, write, conv, update)}
            if not pts:
                continue
            ns = sorted(pts)
            label = (f"d_k={dk} {write + ' ' if len(writes) > 1 else ''}{update}"
                     f"{f' key_conv={conv}' if len({g[2] for g in groups}) > 1 else ''}")
            ax.plot(ns, [pts[n] for n in ns], linestyle=style, marker=".", color=color, label=label)
            k = capacity_knee(ns, [pts[n] for n in ns])
            if k is not None:
                ax.plot([k], [pts[k]], "o", ms=11, mfc="none", mec=color, mew=1.5)
    allN = sorted({int(r["n_pairs"]) for r in rows})
    ax.plot(allN, [1 / n for n in allN], ":", color="gray", label="1/N (a stored value at random)")
    ax.set_ylabel("recall exact match")
    ax.set_title("trained memories, 0 history tokens in context (o = knee: last N at >= half the first N's EM)",
                 fontsize=8)
    labels = [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
    if given:                                                            # the same d_k, keys given
        right = axes[0][1]
        dks = sorted({dk for lines in given.values() for dk in lines})
        shade = dict(zip(dks, plt.cm.viridis(np.linspace(0, 0.9, len(dks)))))
        for update, lines in given.items():
            for dk, pts in sorted(lines.items()):
                ns = sorted(pts)
                right.plot(ns, [pts[n] for n in ns], "--" if update == "hebbian" else "-.", marker=".",
                           color=shade[dk], label=f"d_k={dk} {update}")
        right.set_title("the state alone, random unit keys given (clean recall)", fontsize=8)
        right.legend(fontsize=7, ncol=2)
    for a in axes[0]:
        a.set_xscale("log", base=2)
        a.set_xticks(allN, [str(n) for n in allN])                       # plain N, not 2^k
        a.set_xlabel("stored pairs N")
        a.set_ylim(-0.02, 1.02)
        a.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)
    return labels                                                        # the curves drawn, for tests


# ----------------------------------------------------------------------------------------------
# the state's own capacity: keys and values given, nothing trained (seconds, no backbone)
# ----------------------------------------------------------------------------------------------
# A trained memory must first learn keys that tell the facts apart; this asks what the r x d_k state
# can hold once it has them. N random unit keys k_i (what L2norm(tanh(A_k h)) gives unrelated tokens)
# and N random unit values v_i are written `passes` times in a row (a history that mentions each fact
# more than once) with a fixed β, then read back with the same keys: read_i = S k_i. Two scores:
#   clean    cos(read_i, v_i) >= 0.9: the value comes back nearly intact;
#   nearest  the stored value closest to read_i (cosine) is v_i: enough to pick among the N.
# Repeated passes of the delta rule converge to the least-squares S (exact for N <= d_k independent
# keys); hebbian adds every pass again, so its crosstalk Σ_j (k_j·k_i) v_j never goes away.

STATE_CAPACITY = dict(key_dim=[4, 8, 16], n_pairs=[1, 2, 4, 8, 12, 16, 24, 32, 48], update=["deltanet", "hebbian"])
STATE_COLUMNS = ["key_dim", "rank", "n_pairs", "update", "passes", "beta", "episodes", "clean", "nearest",
                 "seconds", "machine"]
CLEAN_COS = 0.9


def state_recall(k, v, update, passes=1, beta=1.0):
    """(clean, nearest) for keys k (E, N, d_k) and values v (E, N, r) written `passes` times."""
    E, N, _ = k.shape
    rule = MemoryConfig(update=update).rule()                            # the model's own switches
    ks, vs = k.repeat(1, passes, 1)[:, None], v.repeat(1, passes, 1)[:, None]  # (E, 1, P N, ·) one head
    b = torch.full(ks.shape[:-1] + (1,), float(beta))                   # (E, 1, P N, 1) one scalar gate
    _, S = delta_rule_scan(ks, ks, vs, b, **rule)                        # S (E, 1, r, d_k)
    read = (S[:, 0] @ k.transpose(1, 2)).transpose(1, 2)                 # (E, N, r) read_i = S k_i
    cos = torch.nn.functional.cosine_similarity(read[:, :, None], v[:, None], dim=-1)  # (E, N, N) read_i vs v_j
    clean = (cos.diagonal(dim1=1, dim2=2) >= CLEAN_COS).float().mean().item()
    nearest = (cos.argmax(-1) == torch.arange(N)).float().mean().item()
    return clean, nearest


@torch.no_grad()
def random_recall(g, episodes, n, dk, r, update, passes, beta):
    """state_recall on `episodes` draws of N random unit keys (d_k) and values (r) from generator g."""
    k = torch.nn.functional.normalize(torch.randn(episodes, n, dk, generator=g), dim=-1)  # (E, N, d_k)
    v = torch.nn.functional.normalize(torch.randn(episodes, n, r, generator=g), dim=-1)   # (E, N, r)
    return state_recall(k, v, update, passes, beta)


def state_capacity(cfg, axes, csv_path):
    """Every (d_k, N, update) point of the state-capacity curve -> csv_path (rewritten: it takes seconds)."""
    E, P, beta = cfg["state_episodes"], cfg["state_passes"], cfg["state_beta"]
    if len(axes["rank"]) != 1:
        raise UserError("--state_capacity draws one value size: give one --rank (e.g. --rank=8)")
    if E < 1 or P < 1 or not 0 < beta <= 1:
        raise UserError(f"--state_episodes and --state_passes must be >= 1 and --state_beta in (0, 1], "
                        f"got {E}, {P}, {beta}")
    r = flag_value("rank", axes["rank"][0])
    points = list(itertools.product(*([flag_value(a, v) for v in axes[a]] for a in ("key_dim", "n_pairs", "update"))))
    for dk, n, update in points:
        if min(dk, n, r) < 1:
            raise UserError(f"--key_dim, --n_pairs and --rank must be positive for --state_capacity, got {dk}, {n}, {r}")
        try:
            MemoryConfig(update=update)                                  # the model's own check of --update
        except ValueError as e:
            raise UserError(f"--update: {e}")
    print(f"state capacity: {len(points)} points, {E} episodes each, {P} pass(es), beta {beta}, r = {r}; "
          f"keys given, nothing trained")
    rows, g = [], torch.Generator().manual_seed(cfg["seed"])
    for dk, n, update in points:
        t0 = time.time()
        clean, nearest = random_recall(g, E, n, dk, r, update, P, beta)
        rows.append(dict(key_dim=dk, rank=r, n_pairs=n, update=update, passes=P, beta=beta, episodes=E,
                         clean=f"{clean:.4f}", nearest=f"{nearest:.4f}", seconds=f"{time.time() - t0:.2f}",
                         machine=machine()))
        print(f"  d_k={dk:3d} N={n:3d} {update:8s}: clean {clean:.2f}  nearest {nearest:.2f}", flush=True)
    tmp = csv_path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, STATE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, csv_path)
    print(f"wrote {csv_path}")
    return rows


def plot_state_capacity(rows, path):
    """Two panels (clean, nearest) of recall against N: one colour per d_k, solid deltanet, dotted delta,
    dashed hebbian; o = knee (last N at >= half the best). Returns {(d_k, update): knee of the clean curve}."""
    plt = _plt()
    rows = _rows(rows)
    if not rows:
        raise UserError("no state-capacity rows: run python dev/ablate.py --state_capacity first")
    dks = sorted({int(r["key_dim"]) for r in rows})
    colors = dict(zip(dks, plt.cm.viridis(np.linspace(0, 0.9, len(dks)))))
    styles = {"delta": ":", "deltanet": "-", "hebbian": "--"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    knees = {}
    for ax, metric in zip(axes, ("clean", "nearest")):
        for dk in dks:
            for update in styles:
                pts = {int(r["n_pairs"]): float(r[metric]) for r in rows
                       if int(r["key_dim"]) == dk and r["update"] == update}
                if not pts:
                    continue
                ns = sorted(pts)
                ax.plot(ns, [pts[n] for n in ns], styles[update], marker=".", color=colors[dk], label=f"d_k={dk} {update}")
                kn = knee(ns, [pts[n] for n in ns])
                if kn is not None:
                    ax.plot([kn], [pts[kn]], "o", ms=11, mfc="none", mec=colors[dk], mew=1.5)
                    if metric == "clean":
                        knees[(dk, update)] = kn
        allN = sorted({int(r["n_pairs"]) for r in rows})
        ax.set_xscale("log", base=2)
        ax.set_xticks(allN, [str(n) for n in allN])
        ax.set_xlabel("stored pairs N")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of pairs recalled")
    axes[0].set_title(f"clean: cos(S k_i, v_i) >= {CLEAN_COS}  (o = knee)", fontsize=9)
    axes[1].set_title("nearest: S k_i is closest to v_i among the N values", fontsize=9)
    axes[1].legend(fontsize=7, ncol=2)
    r0 = rows[0]
    fig.suptitle(f"the state alone: random unit keys given, {r0['passes']} pass(es), beta = {r0['beta']}, "
                 f"r = {r0['rank']}, {r0['episodes']} episodes per point", fontsize=10)
    _save(fig, path)
    return knees


def plot_families(results_json, path):
    """Per-family bars for every evaluation condition of a train_memory.py results.json."""
    try:
        with open(results_json) as f:
            conds = json.load(f)["conditions"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--results={results_json}: not a readable train_memory.py results.json "
                        f"({type(e).__name__}); run python train_memory.py first") from None
    TM.plot_results(conds, path)


def plot_training(ckpt_paths, path):
    """Training loss and validation answer accuracy of each memory checkpoint's `history`."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for p in ckpt_paths:
        hist = load_checkpoint(str(p), required=("history",))["history"]
        label = os.path.basename(os.path.dirname(str(p))) or os.path.basename(str(p))
        if hist:
            a.plot([h["iter"] for h in hist], [h["train"] for h in hist], label=label)
            b.plot([h["iter"] for h in hist], [h["val_acc"] for h in hist], marker=".", label=label)
    for ax, y in ((a, "training loss"), (b, "validation answer accuracy")):
        ax.set_xlabel("iteration")
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    b.legend(fontsize=6, ncol=1 + len(ckpt_paths) // 12, loc="best")
    _save(fig, path)


@torch.no_grad()
def memory_trace(model, enc, ep, layer=-1):
    """Write one episode's history and replay one layer's memory token by token.

    Captures the layer's attention input h during the ordinary write pass (a forward pre-hook), then
    recomputes k, v, β with the layer's own projections and steps the recurrent scan one token at a
    time, keeping every S_t. Returns a dict of plain lists (JSON-able) for plot_work.
    """
    from data import tasks
    if model.mcfg.write_unit != "token":
        raise UserError("--work replays token writes (TSW/MSW); this memory writes once per segment (SSW)")
    names = list(model.memories)
    name = names[layer] if -len(names) <= layer < len(names) else None
    if name is None:
        raise UserError(f"--layer={layer}: the memory sits in layers {', '.join(names)}")
    mem, cfg = model.memories[name], model.mcfg
    b = tasks.collate_episodes(enc, [ep], model.gpt.config.block_size, enc.eot_token)
    seen = []
    hook = mem.register_forward_pre_hook(lambda m, args: seen.append(args[0]) if args[1] else None)
    try:
        model.reset_memory()
        model(b["hist"], write=True, mask=b["mask"], seg=b["seg"], logits=False)
    finally:
        hook.remove()
    real = b["mask"].flatten()                                           # (W·L,) real tokens only
    x = seen[0].reshape(1, real.numel(), -1)                             # (1, W·L, d) padded windows
    k, v, beta, keep = (t[:, :, real] for t in mem.write_terms(x, b["hist"].size(1)))  # (1, H, T, ·) real only
    x = x[:, real]                                                       # (1, T, d)
    beta, keep = (t.expand(-1, -1, -1, cfg.rank) for t in (beta, keep))  # (1, H, T, r) scalar gates too
    S = x.new_zeros(1, cfg.heads, cfg.rank, cfg.key_dim)
    states = []
    for t in range(x.size(1)):                                           # the decode path, one token a step
        _, S = delta_rule_scan(k[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], beta[:, :, t:t + 1], S,
                               decay=keep[:, :, t:t + 1], erase=cfg.rule()["erase"])  # keep: 1-β, λ or 1
        states.append(S[0])                                              # (H, r, d_k)
    lines = [line for s in ep.sessions for line in s]
    line_of = [i for i, line in enumerate(lines) for _ in enc.encode_ordinary(line + "\n")]
    facts = [i for i, line in enumerate(lines)
             if tasks.parse_facts(tasks.Episode(sessions=[[line]], questions=[], task=ep.task))]
    return dict(tokens=[enc.decode([t]) for t in b["hist"].flatten()[real].tolist()], line_of=line_of,
                fact_lines=facts, layer=int(name),
                beta=beta[0].transpose(1, 2).reshape(-1, x.size(1)).tolist(),  # (H·r, T)
                states=torch.stack(states).tolist(),                      # (T, H, r, d_k)
                final_state=mem.state[0].tolist(), config=dict(key_dim=cfg.key_dim, rank=cfg.rank,
                                                               heads=cfg.heads, update=cfg.update))


def plot_work(trace, path):
    """β per state row, the state S_t (all entries) and ||S_t|| per token; fact lines shaded."""
    plt = _plt()
    if isinstance(trace, (str, os.PathLike)):
        with open(trace) as f:
            trace = json.load(f)
    beta = np.array(trace["beta"])                                       # (H·r, T)
    S = np.array(trace["states"])                                        # (T, H, r, d_k)
    T = S.shape[0]
    flat = S.reshape(T, -1).T                                            # (H·r·d_k, T)
    fig = plt.figure(figsize=(max(8, 0.16 * T + 2), 8))
    grid = fig.add_gridspec(3, 2, width_ratios=[60, 1], height_ratios=[2, 3, 1.3], wspace=0.02)
    axes = [fig.add_subplot(grid[0, 0])]
    axes += [fig.add_subplot(grid[i, 0], sharex=axes[0]) for i in (1, 2)]
    im = axes[0].imshow(beta, aspect="auto", cmap="magma", vmin=0, interpolation="nearest")
    fig.colorbar(im, cax=fig.add_subplot(grid[0, 1]))
    axes[0].set_ylabel("β per state row")
    lim = max(1e-6, np.abs(flat).max())
    im = axes[1].imshow(flat, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    fig.colorbar(im, cax=fig.add_subplot(grid[1, 1]))
    axes[1].set_ylabel("S_t entries (row-major)")
    axes[2].plot(np.arange(T), np.linalg.norm(S.reshape(T, -1), axis=1), "k.-", ms=3)
    axes[2].set_ylabel("||S_t||")
    axes[2].grid(alpha=0.3)
    line_of = trace["line_of"]
    for f in trace["fact_lines"]:                                        # mark the tokens of every fact line
        ts = [t for t, l in enumerate(line_of) if l == f]
        if ts:
            axes[2].axvspan(ts[0] - 0.5, ts[-1] + 0.5, color="orange", alpha=0.25, lw=0)
            for ax in axes[:2]:
                ax.axvline(ts[0] - 0.5, color="lime", lw=1.2)
                ax.axvline(ts[-1] + 0.5, color="lime", lw=1.2, ls="--")
    for ax in axes[:2]:
        ax.tick_params(labelbottom=False)
    axes[2].set_xticks(range(T), [repr(t)[1:-1] for t in trace["tokens"]], rotation=90, fontsize=6)
    c = trace.get("config", {})
    axes[0].set_title(f"memory at work, layer {trace.get('layer', '?')} (d_k={c.get('key_dim')}, r={c.get('rank')}, "
                      f"H={c.get('heads')}, {c.get('update')}); fact lines: shaded / between green lines", fontsize=9)
    fig.subplots_adjust(left=0.07, right=0.95, top=0.95, bottom=0.13, hspace=0.08)
    _save(fig, path, tight=False)


def overwrite_summary(rows, path):
    """overwrites.json from the overwrite sweep's rows: {rule: {"updated_em": [per seed], "stale_rate":
    [per seed], "seeds": [...]}}, the rules in OVERWRITES' order. Returns the dict."""
    out = {}
    rows = sorted(_rows(rows), key=lambda r: int(r["seed"]))
    for rule in OVERWRITES["update"]:
        mine = [r for r in rows if r["update"] == rule]
        if mine:
            out[rule] = dict(updated_em=[float(r["updated_em"]) for r in mine],
                             stale_rate=[float(r["updated_stale"]) for r in mine], seeds=[int(r["seed"]) for r in mine])
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(path + ".tmp", path)
    return out


def plot_overwrites(summary, path):
    """Two panels, one bar per rule (mean over seeds, one dot per seed): EM on the reassigned keys, and
    how often the answer was one of the key's older values."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    rules = list(summary)
    for ax, key, title in ((axes[0], "updated_em", "EM on reassigned keys (latest value)"),
                           (axes[1], "stale_rate", "stale rate (an older value answered)")):
        for i, rule in enumerate(rules):
            vals = summary[rule][key]
            ax.bar(i, np.mean(vals), 0.6, color="C0" if rule != "hebbian" else "C3", alpha=0.7)
            ax.plot([i] * len(vals), vals, "k.", ms=6)
        ax.set_xticks(range(len(rules)), rules)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("overwrites across sessions: the delta rule erases, hebbian adds up", fontsize=10)
    _save(fig, path)


def draw_all(cfg, csv_path):
    """Every picture the CSVs and checkpoints in out_dir allow, written next to the CSV."""
    out = os.path.dirname(csv_path) or "."
    rows = read_rows(csv_path)
    if cfg["capacity"]:
        summary = capacity_summary(rows, os.path.join(out, "capacity.json"))
        lines = {u: v for u, v in summary.items() if u != "knee"}
        dks = sorted({int(dk) for v in lines.values() for dk in v})
        ns = sorted({int(n) for v in lines.values() for pts in v.values() for n in pts})
        rules = ["hebbian" if u == "hebbian" else "deltanet" for u in lines]   # keys given: no decay (λ = 1)
        given = keys_given(dks, ns, list(dict.fromkeys(rules)), cfg["rank"], cfg["state_passes"], cfg["state_beta"])
        plot_capacity(rows, os.path.join(out, "capacity.png"), given=given)
        for update, knees in summary["knee"].items():
            print(f"  {update:9s} knee (largest N at >= half the EM at N = {ns[0]}; none: not above 1/N there): "
                  + ", ".join(f"d_k={dk}: {k}" for dk, k in knees.items()))
    elif cfg["rank_sweep"]:
        summary = rank_summary(rows, os.path.join(out, "rank.json"))
        plot_rank(summary, os.path.join(out, "rank.png"))
        for r, em in summary.items():
            print(f"  r={r:>3s} " + " | ".join(f"{k} {v:.3f}" for k, v in em.items()))
    elif cfg["overwrites"]:
        summary = overwrite_summary(rows, os.path.join(out, "overwrites.json"))
        plot_overwrites(summary, os.path.join(out, "overwrites.png"))
        for rule, r in summary.items():
            print(f"  {rule:9s} updated-key EM {np.mean(r['updated_em']):.3f} ({', '.join(f'{x:.2f}' for x in r['updated_em'])})"
                  f" | stale rate {np.mean(r['stale_rate']):.3f}")
    elif rows:
        plot_heatmap(rows, os.path.join(out, "heatmap.png"))
    ckpts = []
    for r in rows:                                                       # the memories of the CSV's cells
        folder = os.path.join(out, "cells", r["cell"])
        if os.path.isdir(folder):
            ckpts += sorted(os.path.join(folder, f) for f in os.listdir(folder)
                            if f.startswith("memory_") and f.endswith(".pt"))
    ckpts = list(dict.fromkeys(ckpts))                                   # a cell scored twice: one curve
    if ckpts:
        name = ("capacity" if cfg["capacity"] else "rank" if cfg["rank_sweep"] else
                "overwrites" if cfg["overwrites"] else "ablate")
        plot_training(ckpts, os.path.join(out, name + "_training.png"))


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def setup(cfg):
    from data.prepare import load_tokenizer
    import train_backbone
    train_backbone.ensure_data(cfg["data_dir"])
    enc = load_tokenizer(cfg["data_dir"])
    device = autodetect_device() if cfg["device"] == "auto" else cfg["device"]
    gpt, _ = TM.ensure_backbone(cfg, DEFAULTS, PRESETS)
    if gpt.config.vocab_size != enc.n_vocab:
        raise UserError(f"backbone {cfg['backbone']} has vocabulary {gpt.config.vocab_size} but {cfg['data_dir']} "
                        f"has {enc.n_vocab}: use the data it was trained on (--data_dir)")
    return enc, gpt.to(device), device


def work(cfg, cells, enc, gpt, device):
    """The memory-at-work picture for --memory (or a fresh memory of the one cell given)."""
    from data import tasks
    if cfg["memory"]:
        try:
            model, _ = load_memory(cfg["memory"], gpt)
        except (ValueError, FileNotFoundError) as e:
            raise UserError(str(e))
    else:
        if len(cells) != 1:
            raise UserError("--work draws one memory: give single values (e.g. --key_dim=8 --rank=8) or --memory=CKPT")
        torch.manual_seed(cfg["seed"])
        model = DeltaMemGPT(gpt, TM.memory_config(cells[0]))
        print("no --memory given: drawing a freshly initialised memory")
    model.to(device).eval()
    ep = tasks.make_recall(np.random.default_rng(cfg["seed"]), "tiny", "iid")
    trace = memory_trace(model, enc, ep, cfg["layer"])
    base = os.path.join(cfg["out_dir"], "work")
    with open(base + ".json", "w") as f:
        json.dump(trace, f)
    plot_work(trace, base + ".png")


def main(argv=None):
    cfg, axes = parse_args(sys.argv[1:] if argv is None else argv)
    check_positive(cfg, ("max_iters", "batch_size", "learning_rate", "eval_episodes", "log_interval"))
    if cfg["results"]:
        return plot_families(cfg["results"], os.path.splitext(cfg["results"])[0] + "_families.png")
    writable_dir(cfg["out_dir"])
    if cfg["state_capacity"]:
        csv_path = os.path.join(cfg["out_dir"], "state_capacity.csv")
        if not cfg["plots"]:
            state_capacity(cfg, axes, csv_path)
        return plot_state_capacity(csv_path, os.path.join(cfg["out_dir"], "state_capacity.png"))
    csv_path = os.path.join(cfg["out_dir"], "capacity.csv" if cfg["capacity"] else "rank.csv" if cfg["rank_sweep"] else
                            "overwrites.csv" if cfg["overwrites"] else "ablate.csv")
    if cfg["plots"]:
        if not read_rows(csv_path):
            raise UserError(f"{csv_path} has no finished rows yet: run the sweep first (without --plots)")
        return draw_all(cfg, csv_path)
    cells = make_cells(cfg, axes)
    TM.check_files(cfg, DEFAULTS, PRESETS)                               # --memory, --backbone: before any work
    enc, gpt, device = setup(cfg)
    for c in cells:
        TM.check_fits(c, gpt)                                            # layers and heads x rank fit the backbone
    if cfg["work"]:
        return work(cfg, cells, enc, gpt, device)
    sweep(cells, enc, gpt, device, csv_path)
    draw_all(cfg, csv_path)


if __name__ == "__main__":
    run_cli(main)

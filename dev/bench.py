"""
What the memory costs, measured side by side and reported as ratios (one run, one machine):

  1. scan       chunkwise-parallel vs token-loop delta rule, forward + backward
  2. training   one memory-training step (train_memory's episode_loss: write pass, read pass, the β and
                general-text terms, frozen backbone) vs a plain backbone forward + backward, all weights
                trainable, same tokens (random); 2b: the recipe's whole step on real episodes, term by
                term, against a backbone pretraining step
  3. answering  Q questions after a history of T tokens: δ-mem writes the history once and reads per
                question; full context re-reads the (left-truncated) history for every question
  4. memory     the peak extra memory of every measured call (see peak_mib)
  5. decode     per-token greedy generation latency with the memory attached vs the bare backbone

    python dev/bench.py                 # the full run (~70 s on 2 CPU cores, ~30 s on an H200)
    python dev/bench.py --quick         # a seconds-long smoke run (tiny sizes, numbers not meaningful)
    python dev/bench.py --T=1024 --repeats=5 --out=bench.json
    python dev/bench.py --preset=gpu --chunk_size=32    # another preset's sizes, another chunk
    python dev/bench.py --compile       # the training step (part 2) with torch.compile'd models

Models have the sizes of the device's preset (--preset=auto: gpu on CUDA, else cpu; the cpu preset is 4
layers, 4 heads, width 128, block 256; the gpu preset 6 layers, 6 heads, width 384, block 512; vocabulary
1024 for both) and the memory its config (chunk 8 on cpu, 64 on gpu), with random weights: speed does not
depend on what the weights learned. Every time is the best of --repeats runs
after one warm-up run. Prints a table per part and writes bench.json (with the machine it ran on).
"""
import contextlib
import copy
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

# run as `python dev/bench.py`, sys.path[0] is dev/; put the repo root first so the project imports
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from nanodeltamem import GPT, GPTConfig, DeltaMemGPT, IGNORE_INDEX, delta_rule_scan  # noqa: E402

def sizes(preset="cpu", chunk_size=None):
    """(backbone, memory): train_backbone's model shape and train_memory's config of `preset` (cpu or gpu),
    vocabulary 1k for both (speed hardly depends on it); chunk_size overrides the preset's chunk."""
    import train_backbone
    import train_memory
    bb = {**train_backbone.DEFAULTS, **train_backbone.PRESETS[preset]}
    backbone = dict({k: bb[k] for k in ("n_layer", "n_head", "n_embd", "block_size")}, vocab_size=1024)
    memory = {**train_memory.DEFAULTS, **train_memory.PRESETS[preset]}
    return backbone, dict(memory, chunk_size=chunk_size or memory["chunk_size"])


CPU = sizes("cpu")                                 # what every part measures unless told otherwise


def machine():
    info = dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                cpu_cores=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__)
    info["device_name"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({info['processor']})"
    if torch.cuda.is_available():
        info["gpu"] = info["device_name"]
    return info


# ----------------------------------------------------------------------------------------------
# measuring: time and peak memory of one call
# ----------------------------------------------------------------------------------------------

def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def best_times(fns, repeats, device):
    """Best wall time (seconds) of each fn() over `repeats` rounds, after one warm-up round. The fns take
    turns within a round, so a slow spell of a shared machine hits both sides of a ratio alike."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def best_time(fn, repeats, device):
    return best_times([fn], repeats, device)[0]


@contextlib.contextmanager
def quiet_stderr():
    """The profiler's C++ side logs start/stop lines to fd 2; silence them for the measurement."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def peak_mib(fn, device):
    """Peak memory of torch tensors allocated by one call to fn(), above what was live before (MiB).

    CUDA: the caching allocator's own peak counter. CPU: torch.profiler(profile_memory=True) records
    every tensor allocation and free with a timestamp; the running sum's maximum is the peak. Both count
    torch tensors only (not the Python heap or allocator caches), so the numbers compare like with like.
    (Frees of tensors that existed before the call are invisible to the profiler: a slight over-count.)
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    if device != "cpu":
        return None                                                      # mps: no honest counter
    with quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")                           # + allocation, - free
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2 ** 20


def ratio_row(name_a, fn_a, name_b, fn_b, repeats, device, memory=True):
    """Time (ms) and peak memory (MiB) of two calls; `ratio` = time a / time b."""
    row = {}
    times = best_times([fn_a, fn_b], repeats, device)
    for name, fn, t in ((name_a, fn_a, times[0]), (name_b, fn_b, times[1])):
        row[f"{name}_ms"] = 1000 * t
        row[f"{name}_peak_mib"] = peak_mib(fn, device) if memory else None
    row["ratio"] = row[f"{name_a}_ms"] / row[f"{name_b}_ms"]
    return row


def mib(x):
    return f"{x:7.1f} MiB" if x is not None else "    n/a"


# ----------------------------------------------------------------------------------------------
# 1. the scan: chunkwise vs token loop
# ----------------------------------------------------------------------------------------------

def inputs(B, H, T, dk, r, gates, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, H, T, dk, generator=g), dim=-1)
    k = F.normalize(torch.randn(B, H, T, dk, generator=g), dim=-1)
    v = torch.randn(B, H, T, r, generator=g)
    beta = torch.sigmoid(torch.randn(B, H, T, r if gates == "rowwise" else 1, generator=g) - 1.5)
    return [x.to(device).requires_grad_(True) for x in (q, k, v, beta)]


def scan_fwd_bwd(xs, chunk_size):
    def once():
        read, S = delta_rule_scan(*xs, chunk_size=chunk_size)
        (read.square().mean() + S.square().mean()).backward()
        for x in xs:
            x.grad = None
    return once


def scan_bench(Ts=(256, 1024, 4096), B=8, H=4, dk=8, r=8, chunk_size=8, repeats=3, device="cpu",
               gates_list=("rowwise", "scalar")):
    print(f"1. delta-rule scan, forward + backward, batch {B}, {H} state heads, d_k = {dk}, r = {r}, C = {chunk_size}")
    rows = []
    for gates in gates_list:
        for T in Ts:
            xs = inputs(B, H, T, dk, r, gates, device)
            rec, chk = scan_fwd_bwd(xs, None), scan_fwd_bwd(xs, chunk_size)
            row = ratio_row("recurrent", rec, "chunkwise", chk, repeats, device, memory=gates == "rowwise")
            row = dict(gates=gates, T=T, speedup=row.pop("ratio"), **row)
            rows.append(row)
            print(f"  {gates:8s} T={T:5d}: token loop {row['recurrent_ms']:8.1f} ms {mib(row['recurrent_peak_mib'])} | "
                  f"chunkwise {row['chunkwise_ms']:7.1f} ms {mib(row['chunkwise_peak_mib'])} | "
                  f"{row['speedup']:5.1f}x", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# models and batches shared by parts 2, 3 and 5
# ----------------------------------------------------------------------------------------------

def models(device, at=CPU, seed=0):
    """(trainable GPT, DeltaMemGPT with the memory of `at` on a frozen twin of it); at: sizes(...)."""
    import train_memory
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(**at[0])).to(device)
    mem = DeltaMemGPT(copy.deepcopy(gpt), train_memory.memory_config(at[1])).to(device)
    return gpt, mem


def train_batch(B=16, W=3, L=128, Q=6, Lq=20, line=16, answer=3, vocab=1024, seed=0):
    """A memory-training batch with the default batch's shapes (16 episodes x 3 windows x ~130 tokens,
    6 questions x ~20 tokens; data/tasks.collate_episodes' format), random tokens, lines of `line`
    tokens, the last `answer` tokens of every question as targets."""
    g = torch.Generator().manual_seed(seed)
    hist = torch.randint(vocab, (B, W, L), generator=g)                 # (B, W, L)
    seg = (torch.arange(L) // line).expand(B, W, L).clone()              # (B, W, L) line ids
    qx = torch.randint(vocab, (B, Q, Lq), generator=g)                  # (B, Q, Lq)
    qy = torch.full_like(qx, IGNORE_INDEX)
    qy[..., -answer:] = torch.randint(vocab, (B, Q, answer), generator=g)  # answer-only targets
    return dict(hist=hist, mask=torch.ones_like(hist, dtype=torch.bool), seg=seg, qx=qx, qy=qy)


# ----------------------------------------------------------------------------------------------
# 2. training: a memory step vs a plain backbone step on the same tokens
# ----------------------------------------------------------------------------------------------

def train_step_bench(repeats=3, device="cpu", compile=False, at=CPU, **shape):
    """compile=True: both steps run torch.compile'd models (as --compile in the training scripts)."""
    import train_memory
    gpt, mem = models(device, at)
    run_gpt, run_mem = (torch.compile(gpt), torch.compile(mem)) if compile else (gpt, mem)
    batch = {k: v.to(device) for k, v in train_batch(**shape).items()}
    cfg = at[1]
    hist, qx = batch["hist"].flatten(0, 1), batch["qx"].flatten(0, 1)  # (B·W, L), (B·Q, Lq)
    hist_y = torch.roll(hist, -1, dims=1)                                # next-token targets
    B, V = batch["hist"].size(0), gpt.config.vocab_size
    G = cfg["general_len"] or gpt.config.block_size                      # train_memory.step_inputs' row length
    gx = torch.randint(0, V, (B, 1, G), device=device)                   # the general-text rows
    gy = torch.randint(0, V, (B, 1, G), device=device)                   # (B, 1, G)

    def memory_step():                                                   # train_one's loss, less 2 terms
        mem.train()
        train_memory.episode_loss(run_mem, batch, cfg, device, general=(gx, gy)).backward()
        mem.zero_grad(set_to_none=True)

    def backbone_step():                                                 # the same windows, all weights
        gpt.train()
        loss = run_gpt(hist, hist_y)[1] + run_gpt(qx, batch["qy"].flatten(0, 1))[1] + run_gpt(gx[:, 0], gy[:, 0])[1]
        loss.backward()
        gpt.zero_grad(set_to_none=True)

    ntok = hist.numel() + qx.numel() + gx.numel()
    row = ratio_row("memory_step", memory_step, "backbone_step", backbone_step, repeats, device)
    row = dict(tokens=ntok, compile=compile, shape=dict(B=batch["hist"].size(0), W=batch["hist"].size(1), L=batch["hist"].size(2),
                                       Q=qx.size(0) // batch["hist"].size(0), Lq=qx.size(1), G=gx.size(-1)),
               overhead=row.pop("ratio"), **row)
    print(f"2. training step{' (torch.compile)' if compile else ''}, forward + backward, {ntok:,} tokens "
          f"({row['shape']}; G: general-text tokens "
          f"per episode):\n"
          f"  memory (write + read pass, frozen backbone) {row['memory_step_ms']:7.1f} ms {mib(row['memory_step_peak_mib'])} | "
          f"backbone (all weights trainable) {row['backbone_step_ms']:7.1f} ms {mib(row['backbone_step_peak_mib'])} | "
          f"{row['overhead']:.2f}x", flush=True)
    return row


def recipe_step_bench(repeats=3, device="cpu", at=CPU, preset="cpu", batch_size=None):
    """One step of train_memory's recipe on real training episodes (data/pydoc, made when missing), term by
    term: each row adds one term to episode_loss (forward + backward), so its time is that term's cost.
    The recipe's step averages them with aux_share (the share of steps with the context and general terms).
    Compared with one backbone pretraining step (forward + backward, the preset's batch x block tokens).
    batch_size: both steps' batch instead of the presets' (--quick)."""
    import train_backbone
    import train_memory
    from data.prepare import load_tokenizer
    cfg = dict(at[1], batch_size=batch_size or at[1]["batch_size"])
    train_backbone.ensure_data(cfg["data_dir"])
    enc = load_tokenizer(cfg["data_dir"])
    gpt, mem = models(device, (dict(at[0], vocab_size=enc.n_vocab), cfg))
    block = gpt.config.block_size
    batch, extra = train_memory.step_inputs(enc, dict(cfg, aux_share=1.0), 0, block,
                                            train_memory.CorpusRows(cfg["data_dir"]))
    sites, general, context = extra["sites"], extra["general"], extra["context"]
    terms = [("write pass + questions", {}), ("+ binding term", dict(sites=sites)),   # each row adds one term
             ("+ general term", dict(sites=sites, general=general)),
             ("+ context term", dict(sites=sites, general=general, context=context))]

    def step(kw):
        def fn():
            mem.train()
            train_memory.episode_loss(mem, batch, cfg, device, **kw).backward()
            mem.zero_grad(set_to_none=True)
        return fn

    B = batch_size or {**train_backbone.DEFAULTS, **train_backbone.PRESETS[preset]}["batch_size"]
    x = torch.randint(enc.n_vocab, (B, block), device=device)           # (B, block) a pretraining batch

    def backbone_step():
        gpt.train()
        gpt(x, x)[1].backward()
        gpt.zero_grad(set_to_none=True)

    times = best_times([step(kw) for _, kw in terms] + [backbone_step], repeats, device)
    bb_ms, cum = 1000 * times[-1], [1000 * t for t in times[:-1]]
    cost = [cum[0]] + [b - a for a, b in zip(cum, cum[1:])]              # ms each term adds
    aux = cfg["aux_share"]
    recipe_ms = cost[0] + cost[1] + aux * (cost[2] + cost[3])
    print(f"2b. the recipe's training step, term by term (real episodes: hist {tuple(batch['hist'].shape)}, "
          f"questions {tuple(batch['qx'].shape)}, context {tuple(context[0].shape)}, general "
          f"{tuple(general[0].shape)}), forward + backward:")
    for (name, _), ms in zip(terms, cost):
        print(f"  {name:24s} {ms:7.1f} ms  {ms / bb_ms:5.2f}x a backbone step")
    print(f"  recipe step (context and general terms on {aux:.0%} of steps) {recipe_ms:.1f} ms = "
          f"{recipe_ms / bb_ms:.2f}x a backbone pretraining step ({bb_ms:.1f} ms, {B} x {block} tokens)", flush=True)
    return dict(terms={name: ms for (name, _), ms in zip(terms, cost)}, recipe_step_ms=recipe_ms,
                backbone_step_ms=bb_ms, ratio=recipe_ms / bb_ms, aux_share=aux)


# ----------------------------------------------------------------------------------------------
# 3. answering Q questions after a history of T tokens
# ----------------------------------------------------------------------------------------------

def full_context_prompts(history, questions, block, answer_len):
    """Full context: every question behind the whole history, left-truncated so that the prompt and
    its answer fit the block. history (T,), questions (Q, Lq) -> (Q, min(T + Lq, block - answer_len))."""
    Q = questions.size(0)
    prompts = torch.cat([history.expand(Q, -1), questions], dim=1)      # (Q, T + Lq)
    return prompts[:, -(block - answer_len):]


def history_windows(history, block):
    """history (T,) -> (1, W, block) windows and their real-token mask, the last one padded."""
    T = history.numel()
    W = -(-T // block)
    idx = torch.zeros(W * block, dtype=torch.long, device=history.device)
    idx[:T] = history
    mask = torch.arange(W * block, device=history.device) < T
    return idx.view(1, W, block), mask.view(1, W, block)


def answer_bench(Ts=(128, 256, 512, 1024, 2048), Q=16, Lq=16, answer_len=4, repeats=3, device="cpu", at=CPU):
    gpt, mem = models(device, at)
    gpt.eval()
    mem.eval()
    block = gpt.config.block_size
    g = torch.Generator().manual_seed(1)
    questions = torch.randint(gpt.config.vocab_size, (Q, Lq), generator=g).to(device)  # (Q, Lq)
    print(f"3. answering {Q} questions ({Lq} tokens, {answer_len} answer tokens, greedy; batched) after T history "
          f"tokens; time per answer:")
    rows = []
    for T in Ts:
        history = torch.randint(gpt.config.vocab_size, (T,), generator=g).to(device)
        windows, mask = history_windows(history, block)
        prompts = full_context_prompts(history, questions, block, answer_len)

        @torch.no_grad()
        def write():                                                     # once per history
            mem.reset_memory()
            mem(windows, write=True, mask=mask, logits=False)

        write()
        states = [s.expand(Q, -1, -1, -1) for s in mem.memory_state()]  # every question reads the same S

        def deltamem_answers():                                          # reads only: question tokens
            mem.set_memory_state(states)
            mem.generate(questions, answer_len)

        def full_answers():                                              # the history, every time
            gpt.generate(prompts, answer_len, temperature=0)

        last = T == max(Ts)
        row = ratio_row("full_context", full_answers, "deltamem", deltamem_answers, repeats, device, memory=last)
        row["full_context_ms"] /= Q                                      # per answer
        row["deltamem_ms"] /= Q
        row.update(T=T, full_context_tokens=prompts.size(1), deltamem_tokens=Lq,
                   deltamem_write_ms=1000 * best_time(write, repeats, device),
                   deltamem_write_peak_mib=peak_mib(write, device) if last else None)
        row["deltamem_with_write_ms"] = row["deltamem_ms"] + row["deltamem_write_ms"] / Q  # write amortised
        rows.append(row)
        print(f"  T={T:5d}: full context ({row['full_context_tokens']:3d} tokens) {row['full_context_ms']:6.1f} ms | "
              f"δ-mem ({Lq} tokens) {row['deltamem_ms']:6.1f} ms, + write once {row['deltamem_write_ms']:6.1f} ms "
              f"({row['deltamem_with_write_ms']:5.1f} ms/answer amortised) | {row['ratio']:4.1f}x", flush=True)
    r = rows[-1]
    print(f"  peak memory at T={r['T']}: full context {mib(r['full_context_peak_mib'])} | δ-mem reads "
          f"{mib(r['deltamem_peak_mib'])}, write {mib(r['deltamem_write_peak_mib'])}")
    return rows


# ----------------------------------------------------------------------------------------------
# 5. decode: per-token latency with the memory attached
# ----------------------------------------------------------------------------------------------

def decode_bench(prompt_len=32, new_tokens=32, history=256, repeats=3, device="cpu", at=CPU):
    """Greedy generation, batch 1, with the KV cache on both sides (GPT.generate): the prompt once, then
    one token per step, so the ratio isolates the memory's reads of every new token."""
    gpt, mem = models(device, at)
    gpt.eval()
    mem.eval()
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(gpt.config.vocab_size, (1, prompt_len), generator=g).to(device)
    with torch.no_grad():                                                # a non-zero state to read
        mem.reset_memory()
        mem(torch.randint(gpt.config.vocab_size, (1, 1, history), generator=g).to(device), write=True, logits=False)
    bare = lambda: gpt.generate(prompt, new_tokens, temperature=0)
    with_memory = lambda: mem.generate(prompt, new_tokens)
    row = ratio_row("with_memory", with_memory, "bare", bare, repeats, device)
    row["with_memory_ms"] /= new_tokens                                  # per token
    row["bare_ms"] /= new_tokens
    row = dict(prompt_len=prompt_len, new_tokens=new_tokens, overhead=row.pop("ratio"), **row)
    print(f"5. decode, batch 1, {prompt_len}-token prompt + {new_tokens} tokens, per token: with memory "
          f"{row['with_memory_ms']:.2f} ms {mib(row['with_memory_peak_mib'])} | bare {row['bare_ms']:.2f} ms "
          f"{mib(row['bare_peak_mib'])} | {row['overhead']:.2f}x", flush=True)
    return row


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------

DEFAULTS = dict(T="256,1024,4096", repeats=3, chunk_size=0, quick=False, compile=False, out="bench.json",
                device="auto", preset="auto")            # chunk_size 0: the preset's; preset auto: gpu on CUDA


def parse(argv):
    from data.config import UserError, check_device, parse_config
    args = parse_config(argv, DEFAULTS)
    try:
        args["T"] = tuple(int(t) for t in args["T"].split(","))
    except ValueError:
        raise UserError(f"--T={args['T']} is not a comma list of whole numbers, e.g. --T=256,1024") from None
    if min(args["T"]) < 1 or args["repeats"] < 1 or args["chunk_size"] < 0:
        raise UserError("--T takes positive whole numbers (e.g. 256,1024), --repeats one >= 1, --chunk_size one >= 0")
    check_device(args["device"])
    if args["device"] == "auto":
        args["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if args["preset"] == "auto":
        args["preset"] = "gpu" if args["device"].startswith("cuda") else "cpu"
    if args["preset"] not in ("cpu", "gpu"):
        raise UserError(f"--preset must be auto, cpu or gpu, got {args['preset']!r}")
    return args


def main(argv):
    a = parse(argv)
    dev, rep = a["device"], a["repeats"]
    at = sizes(a["preset"], a["chunk_size"])
    backbone, a["chunk_size"] = at[0], at[1]["chunk_size"]
    info = machine()
    print(f"on {info['device_name']}, {info['cpu_cores']} CPU cores, torch {info['torch']}; {a['preset']} preset sizes "
          f"(layers {backbone['n_layer']}, width {backbone['n_embd']}, block {backbone['block_size']}), chunk {a['chunk_size']}"
          f"{' (--quick: tiny sizes, the numbers mean nothing)' if a['quick'] else ''}")
    if a["quick"]:                                                       # smoke run: every code path, tiny
        scan = scan_bench((64, 1024), B=1, H=1, chunk_size=a["chunk_size"], repeats=1, device=dev,
                          gates_list=("rowwise",))
        train = train_step_bench(1, dev, compile=a["compile"], at=at, B=2, W=2, L=32, Q=2, Lq=8)
        recipe = recipe_step_bench(1, dev, at, a["preset"], batch_size=2)
        answer = answer_bench((64, 512), Q=2, Lq=8, answer_len=2, repeats=1, device=dev, at=at)
        decode = decode_bench(8, 2, 32, repeats=1, device=dev, at=at)
    else:
        scan = scan_bench(a["T"], chunk_size=a["chunk_size"], repeats=rep, device=dev)
        train = train_step_bench(rep, dev, compile=a["compile"], at=at)
        recipe = recipe_step_bench(rep, dev, at, a["preset"])
        answer = answer_bench(repeats=rep, device=dev, at=at)
        decode = decode_bench(repeats=rep, device=dev, at=at)
    out = dict(machine=info, quick=a["quick"], preset=a["preset"], backbone=backbone, chunk_size=a["chunk_size"],
               memory_measure="torch.cuda.max_memory_allocated" if dev == "cuda"
               else "torch.profiler profile_memory: peak of live tensor bytes above the start",
               train_step_overhead=train["overhead"], recipe_step_ratio=recipe["ratio"],
               answer_time_ratio_at_max_T=answer[-1]["ratio"],
               answer_max_T=answer[-1]["T"], decode_overhead=decode["overhead"],
               scan=scan, train_step=train, recipe_step=recipe, answer=answer, decode=decode)
    for row in scan:
        if row["T"] == 1024:
            out["scan_speedup_T1024" if row["gates"] == "rowwise" else "scan_speedup_T1024_scalar"] = row["speedup"]
    with open(a["out"], "w") as f:
        json.dump(out, f, indent=1)
    s = out.get("scan_speedup_T1024")
    print(f"\nscan speedup at T=1024 (row-wise gates): {f'{s:.1f}x' if s else 'n/a (--T without 1024)'} | "
          f"training step overhead {out['train_step_overhead']:.2f}x (the recipe's: "
          f"{out['recipe_step_ratio']:.2f}x) | full context / δ-mem time per answer at "
          f"T={out['answer_max_T']}: {out['answer_time_ratio_at_max_T']:.1f}x | decode overhead "
          f"{out['decode_overhead']:.2f}x\nwrote {a['out']}")
    return out


if __name__ == "__main__":
    from train_backbone import run_cli
    run_cli(lambda: main(sys.argv[1:]))

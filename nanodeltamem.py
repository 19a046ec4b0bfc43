"""
nanodeltamem: the smallest complete delta-rule memory (δ-mem, arXiv 2605.12357) for a GPT.

Read this file top to bottom, small to large:

  1. the backbone      a nanoGPT-style transformer (with smeared keys); its attention shows where
                       corrections enter
  2. the delta rule    the memory's update, as a token loop and as a chunkwise-parallel scan
  3. the memory        one small online associative memory per attention layer
  4. the wrapper       freeze a trained GPT, attach memories, stream a history, ask questions

The idea in one paragraph. A pretrained GPT is frozen. Each attention layer gets a tiny state matrix
S (r x d_k, e.g. 8 x 8 numbers) that is written while the history streams past, with the delta rule:
write only the error between what S already returns for a key and the new value. Later, with the
history gone from the context, each token reads S with a query and turns the read into low-rank
corrections of the attention query and output. Only the memory's few parameters are trained.

Symbols, as the code names them:

  B, T, C     batch, tokens, width of the backbone (n_embd);  H: memory heads (states per layer)
  d_k, r      key size and value size (rank) of one state: S is (r, d_k)
  q, k, v     the memory's query, key (both unit length) and value at a token: (d_k), (d_k), (r)
  beta (β)    write strength per state row, in (0, 1): how much of the error v - S k is written
  lambda (λ)  keep (decay) factor per row: S_t = λ_t S_{t-1} + ...; 1 - β for the paper's rule
  read        S_{t-1} q_t, what a token reads (before its own write), turned into dq and do
  dq, do      low-rank corrections added to the attention query and output (the sides, "qo")
  W, L, Q     history windows per episode, tokens per window, questions per episode (batches)
  c_j         the backbone's key smear: attention key K_t = Σ_j c_j ∘ (W_k h)_{t-j} (smear_keys = K taps)
  w_j, u_j    the memory's key and query convolutions, the same kind of smear (key_conv, query_conv taps)

How it differs from FLA's naive reference (fla/ops/delta_rule/naive.py, naive_recurrent_gated_delta_rule):
FLA stores Sᵀ (d_k x r), scales q by d_k^-0.5 and reads after writing (o_t = S_t q_t); here S is r x d_k,
q is only normalised, and a token reads before it writes (read_t = S_{t-1} q_t), so that no token sees
its own value: the same recurrence otherwise.
"""
import hashlib
import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -1  # the one ignore index shared by model, data and tests: no loss on these targets


# ----------------------------------------------------------------------------------------------
# 1. The backbone: a small GPT (token + position embeddings, pre-LN blocks, tied head)
# ----------------------------------------------------------------------------------------------

@dataclass
class GPTConfig:
    block_size: int = 256    # longest context the backbone attends over
    vocab_size: int = 4096   # the project's own BPE (data/prepare.py)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False       # biases in Linear and LayerNorm layers
    smear_keys: int = 1      # K > 1: each attention key also sees the K-1 tokens before it (CausalSelfAttention)


# a short causal convolution: the backbone's smeared keys and the memory's key and query convolutions
def causal_conv(a, w, n_windows=1, past=None):
    """Σ_{j<K} w_j ∘ a_{t-j} over a (B, T, E) with weights w (K, E): a causal depthwise convolution that
    restarts in each of n_windows equal windows (K-1 zeros before a window's first token), or, for one
    window, continues from `past` (B, K-1, E), the tokens before it. Returns the result (B, T, E) and the
    last K-1 inputs (B, K-1, E), the next call's past."""
    K, (B, T, E) = w.size(0), a.shape
    L = T // n_windows
    a = a.reshape(B * n_windows, L, E)
    if past is None:
        past = a.new_zeros(B * n_windows, K - 1, E)
    full = torch.cat([past, a], 1)                                       # (B·W, K-1+L, E)
    out = sum(wj * full[:, K - 1 - j:K - 1 - j + L] for j, wj in enumerate(w))  # (B·W, L, E)
    return out.reshape(B, T, E), full[:, full.size(1) - (K - 1):]


# a content-weighted mean of the last P tokens: the whom part of the memory's keys and queries (name_dim)
def causal_pool(a, score, P, n_windows=1, past=None):
    """p_t = Σ_{j<P} e^{score_{t-j}} ∘ a_{t-j} / Σ_{j<P} e^{score_{t-j}} over a (B, T, E), with one score per
    group of E / G channels, score (B, T, G): a causal attention with a fixed query per group, inside each
    of n_windows windows (or continuing from `past`, as causal_conv). Why: the token that matters (a name)
    may sit at any offset, and a score of its own content finds it wherever it sits. Returns p (B, T, E)
    and the last P-1 inputs (B, P-1, E + G), the next call's past."""
    G, E = score.size(-1), a.size(-1)
    w = torch.exp(score)                                                 # (B, T, G) > 0
    both = torch.cat([w.repeat_interleave(E // G, -1) * a, w], -1)       # (B, T, E + G) numerator, weight
    ones = torch.ones(P, E + G, dtype=a.dtype, device=a.device)
    sums, tail = causal_conv(both, ones, n_windows, past)                # (B, T, E + G) window sums
    den = sums[..., E:].repeat_interleave(E // G, -1)                    # (B, T, E)
    return sums[..., :E] / den.clamp_min(1e-6), tail


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with separate q/k/v/o projections.

    The projections are separate so the memory can add its corrections in plain sight:
        Q   = W_q h + dq          (dq: the memory's query correction, or None)
        out = W_o Attn(Q, K, V) + do
    cache: None, or a dict that keeps this layer's K and V for decoding (greedy answers): a prompt fills
    it, then each new token attends to everything before it without recomputing it.

    smear_keys = K > 1 smears the keys (Olsson et al. 2022): K_t = Σ_{j<K} c_j ∘ (W_k h)_{t-j}, a causal
    depthwise convolution with c_0 = 1 and the rest 0 at init (so it starts as plain attention). Why: to
    find "the value that followed Alice", a head needs keys that know the token before them; smeared
    keys give that in one layer, where plain attention must first learn a previous-token head.
    """

    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = cfg.n_head
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)  # W_q
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)  # W_k
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)  # W_v
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)  # W_o
        self.dropout = cfg.dropout
        self.smear_c = None                                              # (K, C) the smear c_j
        if cfg.smear_keys > 1:
            self.smear_c = nn.Parameter(torch.zeros(cfg.smear_keys, cfg.n_embd))
            with torch.no_grad():
                self.smear_c[0] = 1.0

    def smear(self, k, cache=None):
        """Σ_j c_j ∘ k_{t-j} over k (B, T, C), the tokens before the first one read from the cache's
        last K-1 raw keys (zeros at the start of a sequence)."""
        past = cache.get("k_raw") if cache is not None else None         # (B, K-1, C) the tokens before
        k, tail = causal_conv(k, self.smear_c, past=past)                # (B, T, C)
        if cache is not None:
            cache["k_raw"] = tail                                        # for the next token
        return k

    def forward(self, h, dq=None, do=None, cache=None):
        B, T, C = h.shape
        q = self.q_proj(h)                                               # (B, T, C)
        if dq is not None:
            q = q + dq                                                   # low-rank query correction
        k, v = self.k_proj(h), self.v_proj(h)                            # (B, T, C) each: untouched
        if self.smear_c is not None:
            k = self.smear(k, cache)                                     # (B, T, C) smeared keys
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:                                            # decoding: prepend the earlier
            if "k" in cache:                                             # tokens' keys and values
                if T != 1:
                    raise ValueError(f"a filled cache takes one new token at a time, got {T}")
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)  # (B, nh, T0 + 1, hs)
            cache["k"], cache["v"] = k, v
        causal = k.size(2) == T                                          # a lone new token sees all the cache
        y = F.scaled_dot_product_attention(                              # (B, nh, T, hs)
            q, k, v, is_causal=causal, dropout_p=self.dropout if self.training else 0.0)
        y = self.o_proj(y.transpose(1, 2).reshape(B, T, C))              # (B, T, C)
        if do is not None:
            y = y + do                                                   # low-rank output correction
        return y


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x))))                  # (B, T, C)


class Block(nn.Module):
    """Pre-LN transformer block. `mem`, if given, maps the attention input h, the tokens' own embeddings e
    (what each token is, wherever it sits) and the layer's cache to (dq, do); `cache` is the layer's
    decoding cache (see CausalSelfAttention)."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, mem=None, cache=None, e=None):
        h = self.ln_1(x)                                                 # (B, T, C) attention input
        dq, do = mem(h, e, cache) if mem is not None else (None, None)   # the memory reads h (and e)
        x = x + self.attn(h, dq, do, cache)
        return x + self.mlp(self.ln_2(x))                                # (B, T, C)


def sinusoids(T, C):
    """The Transformer's sinusoidal position code (T, C): position t+k is a rotation of position t."""
    pos = torch.arange(T, dtype=torch.float32)[:, None]                  # (T, 1)
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, C, 2, dtype=torch.float32) / C)  # (C/2,)
    pe = torch.zeros(T, C)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)[:, :C // 2]
    return pe                                                            # (T, C)


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight                            # tied input/output embedding
        self.apply(self._init_weights)
        for name, p in self.named_parameters():                          # GPT-2: scale residual writes
            if name.endswith(("o_proj.weight", "mlp.proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        # positions are learned but start as sinusoids, so "look one token back" is a linear map, quick to
        # learn; 0.028 ≈ 0.02·√2 gives each entry the std of the token embeddings (a sinusoid's is 1/√2)
        with torch.no_grad():
            self.wpe.weight.copy_(0.028 * sinusoids(cfg.block_size, cfg.n_embd))  # (block_size, C)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def embed(self, idx, past=0):
        """Token + position embeddings of idx (B, T), whose first token sits at position `past`."""
        T = idx.size(1)
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens is longer than block_size={self.config.block_size}")
        pos = torch.arange(past, past + T, device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos))                  # (B, T, C)

    def forward(self, idx, targets=None, mems=None, cache=None, logits=True):
        """idx (B, T) token ids -> logits (B, T, V); loss if targets (B, T) are given.

        logits=False (with targets): return (None, loss), with the vocabulary head run only at the
        positions that have a target; the same loss for less work where most positions have none (answers).

        mems: None, or one callable per layer (or None for a layer without memory), see Block; each gets
        the token embeddings e = wte(idx) (B, T, C) beside h.
        cache: None, or a dict (start with {}) that keeps every layer's keys and values: idx is then
        the prompt on the first call and one new token, at the next position, on each later call.
        """
        x = self.embed(idx, past=cache[0]["k"].size(2) if cache else 0)  # (B, T, C)
        e = self.wte(idx) if mems is not None else None                  # (B, T, C) the tokens alone, for memories
        for i, block in enumerate(self.blocks):
            layer_cache = cache.setdefault(i, {}) if cache is not None else None
            x = block(x, mems[i] if mems is not None else None, layer_cache, e)  # (B, T, C)
        x = self.ln_f(x)                                                 # (B, T, C)
        if targets is not None and not logits:                           # the loss alone: only the N
            keep = targets != IGNORE_INDEX                               # positions with a target
            x, targets = x[keep], targets[keep]                          # (N, C), (N,)
        out = self.lm_head(x)                                            # (B, T, V), or (N, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(out.float().view(-1, out.size(-1)), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        return (out if logits else None), loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, stop_token=None, **fwd):
        """Sample (temperature > 0) or decode greedily (temperature == 0) up to max_new_tokens.

        With a KV cache: the prompt runs once, then one new token per step. Once the sequence is longer
        than block_size, each step re-runs its last block_size tokens (the cache starts again)."""
        block = self.config.block_size
        cache, feed = {}, idx[:, -block:]                                # feed (B, ≤ block): the prompt first
        for _ in range(max_new_tokens):
            logits, _ = self(feed, cache=cache, **fwd)
            logits = logits[:, -1, :]                                    # (B, V)
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)                    # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                nxt = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, nxt), dim=1)
            if stop_token is not None and bool((nxt == stop_token).all()):
                break
            feed = nxt                                                   # (B, 1) the cache has the rest
            if cache[0]["k"].size(2) == block:                           # full: re-run the last block
                cache, feed = {}, idx[:, -block:]
        return idx


# ----------------------------------------------------------------------------------------------
# 2. The delta rule: S_t = diag(1-β_t) S_{t-1} + diag(β_t) (v_t - S_{t-1} k_t) k_tᵀ
# ----------------------------------------------------------------------------------------------
# The state S (r x d_k) maps a key k (d_k) to a value S k (r). Each token reads before it writes:
#     read_t = S_{t-1} q_t
#     S_t    = diag(1-β_t) S_{t-1} + diag(β_t) (v_t - S_{t-1} k_t) k_tᵀ
# Three readings of the update:
#   (1) delta rule: write only the error between the stored value S k and the new value v;
#   (2) one SGD step on ½‖S k - v‖² with a step size β per state row, plus a decay (1-β) of that row;
#   (3) a gated DeltaNet transition whose gate is per row: every row of S (one value coordinate) is
#       its own scalar-gated delta rule with value dimension 1.
# Two switches give the ablations: erase=False drops the -S k term (hebbian: S_t = S_{t-1} + β v kᵀ
# when decay=False too), decay=False drops the (1-β) forgetting (the classic DeltaNet). decay may also be
# a tensor λ shaped like β: a decay gate of its own, S_t = diag(λ_t) S_{t-1} + diag(β_t)(v_t - S_{t-1} k_t) k_tᵀ
# (as in Gated DeltaNet), so how long a row remembers no longer depends on how hard it writes.
# β has shape (..., r) for row-wise gates or (..., 1) for one scalar gate shared by all rows.

def keep_factors(beta, decay):
    """What each token keeps of every state row: 1-β (decay=True, the paper's coupled rule), its own gate
    λ (decay a tensor shaped like β), or None (decay=False: nothing decays)."""
    if torch.is_tensor(decay):
        return decay
    return 1 - beta if decay else None


def delta_rule_recurrent(q, k, v, beta, state, decay=True, erase=True):
    """The reference token loop (and the decode path): O(r d_k) work per token.

    q, k (B, H, T, d_k); v (B, H, T, r); beta (B, H, T, r or 1); state (B, H, r, d_k).
    Returns read (B, H, T, r) with read_t = S_{t-1} q_t, and the final state (B, H, r, d_k).
    """
    S = state
    reads = []
    keep = keep_factors(beta, decay)                                     # (B, H, T, r|1) or None
    keeps = keep.unbind(2) if keep is not None else [None] * q.size(2)
    steps = zip(q.unbind(2), k.unbind(2), v.unbind(2), beta.unbind(2), keeps)  # unbind: one cheap backward
    for q_t, k_t, v_t, b_t, a_t in steps:                                # (B, H, d_k|r|1) each
        b = b_t[..., None]                                               # (B, H, r|1, 1) row gates
        reads.append(S @ q_t[..., None])                                 # (B, H, r, 1) read first
        err = v_t[..., None]                                             # (B, H, r, 1)
        if erase:
            err = err - S @ k_t[..., None]                               # v - S k: what is missing
        kept = a_t[..., None] * S if a_t is not None else S              # (B, H, r, d_k)
        S = kept + b * err * k_t[..., None, :]                           # (B, H, r, d_k)
    return torch.cat(reads, dim=-1).transpose(-1, -2), S                # (B, H, T, r), final S


def unit_lower_solve(A, rhs):
    """X = (I + A)⁻¹ rhs for strictly lower-triangular A (..., C, C): a batched triangular solve.

    (A is nilpotent, so (I + A)⁻¹ = (I - A)(I + A²)(I + A⁴)... would also do, in log2(C) matmuls;
    dev/LOG.md has the timings that chose the solve.)
    """
    eye = torch.eye(A.size(-1), dtype=A.dtype, device=A.device)
    return torch.linalg.solve_triangular(A + eye, rhs, upper=False, unitriangular=True)


def delta_rule_chunkwise(q, k, v, beta, state, chunk_size, decay=True, erase=True):
    """The same recurrence, C = chunk_size tokens at a time (WY / UT form, Yang et al. 2024).

    Per state row (drop the row index; s is that row, a d_k vector, v_t a scalar), in one chunk with
    start state s_0, let a_t = 1-β_t (or λ_t, or 1 without decay), G_t = Σ_{j<=t} log a_j and γ_t = exp(G_t).
      * Unroll the update: s_t = γ_t s_0 + Σ_{i<=t} (γ_t/γ_i) u_i k_i, with the effective write
        u_t = β_t (v_t - s_{t-1}·k_t).
      * Substitute s_{t-1}: u_t + β_t Σ_{i<t} (γ_{t-1}/γ_i)(k_t·k_i) u_i = β_t v_t - β_t γ_{t-1} (k_t·s_0),
        i.e. (I + A) u = β v - diag(β γ_{t-1}) K s_0, A = diag(β) (D ∘ K Kᵀ) strictly lower,
        D[t, i] = exp(G_{t-1} - G_i). So u = u0 - Tw K s_0 with u0 = (I+A)⁻¹ β v and
        Tw = (I+A)⁻¹ diag(β γ_{t-1}) (C x C), both independent of s_0: computed for all chunks at once.
        (Tw K is the W of the WY form; keeping the C x C factor apart, rather than W itself, C x d_k
        per row group, is what keeps wide keys cheap with row-wise gates.)
      * Carry:  s_C = γ_C s_0 + Σ_i (γ_C/γ_i) u_i k_i = M s_0 + Bc,
        M = γ_C I - Kᵀ diag(γ_C/γ) Tw K,  Bc = Kᵀ (γ_C/γ ∘ u0).   (in code S holds rows: S Mᵀ + Bc, and
        S Mᵀ = γ_C S - ((S Kᵀ) (diag(γ_C/γ) Tw)ᵀ) K in three thin matmuls, never forming M)
      * Reads, once the carry has given every chunk its s_0 and so its writes u = u0 - Tw K s_0:
        o_t = γ_{t-1} q_t·s_0 + Σ_{i<t} D[t, i] (q_t·k_i) u_i = P u + diag(γ_{t-1}) Q s_0,
        P = D ∘ Q Kᵀ strictly lower.
    Only the carry is sequential: three thin matmuls per chunk. Rows that share a gate (scalar
    gates) share A and Tw, so their C x C work is done once; row-wise gates pay it r times, and every
    product with K or Q is one matmul over all r rows.
    Decays stay differences of cumulative logs, clamped at 0 (the masked upper triangle), so no exp()
    can overflow.
    """
    B, H, T, dk = q.shape
    r, R = v.size(-1), beta.size(-1)                                     # R gate groups of m rows
    m = r // R
    keep = decay if torch.is_tensor(decay) else torch.ones_like(beta)    # (B, H, T, r|1) λ (unused if decay=True)
    pad = (-T) % chunk_size                                              # pad T with no-op tokens:
    if pad:                                                              # β = 0 writes nothing, λ = 1 keeps all
        q, k, v, beta = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, beta))
        keep = F.pad(keep, (0, 0, 0, pad), value=1.0)
    n, C = (T + pad) // chunk_size, chunk_size
    # two layouts: per gate group (.., R, C, m), where each group has its own decays, and all rows at
    # once (.., r, ·), where a product with the shared keys or queries is one matmul, not R thin ones
    groups = lambda x: x.reshape(B, H, n, C, R, m).transpose(-3, -2)     # (B, H, n, C, r) -> (B, H, n, R, C, m)
    rows = lambda x: x.transpose(-1, -2).reshape(B, H, n, r, C)          # (B, H, n, R, C, m) -> (B, H, n, r, C)
    q = q.reshape(B, H, n, C, dk)                                        # (B, H, n, C, d_k)
    k = k.reshape(B, H, n, C, dk)
    v = groups(v)                                                        # (B, H, n, R, C, m)
    b = beta.reshape(B, H, n, C, R).transpose(-1, -2)[..., None]         # (B, H, n, R, C, 1)
    a = keep.reshape(B, H, n, C, R).transpose(-1, -2)[..., None]         # (B, H, n, R, C, 1)

    # log a_t, kept finite: a saturated gate (β = 1 or λ = 0) would give log 0 and a NaN gradient;
    # log1p(-β) rather than log(1 - β): exact for β near 1
    g = torch.log1p(-b.clamp(max=1 - 1e-6)) if decay is True else a.clamp(min=1e-6).log()  # (B, H, n, R, C, 1)
    G = g.cumsum(-2)                                                     # (B, H, n, R, C, 1) G_t
    G_prev = G - g                                                       # G_{t-1}
    # D: the upper triangle masked by a 0/1 factor after exp(), not as -inf before it (slow on CPU)
    strict = torch.ones(C, C, dtype=q.dtype, device=q.device).tril(-1)   # (C, C)
    D = (G_prev - G.transpose(-1, -2)).clamp(max=0).exp() * strict       # (B, H, n, R, C, C)
    kT = k.transpose(-1, -2)                                             # (B, H, n, d_k, C)
    P = D * (q @ kT)[:, :, :, None]                                      # (B, H, n, R, C, C)

    if erase:
        A = b * D * (k @ kT)[:, :, :, None]                              # (B, H, n, R, C, C)
        diag = torch.diag_embed((b * G_prev.exp()).squeeze(-1))          # (B, H, n, R, C, C) diag(β γ_{t-1})
        X = unit_lower_solve(A, torch.cat([b * v, diag], -1))            # (B, H, n, R, C, m + C)
        u0, Tw = X.split([m, C], dim=-1)                                 # (.., C, m), (.., C, C)
    else:                                                                # no erase: u_t = β_t v_t
        u0, Tw = b * v, None

    to_end = (G[..., -1:, :] - G).exp()                                  # (B, H, n, R, C, 1) γ_C/γ_t
    gamma_C = G[..., -1:, :].exp().expand(-1, -1, -1, -1, m, -1).reshape(B, H, n, r, 1)  # (B, H, n, r, 1)
    Bc = rows(to_end * u0) @ k                                           # (B, H, n, r, d_k)
    # the carry S Mᵀ = γ_C S - ((S Kᵀ) (diag(γ_C/γ) Tw)ᵀ) K, never forming Mᵀ (d_k x d_k per row group)
    Et = (to_end * Tw).transpose(-1, -2) if Tw is not None else None     # (B, H, n, R, C, C)

    S = state                                                            # (B, H, r, d_k)
    by_chunk = lambda x: x.movedim(2, 0).contiguous().unbind(0)          # n contiguous chunks
    starts = []
    chunks = zip(by_chunk(gamma_C), by_chunk(Bc), by_chunk(k), by_chunk(kT),
                 by_chunk(Et) if Et is not None else [None] * n)
    for g_c, B_c, k_c, kT_c, Et_c in chunks:                             # the only sequential part
        starts.append(S)
        if Et_c is None:
            S = g_c * S + B_c                                            # (B, H, r, d_k)
        else:                                                            # (S Kᵀ) per group, then its C x C
            SK = ((S @ kT_c).view(B, H, R, m, C) @ Et_c).view(B, H, r, C)  # (B, H, r, C)
            S = g_c * S - SK @ k_c + B_c                                 # (B, H, r, d_k)
    S0 = torch.stack(starts, dim=2)                                      # (B, H, n, r, d_k)
    S0T = S0.transpose(-1, -2)                                           # (B, H, n, d_k, r)
    u = u0 if Tw is None else u0 - Tw @ groups(k @ S0T)                  # (B, H, n, R, C, m) the writes
    o = P @ u + G_prev.exp() * groups(q @ S0T)                           # (B, H, n, R, C, m)
    read = o.transpose(-3, -2).reshape(B, H, n * C, r)[:, :, :T]         # (B, H, T, r)
    return read, S


def delta_rule_scan(q, k, v, beta, state=None, chunk_size=None, decay=True, erase=True):
    """read, state = delta_rule_scan(q, k, v, beta, state=None, chunk_size=None)

    q, k (B, H, T, d_k) unit vectors; v (B, H, T, r); beta (B, H, T, r) or (B, H, T, 1);
    state (B, H, r, d_k) or None for S_0 = 0. read[..., t, :] = S_{t-1} q_t (read before write).
    chunk_size=None runs the token loop, an int the chunkwise form; both give the same numbers.
    decay: True (keep 1-β), False (keep everything) or a tensor λ shaped like beta (keep λ).
    Always computed in float32, also under autocast.
    """
    B, H, T, dk = q.shape
    r = v.size(-1)
    if beta.size(-1) not in (1, r):
        raise ValueError(f"beta's last dim must be 1 (scalar gate) or r={r} (row-wise), got {beta.size(-1)}")
    if state is None:
        state = q.new_zeros(B, H, r, dk, dtype=torch.float32)
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, v, beta, state = (x.float() for x in (q, k, v, beta, state))
        decay = decay.float() if torch.is_tensor(decay) else decay
        if chunk_size is None:
            return delta_rule_recurrent(q, k, v, beta, state, decay, erase)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
        return delta_rule_chunkwise(q, k, v, beta, state, chunk_size, decay, erase)


def scan_real_tokens(q, k, v, beta, state, real, chunk_size=None, decay=True, erase=True):
    """delta_rule_scan over each row's real tokens only (real (B, T) bool), in their order.

    Why: a batch pads every session window to its longest one, so about half of a training stream is
    padding, and padding is a no-op for the state (β = 0, keep 1). Taking each row's real tokens to the
    front (and as much of its padding as the row with the most real tokens leaves) halves the scan's
    steps and gives the same state, and the same reads at the real tokens. The reads at padding are never
    used (padding only follows a window's real tokens, and nothing reads a later token).
    """
    B, H, T, _ = q.shape
    real = real.bool()
    n = int(real.sum(1).max())                                           # the longest row's real tokens
    order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)[:, :n]  # (B, n) real positions first
    at = lambda x: order[:, None, :, None].expand(B, x.size(1), n, x.size(-1))  # (B, H, n, ·) indices
    take = lambda x: x.gather(2, at(x))                                  # (B, H, n, ·)
    decay = take(decay) if torch.is_tensor(decay) else decay
    read, state = delta_rule_scan(take(q), take(k), take(v), take(beta), state, chunk_size, decay, erase)
    full = torch.zeros(B, H, T, read.size(-1), dtype=read.dtype, device=read.device)
    return full.scatter(2, at(read), read), state                      # (B, H, T, r), (B, H, r, d_k)


# ----------------------------------------------------------------------------------------------
# 3. The memory: one delta-rule state per attention layer, read as low-rank corrections
# ----------------------------------------------------------------------------------------------

@dataclass
class MemoryConfig:
    key_dim: int = 8           # d_k: columns of S (key size)
    rank: int = 8              # r: rows of S = value size = readout size = correction rank
    heads: int = 1             # H independent states per layer (H > 1: multi-state write, MSW)
    write_unit: str = "token"  # token: one write per token (TSW) | segment: one per line (SSW)
    sides: str = "qo"          # which corrections: q (query), o (output) or qo (both)
    update: str = "delta"      # delta (keep 1-β, the paper) | gated (keep λ, a gate of its own) | deltanet (no
                               # decay) | hebbian (S += β v kᵀ: no erase, no decay)
    gates: str = "rowwise"     # rowwise: one β per state row | scalar: one β per state
    layers: tuple = None       # indices of the layers that carry memory; None = all
    alpha: float = 16.0        # correction scale s = alpha / rank (as LoRA)
    gate_bias: float = -1.5    # b_β at init: β = sigmoid(-1.5) ≈ 0.18 everywhere
    init: str = "paper"        # B_q, B_o init: paper (0.05 x columns of W_q, W_o) | zero
    chunk_size: int = 8        # chunkwise scan's chunk (None: token loop, for reference)
    key_conv: int = 1          # a write key sees its last key_conv tokens (1: only its own, as in the paper)
    query_conv: int = 1        # a read query sees its last query_conv tokens (1: only its own, as in the paper)
    name_dim: int = 0          # > 0: keys and queries are (what, d_k / name_dim) ⊗ (whom, name_dim): whose fact it is
    name_pool: int = 16        # ... taken from a content-weighted mean of the last name_pool tokens
    whom_from: str = "h"       # ... of what: h (the layer input) | tokens (each token's own embedding, wte)
    whom_score: str = "h"      # ... each token weighted by a score of: h | h+tokens (h and the token's embedding)
    decay_bias: float = 6.0    # update=gated: b_λ at init, λ = sigmoid(6) ≈ 0.9975 kept per token

    def __post_init__(self):
        choices = dict(write_unit=("token", "segment"), sides=("q", "o", "qo"),
                       update=("delta", "gated", "deltanet", "hebbian"), gates=("rowwise", "scalar"),
                       init=("paper", "zero"), whom_from=("h", "tokens"),
                       whom_score=("h", "h+tokens"))
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"{name}={getattr(self, name)!r} is not valid; choose one of {', '.join(valid)}")
        for name in ("key_dim", "rank", "heads", "key_conv", "query_conv"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range: use a whole number >= 1")
        n = self.name_dim
        if not isinstance(n, int) or n < 0 or (n and self.key_dim % n):
            raise ValueError(f"name_dim={n!r} is out of range: use 0 (off) or a divisor of key_dim={self.key_dim}")
        if not isinstance(self.name_pool, int) or self.name_pool < 1:
            raise ValueError(f"name_pool={self.name_pool!r} is out of range: use a whole number >= 1")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise ValueError(f"chunk_size={self.chunk_size!r} is out of range: use a whole number >= 1 (or None)")
        if self.layers is not None:
            self.layers = tuple(self.layers)
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"layers={','.join(map(str, self.layers))} repeats a layer: give each one once")

    def rule(self):
        """The scan's switches for `update`: delta decays (1-β) and erases, gated decays by its own gate
        (DeltaMemory passes λ) and erases, deltanet only erases, hebbian neither."""
        return dict(decay=self.update in ("delta", "gated"), erase=self.update != "hebbian")


class DeltaMemory(nn.Module):
    """One layer's memory. h_t (d) is the layer's attention input; per state head:

        q̃_t = L2norm(tanh(A_q h_t))  (d_k)     read query (query_conv = K > 1: Σ_{j<K} u_j ∘ A_q h_{t-j} inside)
        k̃_t = L2norm(tanh(A_k h_t))  (d_k)     write key (key_conv = K > 1: Σ_{j<K} w_j ∘ A_k h_{t-j} inside)
        v_t = A_v h_t                (r)       value
        β_t = sigmoid(W_β h_t + b_β)  (r or 1)  write strength per state row
        λ_t = sigmoid(W_λ h_t + b_λ)  (r or 1)  update=gated only: what a row keeps (else 1-β_t, or 1)
        read_t = S_{t-1} q̃_t, then S_t = diag(a_t) S_{t-1} + diag(β_t)(v_t - S_{t-1} k̃_t) k̃_tᵀ
                                       (a_t = 1-β_t for delta, λ_t for gated, 1 for deltanet)
        dq_t = s B_q read_t,  do_t = s B_o read_t      (s = alpha / r; reads of all heads concatenated)

    name_dim = n > 0: q̃_t and k̃_t are L2norm(tanh(what) ⊗ tanh(whom)), what = the A_q / A_k part above
    (d_k / n) and whom (n) a score-weighted mean of the last name_pool tokens (`whom`, `unit`): of what
    h says (whom_from=h) or of the tokens' own embeddings e_t (whom_from=tokens), weighted by a score of h
    (whom_score=h) or of h and e_t (whom_score=h+tokens).

    The state S (B, H, r, d_k) lives in `self.state` and is carried across forward calls, so a
    history can be written window by window and queried later with writes off.
    """

    def __init__(self, d, cfg):
        super().__init__()
        H, dk, r = cfg.heads, cfg.key_dim, cfg.rank
        self.cfg = cfg
        self.what_dim = dk // cfg.name_dim if cfg.name_dim else dk       # a key's what part (all of it: no whom)
        self.A_q = nn.Linear(d, H * self.what_dim, bias=False)
        self.A_k = nn.Linear(d, H * self.what_dim, bias=False)
        self.A_v = nn.Linear(d, H * r, bias=False)
        # key_conv = K > 1: k̃_t = L2norm(tanh(Σ_{j<K} w_j ∘ A_k h_{t-j})), a causal depthwise convolution
        # inside each window (the short convolution of DeltaNet / Mamba), w_j = 1/K at init. Why: at a
        # value token h_t may not say whose value it is; the name sits a few tokens back, and a key that
        # mixes it in from step 0 gives the gradient something to find.
        self.key_conv = None                                             # (K, H·what_dim) weights w_j
        if cfg.key_conv > 1:
            self.key_conv = nn.Parameter(torch.full((cfg.key_conv, H * self.what_dim), 1.0 / cfg.key_conv))
        # query_conv = K > 1: the same on the read side, q̃_t = L2norm(tanh(Σ_{j<K} u_j ∘ A_q h_{t-j})). Why: at
        # the answer slot ("Where does Alice live?\nA:") h_t may say what is asked but not about whom; the
        # name sits 4-8 tokens back, and a read that cannot see it can only find facts by their attribute.
        self.query_conv = None                                           # (K, H·what_dim) weights u_j
        if cfg.query_conv > 1:
            self.query_conv = nn.Parameter(torch.full((cfg.query_conv, H * self.what_dim), 1.0 / cfg.query_conv))
        # name_dim = n > 0: a key is a product of two parts, k̃_t = L2norm(tanh(A_k h_t) ⊗ tanh(c_t)) with
        # d_k = d_k/n x n: what (A_k, with its conv) and whom:
        # c_t = Σ_{j<P} exp(s_{t-j}) ∘ W_c h_{t-j} / Σ_{j<P} exp(s_{t-j}), s_t = 4 tanh(W_s h_t), per channel
        # a mean of the last P tokens weighted by a score of each token's content (causal_pool); a query's
        # whom part is the same map of its own last P tokens. Then
        # q̃·k̃ = (what·what')(whom·whom'): facts of one attribute and two people get orthogonal keys when their
        # whom parts are. Why the pool: in "Tara: Did you hear? Uma got a job as a locksmith." the name sits
        # 3-12 tokens before the value, at no offset a convolution could learn. Why apart: the answer loss
        # pulls every key to the attribute, so the whom part is trained only to tell people apart
        # (train_memory.binding_loss), and the answer loss never moves it.
        # whom_from=tokens: c_t pools W_c LN(e_{t-j}), the tokens' own embeddings, not their h. Why: h at a
        # name carries its context too ("Alice lives" vs "does Alice live"), so the same name's whom content
        # differs between statement and question; a token's embedding is the same wherever it sits. With
        # whom_score=h the score s reads h alone: h says which token is a name here.
        # whom_score=h+tokens: s_t = 4 tanh(W_s h_t + W_se LN(e_t)). Why: which token is a name is mostly
        # which token it is, and a score of the token's own embedding can weigh a name alike in statement
        # and question, where h alone spreads the pool's weight over the words around it.
        self.W_c = self.W_s = self.W_se = None
        if cfg.name_dim:
            self.W_c = nn.Linear(d, H * cfg.name_dim, bias=False)        # what a token says about whom
            self.W_s = nn.Linear(d, H * cfg.name_dim, bias=False)        # how much a token counts, per channel
            nn.init.zeros_(self.W_s.weight)                              # a plain mean at init
            if cfg.whom_score == "h+tokens":
                self.W_se = nn.Linear(d, H * cfg.name_dim, bias=False)   # ... and how much for being that token
                nn.init.zeros_(self.W_se.weight)
        gate = H * (r if cfg.gates == "rowwise" else 1)
        self.W_beta = nn.Linear(d, gate, bias=True)
        nn.init.zeros_(self.W_beta.weight)                               # β starts the same everywhere
        nn.init.constant_(self.W_beta.bias, cfg.gate_bias)
        self.W_lambda = None                                             # update=gated: the decay's own gate,
        if cfg.update == "gated":                                        # slow at init (a fact 232 tokens back
            self.W_lambda = nn.Linear(d, gate, bias=True)                # keeps sigmoid(6)^232 ≈ 0.56)
            nn.init.zeros_(self.W_lambda.weight)
            nn.init.constant_(self.W_lambda.bias, cfg.decay_bias)
        self.B_q = nn.Linear(H * r, d, bias=False) if "q" in cfg.sides else None
        self.B_o = nn.Linear(H * r, d, bias=False) if "o" in cfg.sides else None
        for B in (self.B_q, self.B_o):
            if B is not None:
                nn.init.zeros_(B.weight)
        self.scale = cfg.alpha / r
        self.state = None                                                # (B, H, r, d_k) or None = 0
        self.mean_beta = None                                            # mean β of the last write pass

    @torch.no_grad()
    def init_corrections(self, attn):
        """The paper's init: B = 0.05 x the first H·r columns of W_q (W_o), each scaled to unit norm."""
        for B, W in ((self.B_q, attn.q_proj.weight), (self.B_o, attn.o_proj.weight)):
            if B is not None:
                cols = W[:, :B.weight.size(1)]                           # (d, H·r)
                B.weight.copy_(0.05 * cols / cols.norm(dim=0, keepdim=True).clamp_min(1e-8))

    def _heads(self, x, size):
        B, T, _ = x.shape
        return x.view(B, T, self.cfg.heads, size).transpose(1, 2)        # (B, H, T, size)

    def pool_score(self, x, e=None):
        """The whom pool's score s (B, T, H·n) of x (B, T, d): 4 tanh(W_s x) with whom_score=h, or
        4 tanh(W_s x + W_se LN(e)) with whom_score=h+tokens (e (B, T, d): the tokens' embeddings)."""
        s = self.W_s(x)                                                  # (B, T, H·n)
        if self.W_se is not None:
            s = s + self.W_se(self._embedding(e, "whom_score=h+tokens"))
        return 4 * torch.tanh(s)

    def _embedding(self, e, why):
        """LN(e), the tokens' embeddings as the whom part reads them; one line when a caller passed none."""
        if e is None:
            raise ValueError(f"{why} needs the tokens' embeddings e (DeltaMemGPT passes them)")
        return F.layer_norm(e, e.shape[-1:])

    def whom(self, x, n_windows=1, past=None, e=None):
        """The whom part c (B, T, H·n) of x (B, T, d) before tanh, and causal_pool's tail (decoding); with
        whom_from=tokens its content comes from e (B, T, d), the tokens' embeddings."""
        if self.cfg.whom_from == "tokens":
            content = self.W_c(self._embedding(e, "whom_from=tokens"))   # (B, T, H·n) the token, not its context
        else:
            content = self.W_c(x)                                        # (B, T, H·n)
        return causal_pool(content, self.pool_score(x, e), self.cfg.name_pool, n_windows, past)

    def whom_unit(self, x, n_windows=1, e=None):
        """The whom part alone as unit vectors (B, H, T, n): what the binding term trains it on."""
        return F.normalize(torch.tanh(self._heads(self.whom(x, n_windows, e=e)[0], self.cfg.name_dim)), dim=-1)

    def unit(self, a, c=None):
        """Unit keys or queries (B, H, T, d_k) from the what part a (B, T, H·what_dim) and the whom part c
        (B, T, H·n) before tanh: L2norm(tanh(a) ⊗ tanh(c)) per head, or L2norm(tanh(a)) without c."""
        what = torch.tanh(self._heads(a, self.what_dim))                 # (B, H, T, what_dim)
        if c is None:
            return F.normalize(what, dim=-1)
        whom = torch.tanh(self._heads(c, self.cfg.name_dim))             # (B, H, T, n)
        return F.normalize((what[..., :, None] * whom[..., None, :]).flatten(-2), dim=-1)  # (B, H, T, d_k)

    def query_parts(self, x, n_windows=1, cache=None, e=None):
        """The read queries' what part a (B, T, H·what_dim) and whom part c (B, T, H·n) or None, before tanh
        (q̃ = unit(a, c)): a caller that needs a few positions' queries can take them there."""
        a = self.A_q(x)                                                  # (B, T, H·what_dim)
        if self.query_conv is not None:
            past = cache.get("q_raw") if cache is not None else None     # (B, K-1, H·what_dim) or None
            a, tail = causal_conv(a, self.query_conv, n_windows, past)
            if cache is not None:
                cache["q_raw"] = tail
        c = None
        if self.W_c is not None:
            past = cache.get("q_whom") if cache is not None else None    # (B, P-1, 2·H·n) or None
            c, tail = self.whom(x, n_windows, past, e)
            c = c.detach()                                               # (B, T, H·n) trained apart
            if cache is not None:
                cache["q_whom"] = tail
        return a, c

    def read_query(self, x, n_windows=1, cache=None, e=None):
        """Unit read queries q̃ (B, H, T, d_k) of x (B, T, d), T = n_windows windows of equal length (the
        query convolution restarts in each). cache (decoding, one window): keeps the last K-1 A_q h_t, so a
        new token's query sees the tokens before it."""
        return self.unit(*self.query_parts(x, n_windows, cache, e))      # (B, H, T, d_k)

    def key_parts(self, x, n_windows=1, e=None):
        """The write keys' what part a (B, T, H·what_dim) and whom part c (B, T, H·n) or None, before tanh
        (k̃ = unit(a, c)): a caller that needs a few positions' keys can take them there."""
        a = self.A_k(x)                                                  # (B, T, H·what_dim)
        if self.key_conv is not None:
            a = causal_conv(a, self.key_conv, n_windows)[0]              # (B, T, H·what_dim)
        c = self.whom(x, n_windows, e=e)[0].detach() if self.W_c is not None else None  # (B, T, H·n) trained apart
        return a, c

    def write_terms(self, x, n_windows=1, real=None, e=None):
        """Write-side projections of x (B, T, d), T = n_windows windows of equal (padded) length: unit
        keys k (B, H, T, d_k), values v (B, H, T, r), write gates β and keep factors (what every token keeps
        of each state row: 1-β, λ, or 1), both (B, H, T, r|1). real (B, 1, T, 1): padding neither writes
        nor decays.

        With key_conv = K > 1 the convolution restarts in every window (K-1 zeros before its first
        token), and padding only ever follows a window's real tokens: so a key depends on its own window
        alone, never on how much padding the other episodes of a batch gave the window before it."""
        k = self.unit(*self.key_parts(x, n_windows, e))                  # (B, H, T, d_k)
        v = self._heads(self.A_v(x), self.cfg.rank)                      # (B, H, T, r)
        gate = lambda W: torch.sigmoid(self._heads(W(x), W.out_features // self.cfg.heads))  # (B, H, T, r|1)
        beta = gate(self.W_beta) if real is None else gate(self.W_beta) * real
        if self.W_lambda is not None:
            keep = gate(self.W_lambda) if real is None else 1 - (1 - gate(self.W_lambda)) * real
        else:
            keep = 1 - beta if self.cfg.update == "delta" else torch.ones_like(beta)
        return k, v, beta, keep

    def forward(self, h, write=False, n_windows=1, mask=None, seg=None, cache=None, e=None):
        """h (N, L, d) with N = B * n_windows: window w of episode b is row b * n_windows + w; e (N, L, d)
        the tokens' embeddings (GPT.forward), which the whom part reads with whom_from=tokens.

        The windows of an episode are one stream for the memory (the state runs through all of
        them in order), while attention never looks past a window. mask (N, L) marks real tokens
        (padding never writes); seg (N, L) numbers the lines inside a window (SSW), -1 on padding.
        cache: decoding (reads only): the layer's cache dict, for the query convolution's last tokens.
        Returns the corrections (dq, do), each (N, L, d) or None.
        """
        cfg = self.cfg
        N, L, d = h.shape
        B, T = N // n_windows, n_windows * L
        x = h.reshape(B, T, d)                                           # (B, T, d) one stream
        e = e.reshape(B, T, d) if e is not None else None                # (B, T, d)
        q = self.read_query(x, n_windows, cache, e)                      # (B, H, T, d_k)
        S = self.state
        if S is None:
            S = x.new_zeros(B, cfg.heads, cfg.rank, cfg.key_dim, dtype=torch.float32)
        scan = dict(chunk_size=cfg.chunk_size, **cfg.rule())
        if not write:                                                    # read only: S stays as is
            read = q.float() @ S.transpose(-1, -2)                       # (B, H, T, r)
        elif cfg.write_unit == "token":                                  # TSW: every token writes
            real = torch.ones(B, 1, T, 1, device=x.device) if mask is None else mask.reshape(B, 1, T, 1).float()
            k, v, beta, keep = self.write_terms(x, n_windows, real, e)  # padding: β = 0, keep 1, a no-op
            self.mean_beta = beta.sum() / (real.sum() * beta.size(1) * beta.size(-1))  # mean β (regulariser)
            read, S = scan_real_tokens(q, k, v, beta, S, real.reshape(B, T), **self._decay(scan, keep))  # padding skipped
        else:                                                            # SSW: every line writes once
            read, S = self._segment_write(h, q, S, n_windows, seg, scan, e)
        self.state = S
        read = read.transpose(1, 2).reshape(N, L, -1)                    # (N, L, H·r) heads concatenated
        dq = self.scale * self.B_q(read) if self.B_q is not None else None   # (N, L, d)
        do = self.scale * self.B_o(read) if self.B_o is not None else None   # (N, L, d)
        return dq, do

    def _decay(self, scan, keep):
        """The scan's decay argument: the gate λ itself for update=gated, else the rule's switch."""
        return dict(scan, decay=keep) if self.W_lambda is not None else scan

    def _segment_write(self, h, q, S, n_windows, seg, scan, e=None):
        """SSW: mean-pool h over each line and write once per line; tokens read the state that held
        before their window. Trick: one scan over [L read-only token steps (β = 0), M line writes] per
        window, so the state still runs through all windows in order without a Python loop."""
        if seg is None:
            raise ValueError("segment writes need segment ids (seg) for every token, -1 on padding")
        N, L, d = h.shape
        B, W, H = N // n_windows, n_windows, self.cfg.heads
        M = int(seg.max().item()) + 1                                    # lines per window (padded)
        onehot = (seg[..., None] == torch.arange(M, device=h.device)).to(h.dtype)  # (N, L, M)
        count = onehot.sum(1)                                            # (N, M) tokens per line
        line_mean = lambda a: onehot.transpose(1, 2) @ a.reshape(N, L, d) / count.clamp_min(1)[..., None]
        pooled = line_mean(h)                                            # (N, M, d) line means
        e_lines = line_mean(e).reshape(B, W * M, d) if e is not None else None  # (B, W·M, d) the tokens' too
        real = (count > 0).to(h.dtype).reshape(B, 1, W * M, 1)
        k, v, beta, keep = self.write_terms(pooled.reshape(B, W * M, d), W, real, e_lines)  # (B, H, W·M, ·)
                                                                         # empty lines: no write, no decay
        self.mean_beta = beta.sum() / (real.sum() * H * beta.size(-1))  # mean β (regulariser)

        def steps(tok, line):                                            # (B, H, W, L+M, ·) interleave
            return torch.cat([tok.reshape(B, H, W, L, -1), line.reshape(B, H, W, M, -1)], 3).flatten(2, 3)

        z = lambda t, n: t.new_zeros(B, H, W * n, t.size(-1))
        one = lambda t, n: t.new_ones(B, H, W * n, t.size(-1))
        scan = self._decay(scan, steps(one(keep, L), keep))              # token steps keep everything
        read, S = delta_rule_scan(steps(q, z(q, M)), steps(z(k, L), k), steps(z(v, L), v),
                                  steps(z(beta, L), beta), S, **scan)   # (B, H, W·(L+M), r)
        read = read.reshape(B, H, W, L + M, -1)[:, :, :, :L].reshape(B, H, W * L, -1)  # (B, H, T, r)
        return read, S


# ----------------------------------------------------------------------------------------------
# 4. The wrapper: a frozen GPT with a memory in (some of) its attention layers
# ----------------------------------------------------------------------------------------------

def weights_hash(module):
    """A short fingerprint of a module's weights: binds a memory to the backbone it was trained on."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class DeltaMemGPT(nn.Module):
    """A frozen GPT plus one DeltaMemory per chosen layer; only the memories are trainable.

    Typical use (an episode = history windows, then questions):
        model.reset_memory()
        model(history, write=True, mask=mask)     # history (B, W, L): W windows streamed in order
        logits, loss = model(questions, targets)  # questions (B, Q, Lq): every question reads S
    """

    def __init__(self, gpt, mcfg):
        super().__init__()
        self.gpt = gpt
        self.mcfg = mcfg
        gpt.requires_grad_(False).eval()                                 # the backbone stays frozen
        layers = mcfg.layers if mcfg.layers is not None else range(gpt.config.n_layer)
        for i in layers:
            if not 0 <= i < gpt.config.n_layer:
                raise ValueError(f"layer {i} does not exist; the backbone has layers 0..{gpt.config.n_layer - 1}")
        d = gpt.config.n_embd
        if mcfg.heads * mcfg.rank > d:
            raise ValueError(f"heads x rank = {mcfg.heads * mcfg.rank} exceeds the model width {d}: "
                             f"use 1..{d // mcfg.heads} for the rank")
        self.memories = nn.ModuleDict({str(i): DeltaMemory(d, mcfg) for i in layers})
        if mcfg.init == "paper":
            for i, mem in self.memories.items():
                mem.init_corrections(gpt.blocks[int(i)].attn)
        self.backbone_hash = weights_hash(gpt)

    def train(self, mode=True):
        super().train(mode)
        self.gpt.eval()                                                  # no dropout in the backbone
        return self

    # the state, carried across calls
    def reset_memory(self):
        for mem in self.memories.values():
            mem.state = None

    def memory_state(self):
        return [mem.state for mem in self.memories.values()]

    def set_memory_state(self, states):
        for mem, s in zip(self.memories.values(), states):
            mem.state = s

    def forward(self, idx, targets=None, write=False, mask=None, seg=None, cache=None, logits=True):
        """idx (B, T) or (B, W, L): W windows per row, one memory stream per row.

        write=True streams the windows through the memory (each token, or each line with SSW,
        writes); write=False only reads the current state (questions). cache: the backbone's decoding
        cache (GPT.forward); a read keeps there only what its query convolution needs (DeltaMemory.read_query).
        logits=False: the caller needs no logits. With write=True, only write and return (None, None), what
        training's write pass runs; with targets, return (None, loss) (GPT.forward).
        """
        if write and cache is not None:
            raise ValueError("writes stream whole windows: decode with a cache only when reading (write=False)")
        n_windows = idx.size(1) if idx.dim() == 3 else 1
        flat = lambda t: t.flatten(0, 1) if t is not None and t.dim() == 3 else t
        idx, targets, mask, seg = flat(idx), flat(targets), flat(mask), flat(seg)
        mems = [None] * self.gpt.config.n_layer
        for i, mem in self.memories.items():
            mems[int(i)] = lambda h, e, cache=None, mem=mem: mem(h, write, n_windows, mask, seg, cache, e=e)
        if write and not logits:
            return self._write_only(idx, mems)
        return self.gpt(idx, targets, mems=mems, cache=cache, logits=logits)

    def _write_only(self, idx, mems):
        """forward(write=True, logits=False): the same states, for less work. Nothing of the history's own
        forward pass is used but the states, and no layer above the last memory writes, so the backbone
        stops at that layer's attention input: its attention, the layers above and the vocabulary head
        are skipped."""
        last = max(int(i) for i in self.memories)
        x, e = self.gpt.embed(idx), self.gpt.wte(idx)                    # (N, L, C) each
        for block, mem in zip(self.gpt.blocks[:last], mems):
            x = block(x, mem, e=e)                                       # (N, L, C)
        mems[last](self.gpt.blocks[last].ln_1(x), e)                     # the last write: nothing above reads it
        return None, None

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, stop_token=None):
        """Greedy answers read from the memory (writes off). idx (B, T) -> (B, T + new)."""
        mems = [None] * self.gpt.config.n_layer
        for i, mem in self.memories.items():
            mems[int(i)] = lambda h, e, cache=None, mem=mem: mem(h, cache=cache, e=e)
        return self.gpt.generate(idx, max_new_tokens, temperature=0, stop_token=stop_token, mems=mems)

    def param_counts(self):
        trainable = sum(p.numel() for p in self.memories.parameters())
        frozen = sum(p.numel() for p in self.gpt.parameters())
        return trainable, frozen

    # a checkpoint holds only the memory, bound to the backbone's weights by their hash (the scripts write
    # and read the file: train_backbone.save_memory / load_memory)
    def checkpoint(self, **extra):
        return {"memory": self.memories.state_dict(), "mem_config": asdict(self.mcfg),
                "backbone_hash": self.backbone_hash, **extra}

    @classmethod
    def from_checkpoint(cls, ckpt, gpt, name="the checkpoint"):
        """The memory of `ckpt` on backbone `gpt`; refused (ValueError) if it was trained on another one."""
        if ckpt["backbone_hash"] != weights_hash(gpt):
            raise ValueError(f"{name} was trained on backbone {ckpt['backbone_hash']}, but this backbone is "
                             f"{weights_hash(gpt)}: pass the backbone checkpoint it was trained with (--backbone)")
        try:
            model = cls(gpt, MemoryConfig(**ckpt["mem_config"]))
            model.memories.load_state_dict(ckpt["memory"])
        except (TypeError, ValueError, RuntimeError) as e:              # unknown config keys, other shapes
            raise unfit(name, e) from None
        return model


# ----------------------------------------------------------------------------------------------
# Small utilities the scripts share
# ----------------------------------------------------------------------------------------------

def autodetect_device():
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def unfit(path, e):
    """The one-line error for a checkpoint whose config or weights this code cannot use (e: what failed)."""
    import textwrap
    return ValueError(f"{path} does not fit this code ({textwrap.shorten(str(e), 160)}); "
                      f"pass the right file, or delete it and train again")

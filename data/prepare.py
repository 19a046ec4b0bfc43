"""
Prepare the pretraining data for the backbone: a text corpus mixed with task-format documents,
a tokenizer, and train.bin / val.bin of uint16 token ids (nanoGPT layout).

    python data/prepare.py                              # pydoc corpus, our own 1k BPE, offline
    python data/prepare.py --corpus=shakespeare         # downloads Tiny Shakespeare
    python data/prepare.py --corpus=path/to/file.txt    # any UTF-8 text file
    python data/prepare.py --tokenizer=gpt2             # tiktoken's GPT-2 encoding (downloads)

Flags: --corpus=pydoc|shakespeare|PATH  --tokenizer=bpe|gpt2  --vocab_size=1024  --task_share=0.9
       --task_docs=8000  --out=DIR  --force

Writes to data/<corpus name>[_gpt2]/: train.bin, val.bin, tokenizer.tiktoken (bpe only), meta.json.
Why task documents: the frozen backbone must learn to read facts from its context, so a
share of its training rows are whole small episodes (history + Q/A) that fit in one 256-token block.
Layout of train.bin / val.bin: the corpus tokens, then EOT, then the task documents, each followed by
EOT. The corpus is small and gets repeated; task documents are unlimited, so many are written
(--task_docs) and train_backbone.py draws a row from them with probability task_share, starting at a
document start so the whole episode sits in the context.
Why a 1k vocabulary and a 0.9 task share: reading a fact from the context is a circuit (match the subject,
copy the value) that a small model forms suddenly after enough Q/A examples. Measured on the cpu-preset
backbone (dev/LOG.md, "What we measured"), it formed by ~1000 steps with these defaults and not within 3000
with a 4k vocabulary and a 0.3 share; a smaller softmax is also ~1.5x faster per step on a CPU
(11.1k vs 7.5k tokens/s, dev/LOG.md).
Other code imports load_meta / load_tokenizer / load_split / prepare from here.
"""

import base64
import dataclasses
import hashlib
import heapq
import json
import os
import sys
import time
from collections import Counter, defaultdict

import numpy as np
import regex  # not a new dependency: tiktoken requires it (pip show tiktoken), and stdlib re lacks \p{L}
import tiktoken

# run as `python data/prepare.py`, sys.path[0] is data/; put the repo root first so `data` is the package
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from data import tasks  # noqa: E402  (sibling module: synthetic episodes)
from data.config import UserError, parse_config  # noqa: E402  (the project's one flag parser)

# -----------------------------------------------------------------------------
# settings that define the generated data (recorded in meta.json; data rebuilds when they or the code change)

VERSION = "prepare/1"
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TRAIN_FRAC = 0.9  # first 90% of the corpus (cut at a newline) is train, the rest val
TASK_MIX = [("msqa", "tiny"), ("msqa", "small"), ("recall", "tiny"), ("recall", "small")]
TRAIN_SEED, VAL_SEED = 1337, 7331  # task documents: different streams for train and val
CHUNK_CHARS = 4096  # the corpus is encoded in pieces of about this size (cut at newlines)
BLOCK_SIZE = 256  # every task document + its EOT fits in one block (trailing Q/A pairs dropped if needed)
DATA_ROOT = os.path.join(ROOT, "data")


class DataError(ValueError):
    """A user-fixable problem with inputs or prepared data; the message says what to do (one line)."""


# -----------------------------------------------------------------------------
# byte-level BPE: trainer (incremental pair counts) and tiktoken rank file I/O

def pretokenize(texts):
    """Count GPT-2 pre-tokens (as UTF-8 bytes) over an iterable of texts; merges never cross them."""
    pat = regex.compile(GPT2_PAT)
    counts = Counter()
    for text in texts:
        counts.update(piece.encode("utf-8") for piece in pat.findall(text))
    return counts


def merge_word(word, pair, new_id):
    """Replace every non-overlapping occurrence of pair in word (left to right) by new_id."""
    out, i, n = [], 0, len(word)
    while i < n:
        if i < n - 1 and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def bpe_merges(word_counts, n_merges):
    """
    Learn up to n_merges merges from {pre-token bytes: frequency}. Returns (merges, vocab):
    merges = [((id_a, id_b), new_id), ...] in order, vocab = list of token bytes indexed by id.
    Each step merges the most frequent adjacent pair (ties: smallest pair ids) and stops when no pair
    occurs twice. Counts live over the *unique* words weighted by frequency, and a merge only recounts
    the words that contain the pair (an index pair -> words), so 4k merges take seconds, not hours.
    """
    words = [list(w) for w in word_counts]  # token ids of each unique word, edited in place
    freqs = list(word_counts.values())
    pair_counts = defaultdict(int)
    where = defaultdict(set)  # pair -> indices of words that (may) contain it; stale entries are harmless
    for i, w in enumerate(words):
        for p in zip(w, w[1:]):
            pair_counts[p] += freqs[i]
            where[p].add(i)
    # max-heap of (-count, pair); an entry is stale when its count no longer matches pair_counts
    heap = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)

    vocab = [bytes([b]) for b in range(256)]
    index = {t: i for i, t in enumerate(vocab)}  # bytes -> id, to catch two merges spelling the same token
    merges = []
    while len(merges) < n_merges and heap:
        negc, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -negc:
            continue  # stale entry
        if -negc < 2:
            break  # nothing left worth merging
        new_bytes = vocab[pair[0]] + vocab[pair[1]]
        new_id = index.get(new_bytes)
        if new_id is None:  # normal case: a new token; rarely, an existing token via another split
            new_id = len(vocab)
            vocab.append(new_bytes)
            index[new_bytes] = new_id
        merges.append((pair, new_id))
        changed = set()
        for i in where.pop(pair):
            w, f = words[i], freqs[i]
            w2 = merge_word(w, pair, new_id)
            if len(w2) == len(w):
                continue  # stale index entry: the word no longer holds this pair
            for p in zip(w, w[1:]):  # take the old word's pairs out ...
                pair_counts[p] -= f
                changed.add(p)
            for p in zip(w2, w2[1:]):  # ... and put the new word's pairs in
                pair_counts[p] += f
                where[p].add(i)
                changed.add(p)
            words[i] = w2
        for p in changed:
            c = pair_counts[p]
            if c > 0:
                heapq.heappush(heap, (-c, p))
            else:
                del pair_counts[p]  # keeps the dict small; the pair is gone from every word
    return merges, vocab


def train_bpe(texts, vocab_size):
    """Train on texts; returns tiktoken mergeable_ranks {token bytes: id} with ids 0..n-1 (n <= vocab_size-1)."""
    _, vocab = bpe_merges(pretokenize(texts), vocab_size - 1 - 256)  # the last id is <|endoftext|>
    return {t: i for i, t in enumerate(vocab)}  # rank = id = merge order, as tiktoken expects


def make_encoding(ranks, name="nanodeltamem-bpe"):
    """A tiktoken Encoding from our ranks; <|endoftext|> takes the id right after the last merge."""
    return tiktoken.Encoding(name=name, pat_str=GPT2_PAT, mergeable_ranks=ranks,
                             special_tokens={EOT: len(ranks)})


def ranks_to_bytes(ranks):
    """The .tiktoken rank file format: one `<base64 token> <rank>` per line, by rank."""
    lines = [base64.b64encode(t) + b" " + str(r).encode() for t, r in sorted(ranks.items(), key=lambda x: x[1])]
    return b"\n".join(lines) + b"\n"


def ranks_from_bytes(data):
    ranks = {}
    for line in data.splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def get_gpt2():
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken downloads its files on first use (requests / urllib errors vary)
        raise DataError(f"could not load tiktoken's gpt2 encoding ({type(e).__name__}); offline? "
                        f"use the default --tokenizer=bpe") from None


# -----------------------------------------------------------------------------
# corpus and task documents

def sha256(data):
    return hashlib.sha256(data).hexdigest()


def read_text(path):
    """A UTF-8 text file -> str, or a DataError that says what is wrong with it."""
    if not os.path.isfile(path):
        what = "is a directory, not a file" if os.path.isdir(path) else "not found"
        raise DataError(f"corpus file {path} {what}: pass --corpus=pydoc, --corpus=shakespeare or a path to a UTF-8 text file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"corpus file {path} is not UTF-8 (byte {e.start}): convert it, e.g. `iconv -t utf-8`") from None
    if not text.strip():
        raise DataError(f"corpus file {path} is empty: pass a file with some text in it")
    return text


def download_shakespeare(path):
    import urllib.request
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=20) as r:
            data = r.read()
    except Exception:
        raise DataError(f"could not download {SHAKESPEARE_URL}; offline? pass --corpus=/path/to/tinyshakespeare.txt") from None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, data)


def corpus_name(corpus):
    if corpus in ("pydoc", "shakespeare"):
        return corpus
    return os.path.splitext(os.path.basename(corpus))[0] or "corpus"


def load_corpus(corpus, out_dir):
    """corpus name or path -> text. pydoc ships with CPython (offline); shakespeare is downloaded once."""
    if corpus == "pydoc":
        from pydoc_data.topics import topics  # the help() topic texts, ~465 KB of English about Python
        return "\n".join(topics[k].strip() + "\n" for k in sorted(topics))
    if corpus == "shakespeare":
        path = os.path.join(out_dir, "input.txt")
        if not os.path.exists(path):
            download_shakespeare(path)
        return read_text(path)
    if not os.path.exists(corpus) and not any(c in corpus for c in "/\\."):  # a name, not a path
        raise DataError(f"unknown corpus {corpus!r}: use --corpus=pydoc, --corpus=shakespeare or a path to a UTF-8 text file")
    return read_text(corpus)


def split_corpus(text):
    """First TRAIN_FRAC of the text (cut at a newline when there is one) for train, the rest for val."""
    cut = int(len(text) * TRAIN_FRAC)
    nl = text.rfind("\n", 0, cut)
    if nl > 0:
        cut = nl + 1
    train, val = text[:cut], text[cut:]
    if not train.strip() or not val.strip():
        raise DataError("corpus too small to split 90/10 into train and val: pass a longer text file")
    return train, val


def task_episodes(seed):
    """An endless, seeded stream of small task episodes, drawn evenly from TASK_MIX."""
    rng = np.random.default_rng(seed)
    while True:
        task, preset = TASK_MIX[rng.integers(len(TASK_MIX))]
        yield tasks.make_episode(rng, task=task, preset=preset, split="pretrain")


def fit_in_block(ep, enc):
    """Token ids of ep's document such that it plus its EOT fits in BLOCK_SIZE, dropping trailing Q/A pairs
    if needed (the history stays whole; questions are independent). None if not even one Q/A fits."""
    while ep.questions:
        ids = enc.encode_ordinary(tasks.render_document(ep))
        if len(ids) + 1 <= BLOCK_SIZE:
            return ids
        ep = dataclasses.replace(ep, questions=ep.questions[:-1])
    return None


def take_until(items, target, size_of):
    """Items from an endless stream until their total size_of reaches target (skips items sized None)."""
    out, total, skipped = [], 0, 0
    items = iter(items)
    while total < target:
        item = next(items)
        size = size_of(item)
        if size is None:
            skipped += 1
            if skipped > 100 and skipped > 10 * len(out):
                raise DataError(f"task documents do not fit in {BLOCK_SIZE} tokens with this tokenizer: "
                                f"use a larger --vocab_size (e.g. 4096)")
            continue
        out.append(item)
        total += size
    return out


def share_target(share, corpus_size):
    return share / (1 - share) * corpus_size  # t / (c + t) = share  <=>  t = share / (1 - share) * c


def chunk_text(text, size):
    """Split text into pieces of about size chars, cut after a newline where possible."""
    chunks, start = [], 0
    while start < len(text):
        end = min(start + size, len(text))
        nl = text.rfind("\n", start, end)
        if end < len(text) and nl > start:
            end = nl + 1
        chunks.append(text[start:end])
        start = end
    return chunks


def interleave(corpus_chunks, doc_tokens, eot):
    """corpus chunk, EOT, doc, EOT, doc, EOT, corpus chunk, ... with the docs spread evenly over the chunks,
    so that random block sampling sees both kinds of text everywhere in train.bin."""
    total = sum(len(d) for d in doc_tokens)
    out, j, placed = [], 0, 0
    for k, chunk in enumerate(corpus_chunks):
        out.extend(chunk)
        quota = total * (k + 1) / len(corpus_chunks)  # docs due by the end of this chunk
        if j < len(doc_tokens) and placed < quota:
            out.append(eot)
        while j < len(doc_tokens) and placed < quota:
            out.extend(doc_tokens[j])
            out.append(eot)
            placed += len(doc_tokens[j])
            j += 1
    return out


# -----------------------------------------------------------------------------
# files: atomic writes, meta, loaders used by the rest of the repo

def write_atomic(path, data):
    """Write to path.tmp then rename, so a crash never leaves a half-written file under the real name."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def default_out(corpus, tokenizer):
    return os.path.join(DATA_ROOT, corpus_name(corpus) + ("_gpt2" if tokenizer == "gpt2" else ""))


def show(path):
    """A path as the user would type it: relative to the current directory when it is below it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def prepare_command(data_dir):
    """The command that (re)creates data_dir, for error messages."""
    meta_path = os.path.join(data_dir, "meta.json")
    corpus, tokenizer = None, "bpe"
    if os.path.exists(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            corpus, tokenizer = meta["corpus"], meta["tokenizer"]
        except (ValueError, KeyError, OSError):
            pass
    if corpus is None:  # guess from the directory name, e.g. data/pydoc_gpt2
        name = os.path.basename(os.path.normpath(data_dir))
        if name.endswith("_gpt2"):
            name, tokenizer = name[:-5], "gpt2"
        corpus = name if name in ("pydoc", "shakespeare") else f"/path/to/{name}.txt"
    cmd = f"python data/prepare.py --corpus={corpus}"
    if tokenizer == "gpt2":
        cmd += " --tokenizer=gpt2"
    if os.path.abspath(data_dir) != os.path.abspath(default_out(corpus, tokenizer)):
        cmd += f" --out={data_dir}"
    return cmd


def load_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise DataError(f"{path} not found: run `{prepare_command(data_dir)}`")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError:
        raise DataError(f"{path} is corrupt: rerun `{prepare_command(data_dir)} --force`") from None


def load_tokenizer(data_dir):
    """The tiktoken Encoding that produced data_dir's token ids."""
    meta = load_meta(data_dir)
    if meta["tokenizer"] == "gpt2":
        return get_gpt2()
    path = os.path.join(data_dir, "tokenizer.tiktoken")
    if not os.path.exists(path):
        raise DataError(f"{path} not found: run `{prepare_command(data_dir)} --force`")
    with open(path, "rb") as f:
        try:
            ranks = ranks_from_bytes(f.read())
        except ValueError:
            raise DataError(f"{path} is corrupt: rerun `{prepare_command(data_dir)} --force`") from None
    if len(ranks) != meta["eot_id"] or sorted(ranks.values()) != list(range(len(ranks))):
        raise DataError(f"{path} does not match meta.json: rerun `{prepare_command(data_dir)} --force`")
    return make_encoding(ranks, name=f"nanodeltamem-{os.path.basename(os.path.normpath(data_dir))}")


def load_split(data_dir, split):
    """np.memmap of uint16 token ids for split 'train' or 'val', checked against meta.json."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    meta = load_meta(data_dir)
    path = os.path.join(data_dir, f"{split}.bin")
    if not os.path.exists(path):
        raise DataError(f"{path} not found: run `{prepare_command(data_dir)}`")
    expected = 2 * meta[f"{split}_tokens"]
    if os.path.getsize(path) != expected:
        raise DataError(f"{path} has {os.path.getsize(path)} bytes, meta.json says {expected}: "
                        f"rerun `{prepare_command(data_dir)} --force`")
    return np.memmap(path, dtype=np.uint16, mode="r")


def is_up_to_date(out_dir, settings):
    """True when meta.json has the same settings and every file it lists is there with its recorded hash."""
    try:
        with open(os.path.join(out_dir, "meta.json")) as f:
            meta = json.load(f)
        if meta.get("settings") != settings:
            return False
        for name, digest in meta["files"].items():
            with open(os.path.join(out_dir, name), "rb") as f:
                if sha256(f.read()) != digest:
                    return False
        return True
    except (OSError, ValueError, KeyError, AttributeError):
        return False


# -----------------------------------------------------------------------------

def check_args(corpus, tokenizer, vocab_size, task_share):
    if not isinstance(corpus, str) or not corpus:
        raise DataError("--corpus must be pydoc, shakespeare or a path to a UTF-8 text file")
    if tokenizer not in ("bpe", "gpt2"):
        raise DataError(f"unknown --tokenizer={tokenizer}: use bpe (default, offline) or gpt2")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 257 <= vocab_size <= 65536:
        raise DataError(f"--vocab_size={vocab_size} is out of range: use an integer in [257, 65536] (256 bytes + "
                        f"merges + <|endoftext|>; ids must fit uint16)")
    if isinstance(task_share, bool) or not isinstance(task_share, (int, float)) or not 0 <= task_share < 1:
        raise DataError(f"--task_share={task_share} is out of range: use a number in [0, 1), e.g. 0.3")


def prepare(corpus="pydoc", tokenizer="bpe", vocab_size=1024, task_share=0.9, task_docs=8000, force=False,
            out=None):
    """Build (or reuse) the data directory for these inputs and return its path."""
    check_args(corpus, tokenizer, vocab_size, task_share)
    if isinstance(task_docs, bool) or not isinstance(task_docs, int) or task_docs < 0:
        raise DataError(f"--task_docs={task_docs} must be a whole number >= 0, e.g. --task_docs=8000")
    if task_share == 0:
        task_docs = 0
    t0 = time.time()
    out_dir = os.path.abspath(out or default_out(corpus, tokenizer))
    text = load_corpus(corpus, out_dir)
    code = b""
    for path in (__file__, tasks.__file__):  # an edit to this script or the task generator rebuilds the data
        with open(path, "rb") as f:
            code += f.read()
    settings = {
        "version": f"{VERSION} split={TRAIN_FRAC} seeds={TRAIN_SEED},{VAL_SEED} chunk={CHUNK_CHARS} "
                   f"mix={','.join(t + ':' + p for t, p in TASK_MIX)}",
        "corpus_sha256": sha256(text.encode("utf-8")),
        "code_sha256": sha256(code),
        "tokenizer": tokenizer,
        "vocab_size": vocab_size if tokenizer == "bpe" else None,
        "task_share": float(task_share),
        "task_docs": task_docs,
    }
    if not force and is_up_to_date(out_dir, settings):
        print(f"{show(out_dir)} is up to date (use --force to rebuild)")
        return out_dir

    train_text, val_text = split_corpus(text)
    enc = get_gpt2() if tokenizer == "gpt2" else None  # may fail offline: before anything is written
    os.makedirs(out_dir, exist_ok=True)  # only once the inputs are known good: no empty dirs for typos
    print(f"corpus {corpus}: {len(text):,} chars (train {len(train_text):,}, val {len(val_text):,})")

    # tokenizer: our BPE is trained on the train mix, with the task share estimated in chars (no tokens yet)
    files = {}
    if tokenizer == "bpe":
        t1 = time.time()
        docs = map(tasks.render_document, task_episodes(TRAIN_SEED))  # sized in chars: there are no tokens yet
        char_docs = take_until(docs, share_target(task_share, len(train_text)), len)
        ranks = train_bpe([train_text] + char_docs, vocab_size)
        enc = make_encoding(ranks)
        files["tokenizer.tiktoken"] = ranks_to_bytes(ranks)
        note = "" if enc.n_vocab == vocab_size else f" (ran out of pairs occurring twice; asked for {vocab_size})"
        print(f"trained BPE: {enc.n_vocab} ids{note} in {time.time() - t1:.1f}s")
    if enc.n_vocab > 65536:
        raise DataError(f"vocab of {enc.n_vocab} ids does not fit uint16 token files")
    eot = enc.eot_token

    # token ids: the corpus first, then EOT + task docs (each whole, trimmed to fit one block, + EOT)
    def encode_docs(seed, n):
        docs = (fit_in_block(ep, enc) for ep in task_episodes(seed))
        return take_until(docs, n, lambda d: None if d is None else 1)

    train_corpus = [t for c in chunk_text(train_text, CHUNK_CHARS) for t in enc.encode_ordinary(c)]
    n_train_corpus = len(train_corpus)
    train_docs = encode_docs(TRAIN_SEED, task_docs)
    train_ids = interleave([train_corpus], train_docs, eot)
    val_corpus = enc.encode_ordinary(val_text)
    val_docs = encode_docs(VAL_SEED, max(task_docs // 10, min(task_docs, 100)))
    val_ids = interleave([val_corpus], val_docs, eot)
    files["train.bin"] = np.array(train_ids, dtype=np.uint16).tobytes()
    files["val.bin"] = np.array(val_ids, dtype=np.uint16).tobytes()

    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # no meta while the files change: a crash here reads as "missing", never as stale
    for name, data in files.items():
        write_atomic(os.path.join(out_dir, name), data)
    doc_lens = [len(d) + 1 for d in train_docs + val_docs]  # + the EOT that ends each one
    meta = {
        "vocab_size": enc.n_vocab,
        "eot_id": eot,
        "tokenizer": tokenizer,
        "corpus": corpus if corpus in ("pydoc", "shakespeare") else os.path.abspath(corpus),
        "task_share": float(task_share),
        "train_tokens": len(train_ids),
        "val_tokens": len(val_ids),
        "train_corpus_tokens": n_train_corpus,
        "val_corpus_tokens": len(val_corpus),
        "train_task_docs": len(train_docs),
        "val_task_docs": len(val_docs),
        "corpus_sha256": settings["corpus_sha256"],
        "version": settings["version"],
        "settings": settings,
        "files": {name: sha256(data) for name, data in files.items()},
    }
    write_atomic(meta_path, (json.dumps(meta, indent=2) + "\n").encode())  # written last: marks a complete set

    n_task = sum(doc_lens)
    n_all = len(train_ids) + len(val_ids)
    print(f"tokens: train {len(train_ids):,}, val {len(val_ids):,} (corpus part {len(val_corpus):,}), "
          f"{len(text.encode('utf-8')) / (n_train_corpus + len(val_corpus)):.2f} corpus bytes/token")
    if doc_lens:
        print(f"task docs: {len(doc_lens):,} ({n_task / n_all:.1%} of the tokens; training draws "
              f"{task_share:.0%} of its rows from them), mean {np.mean(doc_lens):.0f} / max {max(doc_lens)} "
              f"tokens (<= {BLOCK_SIZE})")
    print(f"wrote {show(out_dir)} in {time.time() - t0:.1f}s")
    return out_dir


# -----------------------------------------------------------------------------
# command line: --key=value flags, nanoGPT style; a user's mistake is one line on stderr and exit code 2

DEFAULTS = dict(corpus="pydoc", tokenizer="bpe", vocab_size=1024, task_share=0.9, task_docs=8000, force=False, out="")


def parse_args(argv):
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__.strip())
        sys.exit(0)
    kwargs = parse_config(argv, DEFAULTS)
    return dict(kwargs, out=kwargs["out"] or None)


def main(argv=None):
    # its own one-line errors: run as a script, DataError is __main__'s, not the data.prepare one that the
    # scripts' run_cli catches (and the data layer imports no script)
    try:
        prepare(**parse_args(sys.argv[1:] if argv is None else argv))
    except (DataError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

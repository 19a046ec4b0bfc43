"""Tests for data/prepare.py: the BPE trainer, the data files it writes, reuse, and one-line user errors."""

import os
import subprocess
import sys
import types
from collections import Counter

import numpy as np
import pytest

from data import prepare as P
from data import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_corpus(n_chars=30_000):
    """Real English text that ships with CPython, cut to whole lines: offline and quick to tokenise."""
    from pydoc_data.topics import topics
    text = "\n".join(topics[k] for k in sorted(topics))
    return text[: text.rindex("\n", 0, n_chars) + 1]


@pytest.fixture
def fake_tasks(tmp_path, monkeypatch):
    """A stand-in for data.tasks.make_episode (real Episode objects, real render_document): fast, and its
    documents are easy to spot in decoded text."""
    src = tmp_path / "fake_tasks.py"
    src.write_text("# stand-in\n")
    names, values = ["Alice", "Bob", "Carol", "Dmitri"], ["tiger", "Paris", "violin", "nurse"]
    calls = Counter()

    def make_episode(rng, task, preset, split):
        calls[(task, preset, split)] += 1
        pairs = [(names[rng.integers(4)], values[rng.integers(4)]) for _ in range(2 if preset == "tiny" else 4)]
        return tasks.Episode(sessions=[["TASKDOC"] + [f"{k}: {v}." for k, v in pairs]],
                             questions=[tasks.Question(f"{k}?", v, "recall") for k, v in pairs], task=task)

    fake = types.SimpleNamespace(make_episode=make_episode, render_document=tasks.render_document,
                                 __file__=str(src), calls=calls)
    monkeypatch.setattr(P, "tasks", fake)
    return fake


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "mini.txt"
    path.write_text(small_corpus(), encoding="utf-8")
    return path


def build(tmp_path, corpus_file, **kw):
    args = dict(corpus=str(corpus_file), vocab_size=400, task_share=0.1, task_docs=30, out=str(tmp_path / "out"))
    args.update(kw)
    return P.prepare(**args)


# -----------------------------------------------------------------------------
# BPE

def naive_bpe_merges(word_counts, n_merges):
    """Reference trainer: recount every pair over every word before each merge (slow, obviously right)."""
    words = Counter({tuple(w): c for w, c in word_counts.items()})
    vocab = [bytes([b]) for b in range(256)]
    merges = []
    while len(merges) < n_merges:
        counts = Counter()
        for w, c in words.items():
            for p in zip(w, w[1:]):
                counts[p] += c
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))  # most frequent, ties to the smallest ids
        if counts[best] < 2:
            break
        new_bytes = vocab[best[0]] + vocab[best[1]]
        if new_bytes in vocab:
            new_id = vocab.index(new_bytes)
        else:
            new_id = len(vocab)
            vocab.append(new_bytes)
        merges.append((best, new_id))
        merged = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += c
        words = merged
    return merges, vocab


@pytest.mark.parametrize("text,n_merges", [
    # overlapping runs, ties everywhere and running out of pairs: where incremental bookkeeping breaks
    ("aaaaaaa aaa aa a abababab abab bababa aaabaaab " * 3 + "zzzz zz zzz", 100),
    (small_corpus(12_000), 250),
])
def test_incremental_trainer_matches_naive(text, n_merges):
    word_counts = P.pretokenize([text])
    fast = P.bpe_merges(word_counts, n_merges)
    slow = naive_bpe_merges(word_counts, n_merges)
    assert len(fast[0]) > 10
    assert fast == slow


@pytest.fixture(scope="module")
def trained():
    ranks = P.train_bpe([small_corpus(20_000)], 500)
    return ranks, P.make_encoding(ranks)


def test_bpe_vocab_layout(trained):
    ranks, enc = trained
    assert len(ranks) == 499 and sorted(ranks.values()) == list(range(499))
    assert all(ranks[bytes([b])] == b for b in range(256))  # the 256 bytes come first
    assert enc.n_vocab == 500 and enc.eot_token == 499
    assert enc.encode(P.EOT, allowed_special="all") == [499]


@pytest.mark.parametrize("text", [
    "def f(x):\n    return x ** 2  # squares\n",
    "naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, عربى",
    "emoji 🤖🎉👩‍👩‍👧 and flags 🇺🇳, tabs\t\tand   spaces\n\n\r\n",
    "<|endoftext|> is plain text when encoded as ordinary text",
    "",
])
def test_bpe_round_trip(trained, text):
    _, enc = trained
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text
    assert all(0 <= i < 499 for i in ids)


def test_bpe_round_trip_random_unicode(trained):
    _, enc = trained
    rng = np.random.default_rng(0)
    for _ in range(20):
        cps = rng.integers(1, 0x2FFFF, size=200)
        text = "".join(chr(c) for c in cps if not 0xD800 <= c < 0xE000)  # no lone surrogates: not valid text
        assert enc.decode(enc.encode_ordinary(text)) == text


def test_merges_compress(trained):
    _, enc = trained
    text = small_corpus(20_000)
    assert len(enc.encode_ordinary(text)) < 0.6 * len(text.encode("utf-8"))


def test_rank_file_reloads_same_encoding(trained):
    ranks, enc = trained
    again = P.ranks_from_bytes(P.ranks_to_bytes(ranks))
    assert again == ranks
    text = small_corpus(5_000) + " 🤖 Straße"
    assert P.make_encoding(again).encode_ordinary(text) == enc.encode_ordinary(text)


# -----------------------------------------------------------------------------
# prepare(): files, contents, reuse

def test_prepare_writes_consistent_files(tmp_path, corpus_file, fake_tasks):
    out = build(tmp_path, corpus_file)
    meta = P.load_meta(out)
    enc = P.load_tokenizer(out)
    train, val = P.load_split(out, "train"), P.load_split(out, "val")
    assert meta["vocab_size"] == enc.n_vocab == 400 and meta["eot_id"] == enc.eot_token == 399
    assert os.path.getsize(os.path.join(out, "train.bin")) == 2 * meta["train_tokens"] == 2 * len(train)
    assert os.path.getsize(os.path.join(out, "val.bin")) == 2 * meta["val_tokens"] == 2 * len(val)
    for name, digest in meta["files"].items():
        with open(os.path.join(out, name), "rb") as f:
            assert P.sha256(f.read()) == digest
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    # every (task, preset) of the mix was used, always with the pretraining split
    assert set(fake_tasks.calls) == {(t, p, "pretrain") for t, p in P.TASK_MIX}

    text = corpus_file.read_text(encoding="utf-8")
    train_text, val_text = P.split_corpus(text)
    assert train_text + val_text == text and train_text.endswith("\n")
    assert 0.85 < len(train_text) / len(text) <= 0.9

    # train.bin: EOT-separated pieces; the corpus pieces, in order, are exactly the train text
    pieces = enc.decode(train.tolist()).split(P.EOT)
    is_doc = [p.startswith("TASKDOC") for p in pieces]
    assert pieces[0].startswith(text.split("\n")[0])  # starts with the corpus' first line
    assert "".join(p for p, d in zip(pieces, is_doc) if not d) == train_text
    assert sum(is_doc) == meta["train_task_docs"] > 0
    assert not is_doc[0] and all(is_doc[1:-1])  # the corpus region first, then only whole task docs
    assert train[meta["train_corpus_tokens"]] == enc.eot_token and enc.eot_token not in train[:meta["train_corpus_tokens"]]

    # val.bin: corpus part first (exactly the val text), then EOT + task docs
    assert enc.decode(val[: meta["val_corpus_tokens"]].tolist()) == val_text
    assert val[meta["val_corpus_tokens"]] == enc.eot_token
    assert enc.decode(val[meta["val_corpus_tokens"] + 1:].tolist()).startswith("TASKDOC")

    # as many task docs as asked, the val side a tenth of them (at least min(asked, 100))
    assert meta["train_task_docs"] == 30 and meta["val_task_docs"] == 30
    assert meta["task_share"] == 0.1                                   # the share is the sampling share


def test_split_cuts_at_a_newline():
    text = "".join(f"line {i}: " + "x" * (i % 7) + "\n" for i in range(100))
    train, val = P.split_corpus(text)
    assert train + val == text and train.endswith("\n") and val.startswith("line ")
    assert 0.8 < len(train) / len(text) <= 0.9
    with pytest.raises(P.DataError, match="too small"):
        P.split_corpus("a")  # nothing left for train


def test_prepare_reuses_then_force_and_changes_rebuild(tmp_path, corpus_file, fake_tasks, capsys):
    out = build(tmp_path, corpus_file)
    files = [os.path.join(out, f) for f in ("train.bin", "val.bin", "tokenizer.tiktoken", "meta.json")]
    for f in files:
        os.utime(f, ns=(1_000_000_000, 1_000_000_000))  # an old mtime, so any rewrite shows
    capsys.readouterr()

    build(tmp_path, corpus_file)
    assert "is up to date (use --force to rebuild)" in capsys.readouterr().out
    assert [os.stat(f).st_mtime_ns for f in files] == [1_000_000_000] * 4

    build(tmp_path, corpus_file, force=True)
    assert "up to date" not in capsys.readouterr().out
    assert all(os.stat(f).st_mtime_ns != 1_000_000_000 for f in files)

    before = P.load_meta(out)
    build(tmp_path, corpus_file, task_share=0.2, task_docs=before["train_task_docs"] + 5)  # a changed setting
    assert "up to date" not in capsys.readouterr().out
    assert P.load_meta(out)["train_task_docs"] == before["train_task_docs"] + 5

    corpus_file.write_text(small_corpus(20_000), encoding="utf-8")  # a changed corpus rebuilds
    build(tmp_path, corpus_file, task_share=0.2, task_docs=before["train_task_docs"] + 5)
    assert "up to date" not in capsys.readouterr().out
    assert P.load_meta(out)["corpus_sha256"] != before["corpus_sha256"]

    os.truncate(os.path.join(out, "val.bin"), 10)  # a damaged file is not "up to date" either
    build(tmp_path, corpus_file, task_share=0.2, task_docs=before["train_task_docs"] + 5)
    assert "up to date" not in capsys.readouterr().out
    assert len(P.load_split(out, "val")) == P.load_meta(out)["val_tokens"]


def test_zero_task_share(tmp_path, corpus_file, fake_tasks):
    out = build(tmp_path, corpus_file, task_share=0.0)
    meta, enc = P.load_meta(out), P.load_tokenizer(out)
    assert meta["train_task_docs"] == meta["val_task_docs"] == 0
    assert meta["val_tokens"] == meta["val_corpus_tokens"]
    assert enc.eot_token not in P.load_split(out, "train")


def test_real_task_episodes_are_seeded_and_mixed():
    def first(seed, n=24):
        return [tasks.render_document(ep) for ep, _ in zip(P.task_episodes(seed), range(n))]
    assert first(P.TRAIN_SEED) == first(P.TRAIN_SEED)
    assert first(P.TRAIN_SEED) != first(P.VAL_SEED)
    assert len(set(first(P.TRAIN_SEED))) == 24  # one generator for the stream: no repeated episodes
    kinds = {ep.task for ep, _ in zip(P.task_episodes(0), range(24))}
    assert kinds == {"msqa", "recall"}


def test_fit_in_block_drops_trailing_questions_only(trained, monkeypatch):
    _, enc = trained
    eps = [ep for ep, _ in zip(P.task_episodes(1), range(30))]
    full = [len(enc.encode_ordinary(tasks.render_document(ep))) + 1 for ep in eps]
    monkeypatch.setattr(P, "BLOCK_SIZE", int(np.median(full)))  # half the documents must be trimmed or dropped
    n_trimmed = 0
    for ep, n in zip(eps, full):
        ids = P.fit_in_block(ep, enc)
        if ids is None:
            assert len(enc.encode_ordinary(tasks.render_history(ep) + tasks.render_qa(ep.questions[0]))) + 1 > P.BLOCK_SIZE
            continue
        text, doc = enc.decode(ids), tasks.render_document(ep)
        assert len(ids) + 1 <= P.BLOCK_SIZE and doc.startswith(text) and text.startswith(tasks.render_history(ep))
        assert text.endswith("\n") and (text == doc) == (n <= P.BLOCK_SIZE)  # whole Q/A pairs, trimmed only if needed
        n_trimmed += text != doc
    assert n_trimmed > 0


def test_prepare_with_real_tasks(tmp_path, corpus_file):
    out = build(tmp_path, corpus_file, vocab_size=600)
    meta, enc = P.load_meta(out), P.load_tokenizer(out)
    ids = P.load_split(out, "val")[meta["val_corpus_tokens"] + 1:].tolist()  # val's task part: doc, EOT, doc, EOT...
    docs = enc.decode(ids).split(P.EOT)[:-1]
    assert len(docs) == meta["val_task_docs"] > 0
    assert all("\nQ: " in d and len(enc.encode_ordinary(d)) + 1 <= P.BLOCK_SIZE for d in docs)


# -----------------------------------------------------------------------------
# loaders and errors

def test_load_split_missing_names_the_command(tmp_path):
    with pytest.raises(P.DataError) as e:
        P.load_split(str(tmp_path / "shakespeare"), "train")
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and "not found" in msg and "\n" not in msg
    assert "python data/prepare.py --corpus=shakespeare" in msg
    with pytest.raises(P.DataError, match=r"run `python data/prepare.py --corpus=pydoc --out=.*pydoc`"):
        P.load_meta(str(tmp_path / "pydoc"))  # not the default dir: the command names it with --out
    assert P.prepare_command(os.path.join(P.DATA_ROOT, "pydoc")) == "python data/prepare.py --corpus=pydoc"
    assert P.prepare_command(os.path.join(P.DATA_ROOT, "pydoc_gpt2")) == \
        "python data/prepare.py --corpus=pydoc --tokenizer=gpt2"


def test_load_split_truncated_file(tmp_path, corpus_file, fake_tasks):
    out = build(tmp_path, corpus_file)
    os.truncate(os.path.join(out, "train.bin"), 100)
    with pytest.raises(P.DataError, match=r"train\.bin.*--force"):
        P.load_split(out, "train")
    os.remove(os.path.join(out, "val.bin"))
    with pytest.raises(P.DataError, match=r"val\.bin not found"):
        P.load_split(out, "val")


def run_script(*args):
    return subprocess.run([sys.executable, "data/prepare.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_the_data_layer_imports_no_script():
    """data/ stands below the scripts: no module in it imports a script or a tool, at its top or inside
    a function (the flag parser it needs is data.config)."""
    import ast
    import glob
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    scripts = {"train_backbone", "train_memory", "dev"}
    for path in glob.glob(os.path.join(root, "data", "*.py")):
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad = [n for n in names if n.split(".")[0] in scripts]
            assert not bad, f"{os.path.relpath(path, root)}:{node.lineno} imports {bad[0]}"


@pytest.mark.slow
@pytest.mark.parametrize("args,expect", [
    (["--corpus=no_such_corpus_or_file"], "unknown corpus"),
    (["--vocab_size=abc"], "--vocab_size expects a int, got 'abc'"),
    (["--colour=blue"], "unknown option --colour"),
])
def test_script_bad_input_is_one_line_exit_2(args, expect):
    r = run_script(*args)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and expect in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args,expect", [
    (["--vocab_size=256"], "out of range"),
    (["--task_share=1"], "out of range"),
    (["--task_share=-0.1"], "out of range"),
    (["--task_share=nan"], "out of range"),
    (["--tokenizer=sentencepiece"], "unknown --tokenizer"),
    (["stray"], "unexpected argument"),
    (["{empty}"], "is empty"),
    (["{latin1}"], "not UTF-8"),
    (["{missing}"], "not found"),
])
def test_bad_input_messages(tmp_path, capsys, args, expect):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1") * 100)
    paths = {"{empty}": "--corpus=" + str(tmp_path / "empty.txt"),
             "{latin1}": "--corpus=" + str(tmp_path / "latin1.txt"),
             "{missing}": "--corpus=" + str(tmp_path / "gone" / "x.txt")}
    with pytest.raises(SystemExit) as e:
        P.main([paths.get(a, a) for a in args] + ["--out=" + str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and expect in err
    assert not (tmp_path / "out").exists()  # nothing written for a bad input


def test_offline_errors(tmp_path, monkeypatch):
    import urllib.request

    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(P.DataError, match=r"could not download .*offline\? pass --corpus=/path/to/tinyshakespeare.txt"):
        P.prepare(corpus="shakespeare", out=str(tmp_path / "sh"))
    monkeypatch.setattr(P.tiktoken, "get_encoding", offline)
    with pytest.raises(P.DataError, match=r"offline\? use the default --tokenizer=bpe"):
        P.prepare(tokenizer="gpt2", out=str(tmp_path / "g"))
    assert not (tmp_path / "g").exists() and not (tmp_path / "sh").exists()  # nothing left behind

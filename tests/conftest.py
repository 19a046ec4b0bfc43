# shared fixtures; the repo root goes on sys.path so tests import the top-level modules (nanodeltamem, data.*)
import os
import sys

import pytest
import tiktoken

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def enc():
    """A byte-level encoding (no merges): enough to check token bookkeeping, needs no prepared data."""
    ranks = {bytes([i]): i for i in range(256)}
    return tiktoken.Encoding("bytes", pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
                             mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 256})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tiny prepared data dir (300-token BPE, 40 task documents) for end-to-end runs."""
    from data import prepare
    d = tmp_path_factory.mktemp("data")
    corpus = d / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}.\n" for i in range(800)))
    return prepare.prepare(corpus=str(corpus), vocab_size=300, task_share=0.3, task_docs=40, out=str(d / "prep"))


@pytest.fixture
def fake_compile(monkeypatch):
    """torch.compile replaced by a stand-in with the same wrapper (the model under `_orig_mod`, so
    its state_dict keys carry that prefix) but no tracing: minutes of compilation off the suite.
    Returns the list of models it wrapped and the number of calls made through the wrappers."""
    import torch
    calls = dict(wrapped=[], calls=0)

    class Compiled(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self._orig_mod = model

        def forward(self, *args, **kwargs):
            calls["calls"] += 1
            return self._orig_mod(*args, **kwargs)

        def __getattr__(self, name):                                     # as torch.compile's wrapper does
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self._orig_mod, name)

    def compile(model, **kwargs):
        calls["wrapped"].append(model)
        return Compiled(model)

    real_keys = lambda m: list(torch.compile(m).state_dict())            # the real wrapper, never called
    monkeypatch.setattr(torch, "compile", compile)
    calls["real_keys"] = real_keys
    return calls

# shared fixtures; the repo root goes on sys.path so tests import the top-level modules (nanodeltamem, data.*)
import os
import sys

import pytest
import tiktoken

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_gpt(seed=0, **sizes):
    """The tests' one small random GPT: 2 layers, 2 heads, width 32, vocabulary 64, block 32 unless told."""
    import torch
    from nanodeltamem import GPT, GPTConfig
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**dict(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32), **sizes}))


@pytest.fixture(scope="module")
def gpt():
    """A random 3-layer GPT over the byte encoding `enc` (memory layers 1 and 2, as the defaults)."""
    return tiny_gpt(vocab_size=257, block_size=512, n_layer=3)


def assert_close(name, actual, expected, atol=1e-8, rtol=1e-5):
    """torch.allclose that, when it fails, names the tensor and prints the largest absolute difference."""
    import torch
    diff = (actual - expected).abs().max().item() if actual.shape == expected.shape else float("nan")
    assert actual.shape == expected.shape and torch.allclose(actual, expected, atol=atol, rtol=rtol), \
        f"{name}: max |difference| {diff:.3g} (atol {atol}, rtol {rtol}), shapes {tuple(actual.shape)} {tuple(expected.shape)}"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains a model or runs a script (python -m pytest -m 'not slow' skips them)")


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

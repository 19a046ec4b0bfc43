# lets tests import the top-level modules (nanodeltamem, data.*) from the repo root
import pytest
import tiktoken


@pytest.fixture(scope="session")
def enc():
    """A byte-level encoding (no merges): enough to check token bookkeeping, needs no prepared data."""
    ranks = {bytes([i]): i for i in range(256)}
    return tiktoken.Encoding("bytes", pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
                             mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 256})

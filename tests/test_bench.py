"""dev/bench.py's bookkeeping (never its timings): the peak-memory counter, the answering prompts, bench.json."""
import json

import pytest
import torch

from dev import bench


def test_peak_mib_counts_live_tensors_at_their_peak():
    def two_at_once():                                                   # 2 x 4 MiB alive together
        a = torch.ones(1024, 1024)
        b = a + 1
        return float(b[0, 0])

    def one_after_another():                                             # 4 MiB, freed, then 4 MiB again
        for _ in range(2):
            a = torch.ones(1024, 1024)
            del a

    assert bench.peak_mib(two_at_once, "cpu") == pytest.approx(8.0, abs=0.01)
    assert bench.peak_mib(one_after_another, "cpu") == pytest.approx(4.0, abs=0.01)


def test_full_context_prompts_keep_the_last_tokens_that_fit():
    hist, qs = torch.arange(10), torch.tensor([[100, 101, 102], [200, 201, 202]])
    long = bench.full_context_prompts(hist, qs, block=8, answer_len=2)  # 13 tokens > 8 - 2: truncated
    assert long.tolist() == [[7, 8, 9, 100, 101, 102], [7, 8, 9, 200, 201, 202]]
    short = bench.full_context_prompts(hist[:2], qs, block=8, answer_len=2)
    assert short.tolist() == [[0, 1, 100, 101, 102], [0, 1, 200, 201, 202]]


def test_history_windows_pad_the_last_window_and_mask_it():
    windows, mask = bench.history_windows(torch.arange(1, 6), block=4)
    assert windows.tolist() == [[[1, 2, 3, 4], [5, 0, 0, 0]]]
    assert mask.tolist() == [[[True] * 4, [True, False, False, False]]]


@pytest.mark.slow
def test_quick_run_writes_the_required_keys_and_consistent_ratios(tmp_path):
    out_path = tmp_path / "bench.json"
    bench.main(["--quick", f"--out={out_path}"])
    out = json.loads(out_path.read_text())
    for key in ("scan_speedup_T1024", "train_step_overhead", "answer_time_ratio_at_max_T", "decode_overhead"):
        assert isinstance(out[key], float) and out[key] > 0, key
    assert {"cpu_cores", "torch", "device_name"} <= set(out["machine"])
    row = next(r for r in out["scan"] if r["T"] == 1024 and r["gates"] == "rowwise")
    assert out["scan_speedup_T1024"] == pytest.approx(row["recurrent_ms"] / row["chunkwise_ms"])
    t = out["train_step"]
    assert out["train_step_overhead"] == pytest.approx(t["memory_step_ms"] / t["backbone_step_ms"])
    sh = t["shape"]
    assert t["tokens"] == sh["B"] * (sh["W"] * sh["L"] + sh["Q"] * sh["Lq"] + sh["G"])  # + general-text rows
    r = out["recipe_step"]                                               # the recipe: every term, aux on a share
    c = list(r["terms"].values())
    assert r["recipe_step_ms"] == pytest.approx(c[0] + c[1] + r["aux_share"] * (c[2] + c[3]))
    assert out["recipe_step_ratio"] == pytest.approx(r["recipe_step_ms"] / r["backbone_step_ms"])
    last = out["answer"][-1]
    assert last["T"] == max(r["T"] for r in out["answer"]) == out["answer_max_T"]
    assert out["answer_time_ratio_at_max_T"] == pytest.approx(last["full_context_ms"] / last["deltamem_ms"])
    assert last["full_context_tokens"] == out["backbone"]["block_size"] - 2  # truncated, room for 2
    d = out["decode"]
    assert out["decode_overhead"] == pytest.approx(d["with_memory_ms"] / d["bare_ms"])
    peaks = [t["memory_step_peak_mib"], t["backbone_step_peak_mib"], last["full_context_peak_mib"],
             last["deltamem_peak_mib"], last["deltamem_write_peak_mib"], d["with_memory_peak_mib"], d["bare_peak_mib"]]
    assert all(isinstance(p, float) and p > 0 for p in peaks)


def test_presets_take_the_training_scripts_sizes_and_chunk():
    import train_backbone
    import train_memory
    backbone, mem = bench.sizes("gpu")
    gpu = train_backbone.PRESETS["gpu"]
    assert [backbone[k] for k in ("n_layer", "n_head", "n_embd", "block_size")] == \
        [gpu["n_layer"], gpu["n_head"], gpu["n_embd"], gpu["block_size"]]
    assert mem["chunk_size"] == train_memory.PRESETS["gpu"]["chunk_size"] == 64
    assert bench.sizes("cpu")[1]["chunk_size"] == train_memory.DEFAULTS["chunk_size"] == 8
    assert bench.sizes("gpu", chunk_size=16)[1]["chunk_size"] == 16
    assert bench.sizes("cpu")[0]["n_embd"] == train_backbone.DEFAULTS["n_embd"] == bench.CPU[0]["n_embd"]
    assert bench.parse(["--device=cuda"])["preset"] == "gpu" and bench.parse(["--device=cpu"])["preset"] == "cpu"
    assert bench.parse(["--chunk_size=16"])["chunk_size"] == 16 and bench.parse([])["chunk_size"] == 0
    with pytest.raises(train_backbone.UserError, match="--preset must be"):
        bench.parse(["--preset=tpu"])
    with pytest.raises(train_backbone.UserError, match="--T=.* is not a comma list"):
        bench.parse(["--T=12,x"])

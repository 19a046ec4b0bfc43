"""Reliability: runs killed mid-way resume to the same weights, flags are range-checked, corrupt files
are named in one line, a seed fixes the results, hand-written episodes are handled or refused."""
import glob
import json
import re
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_backbone as TB
import train_memory as TM
from data import tasks
from data.tasks import Episode, Question
from nanodeltamem import GPT, GPTConfig, DeltaMemGPT, MemoryConfig
from train_backbone import load_backbone, load_memory, save_atomic, save_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow                      # every test here trains a backbone or runs a script
ENV = dict(os.environ, OMP_NUM_THREADS="1")        # tiny models: one thread is faster and the same in every process


@pytest.fixture(scope="module", autouse=True)
def one_thread():                                   # module scope: set before the module's other fixtures run
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



@pytest.fixture(scope="module")
def backbone(data_dir, tmp_path_factory):
    """A tiny random backbone checkpoint on the prepared vocabulary (the memory tests only need its shape)."""
    from data.prepare import load_tokenizer
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=load_tokenizer(data_dir).n_vocab, block_size=128, n_layer=1, n_head=2, n_embd=16))
    path = str(tmp_path_factory.mktemp("bb") / "backbone.pt")
    save_atomic(dict(model=gpt.state_dict(), config=gpt.config.__dict__), path)
    return path


def backbone_args(data_dir, out_dir, *extra):
    return [f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--n_layer=1", "--n_head=2", "--n_embd=16",
            "--block_size=32", "--batch_size=4", "--eval_interval=5", "--eval_iters=2", "--log_interval=5",
            "--warmup_iters=2", "--eval_episodes=2", "--max_iters=60", *extra]


def memory_args(data_dir, backbone, out_dir, *extra):
    return [f"--data_dir={data_dir}", f"--backbone={backbone}", f"--out_dir={out_dir}", "--episode_preset=tiny",
            "--batch_size=2", "--max_iters=30", "--log_interval=2", "--eval_interval=2", "--val_episodes=2", "--eval_episodes=1",
            "--baselines=", "--eval_read_window=16", "--device=cpu", "--layers=all", "--rank=8", *extra]  # a 1-layer, width-16 backbone


def start_and_stop(script, args, sig, ready, times=1):
    """Start `python script args`, send `sig` once `times` stdout lines contain `ready` (a checkpoint was saved)."""
    p = subprocess.Popen([sys.executable, script, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if sum(ready in x for x in lines) == times:
            p.send_signal(sig)
            break
    out, err = p.communicate(timeout=120)
    return p.returncode, "".join(lines) + out, err


def same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def run_ok(argv):
    r = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r


# ----------------------------------------------------------------------------------------------
# interrupted runs resume to the uninterrupted result
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    """The weights of an uninterrupted tiny backbone run."""
    out = tmp_path_factory.mktemp("straight")
    return load_backbone(TB.train(TB.parse_config(backbone_args(data_dir, out), TB.DEFAULTS, TB.PRESETS)))[0]


def test_backbone_ctrl_c_prints_resume_command_that_reaches_the_straight_weights(data_dir, straight, tmp_path):
    rc, out, err = start_and_stop("train_backbone.py", backbone_args(data_dir, tmp_path / "b"), signal.SIGINT,
                                  "saved")
    ckpt = os.path.join(tmp_path / "b", "backbone.pt")
    assert rc == 130, err
    stopped_at = torch.load(ckpt, weights_only=True)["iter_num"]
    assert 5 <= stopped_at < 60                                        # really stopped mid-run
    assert f"checkpoint saved to {ckpt}" in out
    cmd = shlex.split(out.split("Resume with: ")[1].splitlines()[0])
    assert cmd[:3] == ["python", "train_backbone.py", "--resume"] and "--n_embd=16" in cmd
    run_ok([sys.executable, *cmd[1:]])                                   # the printed command, as printed
    resumed, ck = load_backbone(ckpt)
    assert ck["iter_num"] == 60
    same_weights(straight.state_dict(), resumed.state_dict())


def test_backbone_sigkill_then_resume_matches_straight_run(data_dir, straight, tmp_path):
    rc, out, _ = start_and_stop("train_backbone.py", backbone_args(data_dir, tmp_path / "b"), signal.SIGKILL, "saved")
    assert rc == -signal.SIGKILL
    ckpt = os.path.join(tmp_path / "b", "backbone.pt")
    assert 5 <= torch.load(ckpt, weights_only=True)["iter_num"] < 60
    run_ok([sys.executable, "train_backbone.py", *backbone_args(data_dir, tmp_path / "b", "--resume")])
    same_weights(straight.state_dict(), load_backbone(ckpt)[0].state_dict())


def test_memory_training_killed_mid_run_resumes_to_identical_memory_and_results(data_dir, backbone, tmp_path):
    TM.main(memory_args(data_dir, backbone, tmp_path / "a"))            # uninterrupted
    rc, out, _ = start_and_stop("train_memory.py", memory_args(data_dir, backbone, tmp_path / "b"), signal.SIGKILL,
                                "val fact acc", times=2)              # the 2nd line: the 1st save is done
    assert rc == -signal.SIGKILL
    ckpt = os.path.join(tmp_path / "b", "memory_deltamem.pt")
    assert 2 <= torch.load(ckpt, weights_only=True)["iter_num"] < 30
    r = run_ok([sys.executable, "train_memory.py", *memory_args(data_dir, backbone, tmp_path / "b")])
    assert "resuming from" in r.stdout
    a, b = (torch.load(os.path.join(tmp_path / d, "memory_deltamem.pt"), weights_only=True) for d in "ab")
    assert a["iter_num"] == b["iter_num"] == 30
    same_weights(a["memory"], b["memory"])
    res = [json.loads((tmp_path / d / "results.json").read_text()) for d in "ab"]
    assert res[0]["conditions"] == res[1]["conditions"] and res[0]["per_split"] == res[1]["per_split"]


def test_same_seed_same_results_table(data_dir, backbone, tmp_path):
    tables = []
    for d in ("x", "y"):
        TM.main(memory_args(data_dir, backbone, tmp_path / d, "--max_iters=6", "--baselines=lora"))
        tables.append(json.loads((tmp_path / d / "results.json").read_text())["conditions"])
    assert tables[0] == tables[1]
    assert tables[0]["deltamem"]["trainable_params"] > 0 and "lora" in tables[0]


# ----------------------------------------------------------------------------------------------
# corrupt checkpoints and bad flags: one line naming the file / the flag and the fix
# ----------------------------------------------------------------------------------------------

def one_line_error(script, args):
    """The error `python script args` prints (the CLI turns UserError into one stderr line, see test_cli_*)."""
    with pytest.raises(TB.UserError) as e:
        if script == "train_memory.py":
            TM.main(args)
        else:
            TB.train(TB.parse_config(args, TB.DEFAULTS, TB.PRESETS))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def cli_error(script, args):
    r = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    return lines[0]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign", "other_weights"])
def test_corrupt_memory_checkpoint_is_one_line(data_dir, backbone, tmp_path, damage):
    out = tmp_path / "out"
    out.mkdir()
    ckpt = out / "memory_deltamem.pt"
    gpt, _ = load_backbone(backbone)
    save_memory(DeltaMemGPT(gpt, MemoryConfig()), str(ckpt), iter_num=1, train_config=dict(kind="deltamem"))
    raw = ckpt.read_bytes()
    ckpt.write_bytes({"truncate": raw[:len(raw) // 2], "garbage": b"not a checkpoint",
                      "foreign": raw, "other_weights": raw}[damage])
    if damage == "foreign":
        torch.save({"model": {}}, ckpt)                                  # a loadable file of the wrong kind
    if damage == "other_weights":                                        # the right kind, weights that do not fit
        torch.save(dict(torch.load(ckpt, weights_only=True), memory={}), ckpt)
    msg = one_line_error("train_memory.py", memory_args(data_dir, backbone, out))
    assert str(ckpt) in msg and ("delete it" in msg or "not the right kind" in msg)


def test_memory_checkpoint_of_other_options_is_refused(data_dir, backbone, tmp_path):
    gpt, _ = load_backbone(backbone)
    cfg = TB.parse_config(memory_args(data_dir, backbone, tmp_path, "--rank=4", "--key_conv=1"), TM.DEFAULTS, TM.PRESETS)
    path = tmp_path / "memory_deltamem.pt"
    save_memory(TM.build("deltamem", gpt, cfg), str(path), iter_num=3, train_config=dict(kind="deltamem"))
    cfg8 = dict(cfg, rank=8)
    with pytest.raises(TB.UserError, match=r"memory_deltamem\.pt holds a memory with .*another --out_dir"):
        TM.train_one("deltamem", "deltamem", gpt, None, cfg8, "cpu")
    # a checkpoint from before a config field existed (key_conv) is the same memory: reused, not refused
    ckpt = torch.load(path, weights_only=True)
    del ckpt["mem_config"]["key_conv"]
    ckpt["iter_num"] = cfg["max_iters"]
    torch.save(ckpt, path)
    model = TM.train_one("deltamem", "deltamem", gpt, None, cfg, "cpu")
    assert model.mcfg.key_conv == 1 and model.mcfg.rank == 4


def test_corrupt_default_backbone_checkpoint_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "backbone.pt"
    path.write_bytes(b"\x80\x02truncated")
    monkeypatch.setitem(TM.DEFAULTS, "backbone", str(path))
    with pytest.raises(TB.UserError, match=re.escape(str(path)) + " is corrupt or truncated.*delete it"):
        TM.ensure_backbone(dict(TM.DEFAULTS, backbone=str(path)))


class MakesAFile:
    """Unpickling this calls open(path, "w"): the file appears only if loading ran the file's code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(data_dir, backbone, tmp_path):
    canary = tmp_path / "CANARY"
    evil = tmp_path / "evil.pt"
    torch.save({"memory": {}, "mem_config": {}, "backbone_hash": "0", "note": MakesAFile(str(canary))}, evil)
    eps = tmp_path / "eps.jsonl"
    tasks.save_jsonl(eps, EDGE)
    msg = one_line_error("train_memory.py", memory_args(data_dir, backbone, tmp_path, "--eval_only",
                                                        f"--memory={evil}", f"--episodes={eps}"))
    refusal = re.escape(f"{evil} holds objects that loading would have to run code for (") + r"(io|builtins)\.open\)"
    assert re.search(refusal, msg) and "delete it and train again" in msg
    with pytest.raises(ValueError, match="run code for"):
        load_memory(evil, load_backbone(backbone)[0])
    assert not canary.exists()
    torch.load(evil, weights_only=False)                                 # the file really does run code
    assert canary.exists()


def plain(x):
    """Tensors and plain Python values only: all a checkpoint of this project may hold."""
    if isinstance(x, dict):
        return all(isinstance(k, (str, int)) and plain(v) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return all(plain(v) for v in x)
    return isinstance(x, (torch.Tensor, str, int, float, bool, type(None)))


def test_every_kind_of_checkpoint_the_project_writes_holds_only_plain_values(data_dir, tmp_path):
    args = backbone_args(data_dir, tmp_path, "--max_iters=5", "--block_size=128")
    bb = TB.train(TB.parse_config(args, TB.DEFAULTS, TB.PRESETS))
    TM.main(memory_args(data_dir, bb, tmp_path, "--max_iters=2", "--baselines=lora,hebbian"))
    paths = sorted(tmp_path.glob("*.pt"))
    assert [p.name for p in paths] == ["backbone.pt", "memory_deltamem.pt", "memory_hebbian.pt", "memory_lora.pt"]
    for p in paths:
        ckpt = torch.load(p, weights_only=True)
        assert plain(ckpt) and "optimizer" in ckpt and "history" in ckpt, p.name   # the full training checkpoints


def test_the_summary_and_results_give_each_stages_time_and_the_backbones_speed(data_dir, backbone, tmp_path, capsys):
    bb = TB.train(TB.parse_config(backbone_args(data_dir, tmp_path, "--max_iters=5", "--block_size=128"),
                                  TB.DEFAULTS, TB.PRESETS))
    ms = torch.load(bb, weights_only=True)["ms_per_iter"]
    assert isinstance(ms, float) and ms > 0
    assert f"pretraining speed {ms:.0f} ms/iter" in capsys.readouterr().out    # train_backbone.py's summary
    TM.main(memory_args(data_dir, bb, tmp_path, "--max_iters=2", "--baselines=lora"))
    timing = json.loads((tmp_path / "results.json").read_text())["timing"]
    assert timing["backbone_ms_per_iter"] == ms
    assert list(timing["stages"]) == ["data", "backbone", "deltamem", "lora", "evaluation"]
    assert min(timing["stages"].values()) >= 0 and timing["total"] >= sum(timing["stages"].values())
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("timing: data ") and f"pretraining speed {ms:.0f} ms/iter" in last
    # a backbone saved before the measure existed: its speed is unknown, not guessed
    mem = tmp_path / "memory.pt"
    save_memory(DeltaMemGPT(load_backbone(backbone)[0], MemoryConfig(rank=4)), str(mem))
    TM.main(memory_args(data_dir, backbone, tmp_path / "old", "--eval_only", f"--memory={mem}", "--episode_preset=tiny"))
    timing = json.loads((tmp_path / "old" / "results.json").read_text())["timing"]
    assert timing["backbone_ms_per_iter"] is None and list(timing["stages"]) == ["data", "backbone", "evaluation"]
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith(
        "pretraining speed unknown (compare it with another machine's to scale times)")


@pytest.mark.parametrize("ckpt,says", [
    (dict(model=0, config={}), "'model' is int, expected dict of tensors"),
    (dict(model={"w": 0}, config={}), "'model' is dict, expected dict of tensors"),
    (dict(model={}, config=[]), "'config' is list, expected dict"),
    (dict(model={}, config={"n_layers": 2}), "does not fit this code (GPTConfig.__init__() got an unexpected"),
    (dict(model={"w": torch.zeros(2)}, config={}), "does not fit this code (Error(s) in loading state_dict"),
])
def test_a_backbone_checkpoint_with_wrong_entries_is_one_line(data_dir, tmp_path, ckpt, says):
    path = tmp_path / "x.pt"
    torch.save(ckpt, path)
    msg = one_line_error("train_memory.py", memory_args(data_dir, path, tmp_path))
    assert msg.startswith(str(path)) and says in msg and "pass the right file" in msg


def test_cli_prints_one_line_for_a_backbone_entry_of_the_wrong_type(data_dir, tmp_path):
    torch.save({"model": 0, "config": {}}, tmp_path / "x.pt")            # the file: was a TypeError traceback
    msg = cli_error("train_memory.py", memory_args(data_dir, tmp_path / "x.pt", tmp_path))
    assert f"{tmp_path / 'x.pt'} is not the right kind of checkpoint ('model' is int" in msg


def test_a_memory_checkpoint_with_wrong_entries_is_refused(backbone, tmp_path):
    gpt, _ = load_backbone(backbone)
    good = tmp_path / "good.pt"
    save_memory(DeltaMemGPT(gpt, MemoryConfig(rank=4)), str(good))
    ckpt = torch.load(good, weights_only=True)
    cases = {"'backbone_hash' is int, expected str": dict(ckpt, backbone_hash=5),
             "'mem_config' is str, expected dict": dict(ckpt, mem_config="rank=4"),
             "does not fit this code (MemoryConfig.__init__() got an unexpected": dict(ckpt, mem_config={"ranks": 4}),
             "does not fit this code (Error(s) in loading state_dict": dict(ckpt, memory={})}
    for says, bad in cases.items():
        torch.save(bad, tmp_path / "bad.pt")
        with pytest.raises(ValueError) as e:
            load_memory(tmp_path / "bad.pt", gpt)
        assert str(e.value).startswith(str(tmp_path / "bad.pt")) and says in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("flag,valid", [
    ("--key_dim=0", "a whole number >= 1"), ("--rank=-2", "a whole number >= 1"), ("--heads=0", ">= 1"),
    ("--chunk_size=-1", "whole number >= 1"), ("--chunk_size=0", "whole number >= 1"), ("--max_iters=-5", "must be > 0"),
    ("--batch_size=0", "must be > 0"), ("--learning_rate=0", "must be > 0"), ("--eval_read_window=0", ">= 1"),
    ("--key_conv=0", "whole number >= 1"),
    ("--eval_episodes=0", "must be > 0"), ("--min_lr=1", "[0, --learning_rate]"),
    ("--beta_target=2", "[0, 1]"), ("--write=line", "token, segment"), ("--sides=k", "q, o, qo"),
    ("--update=oja", "delta, gated, deltanet, hebbian"), ("--gates=vector", "rowwise, scalar"), ("--layers=0,x", "e.g. 0,2"),
    ("--baselines=rag", "lora, hebbian"), ("--episode_preset=huge", "tiny, small, medium, long"),
    ("--device=gpu", "auto, cpu, cuda"), ("--key_dim=2.5", "expects a int"), ("--bogus=1", "valid options"),
    ("--bind_tokens=3", "choose 1 or 2"), ("--bind_null=1.5", "a cosine in (0, 1)"), ("--whom_from=ids", "h, tokens"),
    ("--whom_score=e", "h, h+tokens"),
])
def test_memory_flags_are_range_checked_before_any_work(flag, valid, tmp_path):
    # a nonexistent backbone and data dir: the flag must be refused before either is looked at
    msg = one_line_error("train_memory.py", [f"--out_dir={tmp_path}", "--data_dir=/nonexistent",
                                             "--backbone=/nonexistent.pt", flag])
    assert flag.split("=")[0] in msg and valid in msg


def test_cli_prints_one_line_for_a_bad_flag_and_a_corrupt_checkpoint(data_dir, backbone, tmp_path):
    assert "--key_dim=0 is out of range" in cli_error("train_memory.py", ["--key_dim=0", "--data_dir=/nonexistent"])
    (tmp_path / "memory_deltamem.pt").write_bytes(b"half a checkpoint")
    msg = cli_error("train_memory.py", memory_args(data_dir, backbone, tmp_path))
    assert f"{tmp_path / 'memory_deltamem.pt'} is corrupt or truncated" in msg


@pytest.mark.parametrize("flag,valid", [("--rank=17", "use 1..16"), ("--layers=1", "layers 0..0"),
                                        ("--general_len=129", "block_size=128: use at most that, or 0")])
def test_memory_flags_that_depend_on_the_backbone(data_dir, backbone, tmp_path, flag, valid):
    msg = one_line_error("train_memory.py", memory_args(data_dir, backbone, tmp_path, flag))
    assert flag.split("=")[0] in msg and valid in msg
    assert not os.path.exists(tmp_path / "memory_deltamem.pt")          # refused before training


def test_questions_longer_than_the_window_are_refused_in_one_line(data_dir, backbone, tmp_path):
    msg = one_line_error("train_memory.py", memory_args(data_dir, backbone, tmp_path, "--read_window=200"))
    assert "does not fit the backbone's block_size=128" in msg and "--read_window" in msg


@pytest.mark.parametrize("flag,valid", [
    ("--dropout=1.5", "[0, 1)"), ("--warmup_iters=-1", ">= 0"), ("--beta2=1", "[0, 1)"), ("--grad_clip=0", "> 0"),
    ("--min_lr=0.5", "[0, --learning_rate]"), ("--device=tpu", "auto, cpu, cuda"), ("--n_head=0", "must be > 0"),
])
def test_backbone_flags_are_range_checked(flag, valid, tmp_path):
    # a nonexistent data dir: a flag that slipped through fails on the data, never trains the default backbone
    msg = one_line_error("train_backbone.py", [f"--out_dir={tmp_path}", "--data_dir=/nonexistent", flag])
    assert flag.split("=")[0] in msg and valid in msg


# ----------------------------------------------------------------------------------------------
# a mistake in a file the command names is refused before any data is prepared or any model trained
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def clone(tmp_path):
    """A folder holding only the repository's code, as a fresh clone does: no data/pydoc, no out/."""
    (tmp_path / "data").mkdir()
    for pattern in ("*.py", "data/*.py"):
        for f in glob.glob(os.path.join(ROOT, pattern)):
            shutil.copy(f, tmp_path / os.path.relpath(f, ROOT))
    return tmp_path


@pytest.fixture(scope="module")
def memory_file(gpt, tmp_path_factory):
    """A memory checkpoint with every entry right (for another backbone: that needs the backbone to see)."""
    path = tmp_path_factory.mktemp("memory") / "memory.pt"
    save_memory(DeltaMemGPT(gpt, MemoryConfig()), str(path))
    return path


def refused_at_once(folder, script, *args, stdin=None):
    """`python script args` in folder: exit 2 with one line `error: ...`, having printed nothing else,
    prepared no data and made no out/ (the 30 s is a loose bound: preparing and pretraining take minutes)."""
    t0 = time.time()
    r = subprocess.run([sys.executable, script, *args], cwd=folder, env=ENV, input=stdin, capture_output=True,
                       text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert r.stdout == "" and not (folder / "data" / "pydoc").exists() and not (folder / "out").exists()
    assert time.time() - t0 < 30
    return lines[0]


def test_a_missing_memory_is_refused_before_any_work(clone):
    msg = refused_at_once(clone, "train_memory.py", "--eval_only", "--memory=none.pt", "--episodes=bad.jsonl")
    assert "memory checkpoint none.pt not found" in msg


def test_eval_only_without_a_memory_is_refused_before_any_work(clone):
    assert "--eval_only needs --memory=CKPT" in refused_at_once(clone, "train_memory.py", "--eval_only")


def test_a_missing_episode_file_is_refused_before_any_work(clone, memory_file):
    msg = refused_at_once(clone, "train_memory.py", "--eval_only", f"--memory={memory_file}", "--episodes=none.jsonl")
    assert "none.jsonl: cannot read episode file" in msg


def test_a_malformed_episode_file_is_refused_before_any_work(clone, memory_file):
    (clone / "eps.jsonl").write_text('{"sessions": [["a"]], "questions": [{"q": "x?", "a": "y"}]}\n')
    msg = refused_at_once(clone, "train_memory.py", "--eval_only", f"--memory={memory_file}", "--episodes=eps.jsonl")
    assert "eps.jsonl:1:" in msg and "'family'" in msg


def test_evaluating_without_the_memorys_backbone_is_refused_before_any_work(clone, memory_file):
    # the default backbone is pretrained when missing, but a memory only works on the one it was trained on
    msg = refused_at_once(clone, "train_memory.py", "--eval_only", f"--memory={memory_file}")
    assert "backbone checkpoint out/backbone.pt not found: pass the one the memory was trained with" in msg


def test_a_missing_demo_file_is_refused_before_any_work(clone):
    assert "--demo=none.txt: cannot read it" in refused_at_once(clone, "train_memory.py", "--demo=none.txt")


@pytest.mark.parametrize("text,says", [("\n\n---\nwhat?\n", "demo.txt has no chat lines"),
                                       ("Mia: Alice lives in Oslo.\n---\nWhere?\n", "out/memory_deltamem.pt not found")])
def test_bad_demo_input_is_refused_before_any_work(clone, text, says):
    (clone / "demo.txt").write_text(text)
    assert says in refused_at_once(clone, "train_memory.py", "--demo=demo.txt")


def test_a_missing_backbone_given_is_refused_before_any_work(clone):
    msg = refused_at_once(clone, "train_memory.py", "--backbone=none.pt")
    assert "backbone checkpoint none.pt not found" in msg


def test_a_memory_that_would_run_code_is_refused_before_any_work(clone):
    torch.save({"memory": {}, "mem_config": {}, "backbone_hash": "0", "note": MakesAFile(str(clone / "CANARY"))},
               clone / "evil.pt")
    msg = refused_at_once(clone, "train_memory.py", "--eval_only", "--memory=evil.pt")
    assert "evil.pt holds objects that loading would have to run code for" in msg
    assert not (clone / "CANARY").exists()


@pytest.mark.parametrize("flag,ckpt,says", [
    ("--memory", dict(memory=0, mem_config={}, backbone_hash="0"), "'memory' is int, expected dict of tensors"),
    ("--memory", dict(model={}, config={}), "missing memory, mem_config, backbone_hash"),
    ("--memory", dict(memory={}, mem_config={"ranks": 4}, backbone_hash="0"), "does not fit this code"),
    ("--backbone", dict(model={}, config={"n_layers": 2}), "does not fit this code"),
    ("--backbone", dict(model={}), "missing config"),
])
def test_a_checkpoint_with_wrong_entries_is_refused_before_any_work(clone, flag, ckpt, says):
    torch.save(ckpt, clone / "x.pt")
    msg = refused_at_once(clone, "train_memory.py", f"{flag}=x.pt", *(["--eval_only"] if flag == "--memory" else []))
    assert msg.startswith("error: x.pt ") and says in msg


def test_a_corrupt_memory_to_resume_is_refused_before_any_work(clone):
    (clone / "run").mkdir()
    (clone / "run" / "memory_lora.pt").write_bytes(b"half a checkpoint")     # the second memory the job trains
    msg = refused_at_once(clone, "train_memory.py", "--out_dir=run")
    assert "run/memory_lora.pt is corrupt or truncated" in msg


def test_resuming_a_backbone_that_is_not_there_is_refused_before_any_work(clone):
    msg = refused_at_once(clone, "train_backbone.py", "--resume")
    assert "--resume: no checkpoint at out/backbone.pt" in msg


# ----------------------------------------------------------------------------------------------
# NaN loss: stop with the iteration and a hint, keep the last good checkpoint
# ----------------------------------------------------------------------------------------------

def test_nan_loss_stops_memory_training_and_keeps_last_checkpoint(data_dir, backbone, tmp_path, monkeypatch):
    from data.prepare import load_tokenizer
    gpt, _ = load_backbone(backbone)
    cfg = TB.parse_config(memory_args(data_dir, backbone, tmp_path, "--max_iters=6"), TM.DEFAULTS, TM.PRESETS)
    real, calls = TM.episode_loss, []

    def nan_at_5th(*a, **kw):
        calls.append(1)
        loss = real(*a, **kw)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(TM, "episode_loss", nan_at_5th)
    with pytest.raises(TB.UserError, match=r"loss became nan at iteration 4; the last good checkpoint is .*"
                                           r"memory_deltamem\.pt\. Try a lower --learning_rate"):
        TM.train_one("deltamem", "deltamem", gpt, load_tokenizer(data_dir), cfg, "cpu")
    assert torch.load(tmp_path / "memory_deltamem.pt", weights_only=True)["iter_num"] == 4  # saved at log 2, 4


# ----------------------------------------------------------------------------------------------
# hand-written episodes
# ----------------------------------------------------------------------------------------------

LONG_LINE = "Mia: " + "the weather was very nice and " * 100 + "Alice lives in Paris."
EDGE = [
    Episode([["Session 1 (Day 1)", "", "Mia: Zoë lives in Zürich."], [""]],                  # blank lines
            [Question("Where does Zoë live?", "Zürich", "single_hop")]),
    Episode([[LONG_LINE]], [Question("Where does Alice live?", "Paris", "single_hop")]),     # a very long line
    Episode([["Łukasz: 你好, Søren!"]], [Question("Who greets Søren?", "Łukasz", "single_hop")]),
    Episode([["Mia: the code is X-17-alpha-omega-42-zeta."]],                                # a many-token answer
            [Question("What is the code?", "X-17-alpha-omega-42-zeta", "single_hop")]),
]


def test_edge_episodes_round_trip_and_collate_into_windows(enc, tmp_path):
    path = tmp_path / "edge.jsonl"
    tasks.save_jsonl(path, EDGE)
    eps = tasks.load_jsonl(path)
    assert eps == EDGE
    window = 32
    b = tasks.collate_episodes(enc, eps, window, enc.eot_token)
    assert b["hist"].shape[-1] <= window
    for e, ep in enumerate(eps):                                         # the windows hold the whole history
        toks = b["hist"][e][b["mask"][e]].tolist()
        assert enc.decode(toks) == tasks.render_history(ep)
    # the long answer is the target, token for token
    y = b["qy"][3, 0]
    assert enc.decode(y[y >= 0].tolist()) == " X-17-alpha-omega-42-zeta\n"


class Oracle(torch.nn.Module):
    """A fake backbone that predicts, at every position, the next token of one fixed text."""

    def __init__(self, enc, text, block_size=128):
        super().__init__()
        self.seq, self.V = enc.encode_ordinary(text), enc.n_vocab
        self.config = GPTConfig(vocab_size=self.V, block_size=block_size)

    def forward(self, idx, cache=None):
        B, T = idx.shape
        past = cache.get("past", 0) if cache is not None else 0          # decoding: tokens already seen
        if cache is not None:
            cache["past"] = past + T
        assert past + T <= self.config.block_size
        logits = torch.zeros(B, T, self.V)                               # (B, T, V)
        for t in range(past, past + T):
            logits[:, t - past, self.seq[min(t + 1, len(self.seq) - 1)]] = 1.0
        return logits, None


def test_an_answer_of_many_tokens_can_be_decoded_in_full(enc):
    ep = EDGE[3]
    q = ep.questions[0]
    oracle = Oracle(enc, f"Q: {q.q}\nA: {q.a}\n")
    assert len(enc.encode_ordinary(f" {q.a}\n")) > 6                     # more than the old fixed 6 new tokens
    preds, hist = TM.run_condition(enc, [ep], lambda e, qq: [], gpt=oracle)
    assert preds == [" " + q.a] and hist == 0
    assert TM.score_condition(preds, [ep])["macro_em"] == 1.0


def test_an_answer_longer_than_the_block_is_refused(enc):
    ep = Episode([["x"]], [Question("?", "y" * 200, "single_hop")])
    with pytest.raises(TB.UserError, match="use shorter answers"):
        TM.run_condition(enc, [ep], lambda e, q: [], gpt=Oracle(enc, "Q: ?\nA:"))


def test_eval_only_on_hand_written_episodes(data_dir, backbone, tmp_path):
    gpt, _ = load_backbone(backbone)
    mem = tmp_path / "memory.pt"
    save_memory(DeltaMemGPT(gpt, MemoryConfig(rank=4)), str(mem))
    eps = tmp_path / "edge.jsonl"
    tasks.save_jsonl(eps, EDGE + [Episode([["a"]], [Question("Q " * 300, "a", "single_hop")])])  # question > block
    TM.main(memory_args(data_dir, backbone, tmp_path, "--eval_only", f"--memory={mem}", f"--episodes={eps}"))
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["per_split"]) == {"file"}
    for name, r in res["conditions"].items():
        assert r["n_questions"] == 5 and 0 <= r["macro_em"] <= 1 and r["history_tokens_in_context"] >= 0, name
    assert res["conditions"]["no_history"]["history_tokens_in_context"] == 0
    # a file with a missing field is refused in one line that names the file and line
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sessions": [["a"]], "questions": [{"q": "x?", "a": "y"}]}\n', encoding="utf-8")
    msg = cli_error("train_memory.py", memory_args(data_dir, backbone, tmp_path, "--eval_only",
                                                   f"--memory={mem}", f"--episodes={bad}"))
    assert f"{bad}:1:" in msg and "'family'" in msg


def test_eval_only_without_a_file_scores_the_held_out_splits_of_the_preset(data_dir, backbone, tmp_path):
    gpt, _ = load_backbone(backbone)
    mem = tmp_path / "memory.pt"
    save_memory(DeltaMemGPT(gpt, MemoryConfig(rank=4)), str(mem))
    TM.main(memory_args(data_dir, backbone, tmp_path, "--eval_only", f"--memory={mem}", "--episode_preset=tiny"))
    res = json.loads((tmp_path / "results.json").read_text())
    assert list(res["per_split"]) == TM.EVAL_SPLITS                      # generated, not read from a file
    want = sum(len(ep.questions) for i, s in enumerate(TM.EVAL_SPLITS)     # one episode per split, as drawn
               for ep in tasks.make_episodes(1, seed=10_000 + i, task="msqa", preset="tiny", split=s))
    assert res["conditions"]["no_history"]["n_questions"] == want
    msg = cli_error("train_memory.py", memory_args(data_dir, backbone, tmp_path, "--eval_only"))
    assert "--eval_only needs --memory=CKPT" in msg

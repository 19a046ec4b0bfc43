"""Tokenised batches: labels only on answer tokens, windows never split a line, read contexts exact."""

from data import tasks
from nanodeltamem import IGNORE_INDEX


def test_labels_sit_only_on_answer_tokens(enc):
    eps = tasks.make_episodes(4, seed=3, preset="tiny")
    b = tasks.collate_episodes(enc, eps, window=128, pad_id=256)
    for e, ep in enumerate(eps):
        for i, q in enumerate(ep.questions):
            y = b["qy"][e, i]
            labelled = y[y != IGNORE_INDEX].tolist()
            assert enc.decode(labelled) == f" {q.a}\n"                   # exactly the answer + newline
            x = b["qx"][e, i].tolist()
            first = int((y != IGNORE_INDEX).nonzero()[0])
            assert enc.decode(x[:first + 1]) == f"Q: {q.q}\nA:"          # the prompt is the question only
        for i in range(len(ep.questions), b["qy"].size(1)):             # padding questions: no loss
            assert (b["qy"][e, i] == IGNORE_INDEX).all()


def test_history_windows_hold_whole_lines_in_order(enc):
    eps = tasks.make_episodes(3, seed=5, preset="medium")
    window = 96
    b = tasks.collate_episodes(enc, eps, window=window, pad_id=256)
    assert b["hist"].size(-1) <= window
    for e, ep in enumerate(eps):
        text = ""
        for w in range(b["hist"].size(1)):
            toks = b["hist"][e, w][b["mask"][e, w]].tolist()
            seg = b["seg"][e, w][b["mask"][e, w]].tolist()
            assert seg == sorted(seg) and (not seg or seg[0] == 0)       # lines numbered from 0 per window
            lines = [enc.decode([t for t, s in zip(toks, seg) if s == j]) for j in sorted(set(seg))]
            assert all(line.endswith("\n") for line in lines)           # a window never splits a line
            text += "".join(lines)
        assert text == tasks.render_history(ep)                          # nothing lost, nothing reordered
        sessions = [s for s in ep.sessions]
        assert b["mask"][e].any(-1).sum() >= len(sessions)               # at least one window per session


def test_read_window_puts_exactly_the_last_history_tokens_before_the_question(enc):
    ep = tasks.make_episodes(1, seed=8, preset="small")[0]
    b = tasks.collate_episodes(enc, [ep], window=256, pad_id=256, read_window=40)
    hist = enc.encode_ordinary(tasks.render_history(ep))
    q = ep.questions[0]
    x = b["qx"][0, 0].tolist()
    prompt = enc.encode_ordinary(f"Q: {q.q}\nA:")
    assert x[:40] == hist[-40:] and x[40:40 + len(prompt)] == prompt

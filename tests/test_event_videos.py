"""event_videos.py: the synthetic dataset is deterministic, follows the E.T.Instruct / E.T.Bench
schemas, and its frames show exactly the annotated events."""
import re

import numpy as np

import data
import event_videos
import video


def test_synthetic_is_deterministic(synthetic, tmp_path):
    event_videos.make_synthetic(tmp_path / "again", n_train=6, n_test=4, seed=0, workers=1)
    event_videos.make_synthetic(tmp_path / "other", n_train=6, n_test=4, seed=4, workers=2)
    for name in ("train.json", "test.json"):
        assert (synthetic / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
        assert (synthetic / name).read_bytes() != (tmp_path / "other" / name).read_bytes()


def test_synthetic_annotations_follow_the_schemas(synthetic):
    train, test = data.load_records(synthetic / "train.json"), data.load_records(synthetic / "test.json")
    assert len(test) == 4 * len(event_videos.SYN_TASKS)  # test: one record per task and video
    assert {r["task"] for r in train} == {r["task"] for r in test} == set(event_videos.SYN_TASKS)
    for v in {r["video"] for r in train}:  # train: the same, plus a tvg question for every other event
        recs = [r for r in train if r["video"] == v]
        events = data.to_evidence(next(r for r in recs if r["task"] == "dvc"))["spans"]
        assert len(recs) == len(event_videos.SYN_TASKS) + len(events) - 1
        assert sorted(data.to_evidence(r)["spans"][0] for r in recs if r["task"] == "tvg") == sorted(events)
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in train)
    assert [r["idx"] for r in test] == list(range(len(test))) and all(r["version"] == 1.0 for r in test)
    for r in test:  # tgt shapes as E.T.Bench has them
        flat = r["task"] in data.ONE_SPAN_TASKS
        assert (isinstance(r["tgt"][0], float)) == flat
        if r["task"] in data.CAPTION_TASKS:
            assert len(r["g"]) == len(r["tgt"])
    # some video has two events of one action class, so tal has several spans
    assert any(len(data.to_evidence(r)["spans"]) > 1 for r in train + test if r["task"] == "tal")
    for r in train:  # the txt answers round-trip through the evidence format (points as "p - p")
        ev = data.to_evidence(r)
        text = data.answer_text(data.render(ev["response"], ev["spans"] * 2))
        gpt = r["conversations"][1]["value"]
        if r["task"] == "vhd":
            p = re.search(r"at ([\d.]+) seconds", gpt).group(1)
            gpt = gpt.replace(p, f"{p} - {p}")
        assert text == gpt


def test_synthetic_frames_show_the_annotated_events(synthetic):
    """For every second, the sampled frame contains the colour of exactly the events annotated at it."""
    for r in data.load_records(synthetic / "test.json"):
        if r["task"] != "dvc":
            continue
        frames = video.sample_frames(synthetic / "videos" / r["video"], size=112)
        assert frames.shape[0] == int(r["duration"])
        f = frames.permute(0, 2, 3, 1).numpy().astype(int)
        for (s, e), cap in zip(r["tgt"], r["g"]):
            colour = np.array(event_videos.SYN_COLOURS[cap.split()[1]])
            shades = (colour, colour // 2) if cap.endswith("blinks") else (colour,)  # blinking: dim on odd seconds
            for k in range(len(f)):
                n = int(np.any([np.abs(f[k] - c).max(-1) < 40 for c in shades], axis=0).sum())
                assert (n > 40) == (s <= k <= e), (r["video"], cap, k, n)

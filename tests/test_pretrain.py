"""pretrain.py and the starting point of tiny SFT runs: the contrastive objective against a hand
computation, the pretraining set, a short pretraining run that learns, and the starting point
built once and then reused."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import config
import data
import event_videos
import model
import pretrain
import train


def test_itc_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    N, Q, d, temp = 4, 3, 5, 0.1
    img = F.normalize(torch.randn(N, Q, d), dim=-1)
    txt = F.normalize(torch.randn(N, d), dim=-1)
    labels = [0, 1, 0, 2]  # frames 0 and 2 show the same thing: each is a positive of the other's text
    same = torch.tensor([[a == b for b in labels] for a in labels])
    got = pretrain.itc_loss(img, txt, same, temp)
    s = [[max(sum(img[i, q, k].item() * txt[j, k].item() for k in range(d)) for q in range(Q)) / temp
          for j in range(N)] for i in range(N)]
    want = []
    for i in range(N):
        pos = [j for j in range(N) if labels[j] == labels[i]]
        row = math.log(sum(math.exp(x) for x in s[i]))
        col = math.log(sum(math.exp(s[j][i]) for j in range(N)))
        i2t = -sum(s[i][j] - row for j in pos) / len(pos)
        t2i = -sum(s[j][i] - col for j in pos) / len(pos)
        want.append((i2t + t2i) / 2)
    assert got.shape == (N,)
    assert got.tolist() == pytest.approx(want, rel=1e-5)
    # a perfect alignment (each frame's queries point at its own text) approaches the floor log(positives)
    sharp = pretrain.itc_loss(txt[:, None].expand(N, Q, d).clone(), txt, torch.eye(N, dtype=torch.bool), 0.01)
    assert (sharp < 1e-3).all()


def test_itm_loss_matches_a_hand_computation():
    torch.manual_seed(1)
    logits = torch.randn(3, 4, 2)
    match = torch.tensor([True, False, True])
    want = []
    for i in range(3):
        a, b = (sum(logits[i, q, c].item() for q in range(4)) / 4 for c in (0, 1))
        want.append(math.log(math.exp(a) + math.exp(b)) - (b if match[i] else a))
    assert pretrain.itm_loss(logits, match).tolist() == pytest.approx(want, rel=1e-5)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    event_videos.make_pretrain(root, n_clips=4, workers=2)
    return root


def test_pretraining_set_is_words_only_and_its_frames_are_labelled(clips, synthetic):
    recs = data.load_records(clips / event_videos.PRETRAIN)
    assert {r["task"] for r in recs} == set(data.PLAIN_TASKS)
    for r in recs:
        ev = data.to_evidence(r)
        assert ev["spans"] == [] and data.EVI not in ev["response"] and data.EVI_END not in ev["response"]
        assert ev["response"] == r["conversations"][1]["value"]  # the answer, trained as it is
        assert data.arrange(ev)["evi_frames"] == []
    rows = json.loads((clips / event_videos.PRETRAIN_FRAMES).read_text())
    assert [r["video"] for r in rows] == sorted({r["video"] for r in recs})
    for row in rows:
        caption = next(r for r in recs if r["video"] == row["video"] and r["task"] == "caption")
        said = caption["conversations"][1]["value"]
        assert len(row["frames"]) == len(row["events"]) == row["duration"] + 1
        shown = [t for t in dict.fromkeys(row["frames"]) if t != event_videos.NO_SHAPE]
        assert shown and all(t in said for t in shown)  # "a red circle" in "a red circle blinks."
        for t, c in zip(row["frames"], row["events"]):  # a frame's event is the one it shows
            assert (c == "") == (t == event_videos.NO_SHAPE) and (not c or c.startswith(t + " ") and c in said)
    # its clips are other scenes than the train and test videos'
    train_videos = {r["video"] for r in data.load_records(synthetic / "train.json")}
    assert not train_videos & {r["video"] for r in rows}
    # a plain task with a time is refused by name
    bad = {**recs[0], "conversations": [recs[0]["conversations"][0], {"from": "gpt", "value": "at 1.0 - 2.0 seconds."}]}
    with pytest.raises(data.BadRecord, match="words alone"):
        data.to_evidence(bad)


def test_a_bad_frames_file_is_named(clips, tmp_path):
    rows = json.loads((clips / event_videos.PRETRAIN_FRAMES).read_text())
    cfg = config.PRESETS["tiny"]
    for bad, said in (({**rows[0], "video": "../x.mp4"}, "record 1: field 'video'"),
                      ({**rows[0], "frames": ["a red circle"]}, "record 1: field 'frames'"),
                      ({**rows[0], "video": "gone.mp4"}, "record 1: .*gone.mp4")):
        path = tmp_path / "frames.json"
        path.write_text(json.dumps([rows[0], bad]))
        with pytest.raises(ValueError, match=f"frames.json: {said}"):
            pretrain.FrameTexts(path, clips / "videos", cfg)


def test_a_short_pretraining_run_lowers_both_losses_and_sft_starts_from_it(clips, synthetic, tmp_path):
    cfg = config.configure(config.PRESETS["tiny"], ["itc_batch=16", "itc_epochs=6"])
    torch.manual_seed(0)
    m = model.build_model(cfg)
    losses = pretrain.align_encoder(m, clips / event_videos.PRETRAIN_FRAMES, clips / "videos", cfg, 0, train.lr_factor)
    assert len(losses) >= 30
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 - 0.3
    # the whole stage: phase 1, then captions and questions with the ViT frozen
    train.main(["--stage", "pretrain", "--data", str(clips / event_videos.PRETRAIN), "--videos", str(clips / "videos"),
                "--out", str(tmp_path), "--workers", "0", "--max-steps", "40", "--log-every", "5",
                "--set", "itc_epochs=1", "batch_size=2"])
    rows = [json.loads(x) for x in (tmp_path / train.START / "pretrain" / "log.jsonl").read_text().splitlines()]
    sft = [r["sft"] for r in rows if "sft" in r]
    assert sft[-1] < sft[0] - 1.0 and rows[-1]["summary"]
    start = checkpoint.checkpoints(tmp_path / train.START / "pretrain")[-1]
    saved = checkpoint.from_checkpoint(start)
    vit = dict(saved.named_parameters())["vision.encoder.layers.0.self_attn.qkv.weight"]
    fresh = model.build_model(cfg)
    assert not torch.equal(vit, dict(fresh.named_parameters())["vision.encoder.layers.0.self_attn.qkv.weight"])
    # SFT from it: its weights (the ViT stays frozen), its LoRA merged into the LLM and a fresh one added
    train.main(["--stage", "sft", "--init", str(start), "--data", str(synthetic / "tvg.json"), "--videos",
                str(synthetic / "videos"), "--out", str(tmp_path), "--workers", "0", "--max-steps", "1"])
    after = checkpoint.from_checkpoint(checkpoint.checkpoints(tmp_path / "default" / "sft")[-1])
    params = dict(after.named_parameters())
    assert torch.equal(params["vision.encoder.layers.0.self_attn.qkv.weight"], vit)
    base = "llm.base_model.model.model.layers.0.self_attn.o_proj"
    unmerged = dict(saved.named_parameters())[base + ".base_layer.weight"].clone()
    merged = saved.llm.merge_and_unload().model.layers[0].self_attn.o_proj.weight
    assert torch.equal(params[base + ".base_layer.weight"], merged)
    assert not torch.equal(merged, unmerged)  # its LoRA had trained


def test_the_starting_point_is_built_once_then_reused(tmp_path, monkeypatch):
    calls = []

    def fake_train(args, *dist):  # the stage itself is tested above; here: which runs happen, from what
        calls.append((args.stage, args.name, args.init))
        if args.stage == "pretrain":
            torch.manual_seed(0)
            m = model.build_model(config.PRESETS["tiny"])
            checkpoint.save_checkpoint(tmp_path / args.name / "pretrain", 7, m, {"step": 7}, True, 1)

    monkeypatch.setattr(train, "train", fake_train)
    start = str(tmp_path / train.START / "pretrain" / "step_000007")
    with pytest.raises(SystemExit, match="lr_lora=nan is outside"):  # said before minutes go into the start
        train.main(["--stage", "sft", "--out", str(tmp_path), "--set", "lr_lora=nan"])
    assert calls == []
    train.main(["--stage", "sft", "--out", str(tmp_path)])
    assert calls == [("pretrain", train.START, None), ("sft", "default", start)]
    calls.clear()
    train.main(["--stage", "sft", "--out", str(tmp_path), "--name", "again"])
    assert calls == [("sft", "again", start)]  # reused, not built again
    calls.clear()
    train.main(["--stage", "sft", "--out", str(tmp_path), "--name", "random", "--init", "none"])
    assert calls == [("sft", "random", None)]
    calls.clear()
    train.main(["--stage", "pretrain", "--out", str(tmp_path)])  # its default name is the starting point's
    assert calls == [("pretrain", train.START, None)]

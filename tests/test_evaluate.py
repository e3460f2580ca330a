"""evaluate.py: the inference path on the tiny model (batched and one-by-one generation, a scorable
predictions file, one video with its evidence plot). The scorers are tested in test_scoring.py."""
import dataclasses
import json

import pytest
import torch

import checkpoint
import config
import evaluate as ev
import model
import video
from evidence import EVI
from scoring import etbench


@pytest.fixture(scope="module")
def tiny_ckpt(synthetic, tmp_path_factory):
    """A random tiny model saved as a checkpoint, and the records of the first synthetic test video."""
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    m = model.build_model(config.PRESETS["tiny"])
    (root / "ckpt").mkdir()
    checkpoint.save_weights(m, root / "ckpt", full=True)
    first = [r for r in json.loads((synthetic / "test.json").read_text()) if r["video"] == "test_0000.mp4"]
    (root / "test.json").write_text(json.dumps(first))
    return root / "ckpt", root / "test.json", synthetic / "videos"


def test_inference_writes_a_scorable_predictions_file(tiny_ckpt, capsys):
    ckpt, test, videos = tiny_ckpt
    ev.main(["--ckpt", str(ckpt), "--data", str(test), "--videos", str(videos),
             "--max-new-tokens", "12", "--batch-size", "4"])
    results = checkpoint.results_dir(ckpt)
    assert results.parent.parent == ckpt.parent  # beside the checkpoint, never inside it
    preds = etbench.load_predictions(results / "predictions_test_max12.json")  # named by the data and the settings
    truth = json.loads(test.read_text())
    assert [p["idx"] for p in preds] == [t["idx"] for t in truth]
    assert all(isinstance(p["a"], str) for p in preds)
    metrics = json.loads((results / "metrics_test_max12.json").read_text())
    assert set(metrics) == {r["task"] for r in truth} and metrics["tvg"]["synthetic"]["Total"] == 1
    assert "TVG" in capsys.readouterr().out
    # the metrics file is the score of the predictions file written next to it
    assert metrics["tvg"] == etbench.score_etbench([p for p in preds if p["task"] == "tvg"])["tvg"]
    # batched generation gives what one-by-one generation gives
    one = ev.predict(checkpoint.from_checkpoint(ckpt).eval(), truth[:2], videos, batch_size=1,
                     max_new_tokens=12, progress=False)
    assert [p["a"] for p in one] == [p["a"] for p in preds[:2]]
    # the release's protocol: seeded sampling gives the same answers at any batch size
    m = checkpoint.from_checkpoint(ckpt).eval()
    rel = [ev.predict(m, truth[:3], videos, batch_size=bs, decoding_name="release", max_new_tokens=12, seed=1,
                      progress=False) for bs in (1, 3)]
    assert [p["a"] for p in rel[0]] == [p["a"] for p in rel[1]]
    # records too long for max_len get an empty answer (Failed when scored), reported, never dropped
    short = checkpoint.from_checkpoint(ckpt).eval()
    short.cfg = dataclasses.replace(short.cfg, max_len=40)
    cut = ev.predict(short, truth, videos, max_new_tokens=4, progress=False)
    assert len(cut) == len(truth) and all(p["a"] == "" for p in cut)
    assert "too long for max_len=40" in capsys.readouterr().err
    assert etbench.score_etbench([p for p in cut if p["task"] == "tvg"])["tvg"]["synthetic"]["Failed"] == 1


def test_one_video_answer(tiny_ckpt, capsys):
    ckpt, _, videos = tiny_ckpt
    clip = videos / "test_0000.mp4"
    q = "What happens after 2.0 - 4.0 seconds? Answer with <start time> - <end time>."
    ev.main(["--ckpt", str(ckpt), "--video", str(clip), "--question", q, "--max-new-tokens", "16"])
    out = capsys.readouterr().out.splitlines()
    m = checkpoint.from_checkpoint(ckpt).eval()
    answer = ev.answer_video(m, ev.video_question(clip, q, m.cfg, m.tokenizer, 16), max_new_tokens=16)
    assert out[0] == answer["text"].splitlines()[0]
    n = len(video.sample_frames(clip, m.cfg.fps, m.cfg.image_size))
    assert answer["frames"] == n and all(len(p) == n for p in answer["probs"])
    assert len(answer["probs"]) == len(answer["spans"]) == answer["tokens"].count(m.token_id[EVI])
    for k, (s, e) in enumerate(answer["spans"]):
        assert f"<evi> {k + 1}: {s:.1f} - {e:.1f} s" in out[-len(answer["spans"]) + k]


def test_plot_draws_a_png(tmp_path):
    """One panel per <evi>, 8 x 1.8 inches each at 100 dpi."""
    import matplotlib.image
    fake = {"text": "0.0 - 3.0</evi>...", "spans": [[0.0, 3.0], [5.0, 5.0]], "probs": [[0.9] * 4 + [0.1] * 6, [0.2] * 10]}
    ev.plot_evidence(fake, 1.0, tmp_path / "sim.png")
    assert matplotlib.image.imread(tmp_path / "sim.png").shape[:2] == (360, 800)
    assert (tmp_path / "sim.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_counts_the_answers_that_stopped_early(tiny_ckpt, monkeypatch, capsys):
    """Answers that end with <|end|> are not counted; those cut by the token limit or the context are."""
    ckpt, test, videos = tiny_ckpt
    truth = json.loads(test.read_text())[:3]
    reasons = iter(["end", "max_new_tokens", "context"])
    monkeypatch.setattr(ev.decoding, "generate", lambda m, batch, *a, **k: [
        {"text": f"answer {i}", "stopped": next(reasons)} for i in range(len(batch["input_ids"]))])
    preds = ev.predict(checkpoint.from_checkpoint(ckpt).eval(), truth, videos, progress=False)
    assert sorted(p["a"] for p in preds) == ["answer 0", "answer 1", "answer 2"]  # batches go task by task
    assert "2 answers stopped before <|end|>: 1 at 256 new tokens, 1 at the end of the LLM's context" \
        in capsys.readouterr().err

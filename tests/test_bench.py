"""measure/: bench.py's comparisons are only fair if the alternatives do the same work: the seek-per-sample
sampler must pick exactly the frames of video.sample_frames."""
import json
import re

import pytest
import torch

import batches
import config
import data
import model
import video
from measure import REPO, decode, gpu, plots, runs, steps
from support import released
from test_video import index_clip, read_index


@pytest.mark.parametrize("video_fps,fps,n", [(7, 1.0, 60), (25, 1.0, 300), (3, 0.5, 40), (2, 4.0, 30)])
def test_seek_sampler_takes_the_frames_of_the_sequential_one(tmp_path, video_fps, fps, n):
    index_clip(tmp_path / "c.mp4", n, video_fps)
    ref = video.sample_frames(tmp_path / "c.mp4", fps=fps, size=48)
    seek = decode.sample_frames_seek(tmp_path / "c.mp4", fps=fps, size=48)
    assert [read_index(f) for f in seek] == [read_index(f) for f in ref]
    assert torch.equal(seek, ref)


def test_make_clip_streams_frames_and_is_reused(tmp_path):
    clip = decode.make_clip(tmp_path / "m.mp4", 3, 64, 48, 10)
    frames = video.sample_frames(clip, fps=1.0, size=48)
    assert frames.shape == (3, 3, 48, 48)  # t = 0, 1, 2 s of a 3-s clip
    mtime = clip.stat().st_mtime_ns
    assert decode.make_clip(tmp_path / "m.mp4", 3, 64, 48, 10).stat().st_mtime_ns == mtime


def test_projected_hours_by_hand():
    # 164,000 samples, SFT 2.0 s + FPO 2.5 s per step of 8 samples, 4 GPUs: 164000 / 8 * 4.5 / 4 s = 6.40625 h
    assert steps.projected_hours(164_000, 2.0, 2.5, 8, 4) == pytest.approx(6.40625)
    assert steps.projected_hours(164_000, 2.0, 2.5, 8, 1) == pytest.approx(4 * 6.40625)


def test_realsize_rows_on_a_small_preset():
    """The real-size code path (CUDA in bench.py) at tiny size on the CPU: every figure comes out,
    positive and consistent with the others (samples/s from the step time and the batch; the
    projection from the measured SFT and FPO steps)."""
    rows = {what: value for _, what, value, *_ in steps.realsize_figures("tiny", frames=8, steps=1, device="cpu")}
    sft, fpo = rows["SFT step"], rows["FPO step (packed pair)"]
    assert sft > 0 and fpo > 0 and rows["samples/s"] == pytest.approx(4 / sft)  # tiny: batch 4
    assert rows["LLM tokens/s"] > rows["samples/s"]
    hours = {n: rows[f"E.T.Instruct-164K SFT + FPO on {n} GPU(s) (projected, ideal scaling)"] for n in (1, 4, 8)}
    assert hours[1] == pytest.approx(steps.projected_hours(decode.ETINSTRUCT["samples"], sft, fpo, 4, 1))
    assert hours[1] == pytest.approx(4 * hours[4]) == pytest.approx(8 * hours[8])


def test_loader_row_at_real_size(tmp_path, monkeypatch):
    """The loader row on a small 146-s clip: the projected step of d2vlm-3.8b per sample is the
    FLOP count docs/design.md#training-recipe gives (≈ 93 TFLOP, 82 % of it the frozen ViT) at 50 % of an H100."""
    monkeypatch.setitem(decode.ETINSTRUCT, "fps", 1)  # a quick clip to write; still 146 frames at 1 fps
    monkeypatch.setitem(decode.ETINSTRUCT, "width", 64)
    monkeypatch.setitem(decode.ETINSTRUCT, "height", 36)
    rows = {what: value for _, what, value, *_ in decode.loader_figures(tmp_path, repeat=1)}
    step = next(k for k in rows if k.startswith("projected training step"))
    tflop = float(re.search(r"\((\d+) TFLOP\)", step).group(1))
    assert 85 <= tflop <= 100
    assert rows[step] == pytest.approx(tflop * 1e12 / (0.5 * 989e12), rel=0.01)
    workers = rows["DataLoader workers per GPU to stay 2x ahead"]
    assert isinstance(workers, int) and workers >= 1 and rows["decode + sample one clip, one worker"] > 0


def test_memory_rows_at_real_size():
    """Frozen weights in bf16 halve their bytes: with the ViT (985,952,256) and Phi-3's base
    weights (3,821,079,552) frozen, the parameters fall from over 19 GB to a bit over half that."""
    rows = {what: value for _, what, value, *_ in steps.memory_figures()}
    gib, frozen_known = 2 ** 30, 985_952_256 + 3_821_079_552
    before, after = rows["parameters, all fp32"] * gib, rows["parameters, frozen in bf16, trained in fp32"] * gib
    assert before >= 4 * (frozen_known + 185_660_160)
    assert 2 * frozen_known <= after <= before / 2 + 2 * rows["gradients (fp32, trained only)"] * gib
    assert rows["AdamW state (2 x fp32 per trained weight)"] == pytest.approx(2 * rows["gradients (fp32, trained only)"])


def test_the_runs_reach_train_py_and_the_fixtures_from_the_repository_root():
    """`bench.py kills` and `gpu` start train.py, `realwidth` imports tests/layouts.py, by path from the
    repository root (outside pytest, tests/ is not on sys.path)."""
    assert (REPO / "train.py").is_file() and (REPO / "tests" / "layouts.py").is_file()


def test_realwidth_one_layer_on_the_cpu(tmp_path):
    """The real widths with one layer each, started from an E.T.Chat stage-2 directory, under bf16
    autocast: both steps run with finite losses, the saved checkpoint reloads bit for bit,
    generation produces tokens, and the export is a released-layout directory of the same depth."""
    rows = {what: value for _, what, value, *_ in runs.realwidth_figures(layers=1, frames=4, new_tokens=2,
                                                                          out_dir=tmp_path / "rw")}
    assert rows["SFT step"] > 0 and rows["FPO step (packed pair)"] > 0
    assert rows["trained weights after from_checkpoint: bit-identical (1 = yes)"] == 1.0
    assert rows["greedy generation, 2 new tokens"] > 0
    assert (tmp_path / "rw" / "step" / "model.safetensors").is_file() and not list(tmp_path.rglob(".*tmp*"))
    exported = released.config_from(tmp_path / "rw" / "export")
    assert (exported.llm_layers, exported.vision_layers, exported.llm_width) == (1, 1, 3072)


def test_training_curves_are_drawn_from_the_logs(tmp_path):
    """plots.curves reads each stage's log.jsonl (summary lines left out) and draws what it returns."""
    import matplotlib.image
    for stage, rows in (("sft", [{"step": 10, "sft": 3.0, "gnd": 0.6, "cons": 0.2}, {"step": 20, "sft": 2.0, "gnd": 0.5,
                                                                                   "cons": 0.1}]),
                        ("fpo", [{"step": 5, "fpo": 0.69, "rewards/accuracies": 0.5}])):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + [{"summary": True}]))
    drawn = plots.curves(tmp_path, tmp_path / "curves.png")
    assert drawn["sft"]["gnd"] == ([10, 20], [0.6, 0.5]) and drawn["fpo"]["rewards/accuracies"] == ([5], [0.5])
    assert matplotlib.image.imread(tmp_path / "curves.png").shape[:2] == (350, 1200)


def test_host_work_counts_ops_and_reads_by_hand():
    """HostWork counts every aten op, and as host reads: a value read back (.item(), bool()), a size
    that depends on values (nonzero, indexing by a boolean mask) and a copy to the host (.tolist())."""
    x = torch.arange(-2.0, 3.0)
    with gpu.HostWork() as w:
        y = x * 2            # mul
        bool(y.sum() > 0)    # sum, gt, _local_scalar_dense
        y.nonzero()          # nonzero
        y[y > 0]             # gt, index (bool mask)
        y.tolist()           # a copy to the host (no aten op on the CPU)
    assert sum(w.ops.values()) == 7 and w.totals() == (7, 4)
    assert set(w.reads) == {"aten._local_scalar_dense", "aten.nonzero", "aten.index (bool mask)", "Tensor.tolist"}
    assert torch.Tensor.tolist.__name__ == "tolist"  # the methods are put back


def test_llm_shapes_are_those_the_model_lays_out(synthetic):
    """gpu.llm_shapes, read off the token counts, gives the (prefix, suffix) columns that
    model.layout computes on the collated batches of the same epoch, for multiples 1 and 8."""
    cfg = config.PRESETS["tiny"]
    tok = model.add_special_tokens(model.build_tiny_tokenizer(cfg.tiny_vocab))
    ds = batches.VideoDataset(synthetic / "mixed.json", synthetic / "videos", tok, cfg)
    order = list(torch.utils.data.DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0))
    for k in (1, 8):
        laid = set()
        for i in range(0, len(order), 3):
            b = batches.collate([ds[j] for j in order[i:i + 3]], tok, tok, cfg)
            lay = model.layout(b["input_ids"], b["attention_mask"], b["frame_mask"], tok.convert_tokens_to_ids(data.VIDEO), k)
            laid.add((lay.P, lay.S))
        assert gpu.llm_shapes(ds, 3, k) == laid
        assert all(p % k == 0 and s % k == 0 for p, s in laid)
    assert len(gpu.llm_shapes(ds, 3, 1)) > len(gpu.llm_shapes(ds, 3, 64)) == 1


def test_gpu_figures_on_the_cpu(synthetic, tmp_path):
    """bench.py gpu's code path at tiny size on the CPU: every figure comes out, the device/CPU
    ratio is that of the two s/step rows, and the E.T.Bench projection follows from the measured
    prompt and per-token times."""
    rows = gpu.gpu_figures(tmp_path, "cpu", "tiny", micro_batches=(1,), frames=4, gen_batches=(1, 2, 3), new_tokens=3,
                                 tiny_steps=8, cpu_threads=1, log_every=4,
                                 data_args=("--data", str(synthetic / "mixed.json"), "--videos", str(synthetic / "videos")))
    got = {what: value for _, what, value, *_ in rows}
    assert got["steps/s: device / CPU"] == pytest.approx(got["s/step on 1 CPU threads"] / got["s/step on cpu"])
    assert got["SFT step"] > 0 and got["batch 1: greedy, 3 new tokens"] > 0 and got["batch 3: greedy, 3 new tokens"] > 0
    prompt, token = got["batch 2: the prompt (video encoded, pass 1)"], got["batch 2: each new token after it"]
    hours = got["E.T.Bench (7289 questions, 64 new tokens each) at batch 2, one GPU (projected)"]
    assert hours == pytest.approx(3645 * (prompt + 64 * token) / 1e3 / 3600)

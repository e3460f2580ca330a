"""The paper's ablations as switches (README "Ablations"): each changes what it should and nothing
else, and every variant trains two steps and generates."""
import dataclasses
import json
import math
import statistics

import pytest
import torch

import batches
import checkpoint
import config
import data
import decoding
import evaluate
import evidence
import losses
import model
import train
from evidence import EVI, EVI_END
from measure import ablations
from scoring import etbench

CFG = config.PRESETS["tiny"]
VARIANTS = {"A1": ["response_format=coupled"], "A2": ["response_format=factorized_text"],
            "B1": ["evidence_level=frame"], "B2": ["semantic_capture=false"]}


@pytest.fixture(scope="module")
def dvc(synthetic):
    """A dense-captioning training record with 2 or more events, in the evidence format."""
    recs = data.load_records(synthetic / "train.json")
    return next(data.to_evidence(r) for r in recs if r["task"] == "dvc" and len(data.to_evidence(r)["spans"]) >= 2)


def test_factorized_event_is_to_evidence_unchanged(dvc):
    a = data.arrange(dvc)
    assert a["response"] == dvc["response"] and a["evi_frames"] == dvc["frames"] * 2


def test_coupled_has_no_stage_1(dvc):
    a = data.arrange(dvc, "coupled")
    K = len(dvc["spans"])
    assert EVI_END not in a["response"] and a["response"].count(EVI) == K
    assert a["response"] == data.answer_text(dvc["response"]) and a["evi_frames"] == dvc["frames"]
    assert data.render(a["response"], dvc["spans"]) == data.answer_text(data.render(dvc["response"], dvc["spans"] * 2))


def test_factorized_text_writes_the_answer_times_as_text(dvc):
    a = data.arrange(dvc, "factorized_text")
    K = len(dvc["spans"])
    stage1, _, answer = a["response"].partition(EVI_END)
    assert stage1 == EVI * K and EVI not in answer and a["evi_frames"] == dvc["frames"]
    for s, e in dvc["spans"]:  # E.T.Instruct's own way of writing them
        assert f"{data.fmt_time(s)} - {data.fmt_time(e)} seconds" in answer
    assert data.extract_times(answer)[1] == dvc["spans"]


def test_frame_level_gives_two_tokens_per_event_at_the_boundaries(dvc):
    for fmt in config.RESPONSE_FORMATS:
        event, frame = data.arrange(dvc, fmt), data.arrange(dvc, fmt, "frame")
        assert frame["response"].count(EVI) == 2 * event["response"].count(EVI)
        assert frame["response"].replace(EVI * 2, EVI) == event["response"]
        assert frame["evi_frames"] == [[t, t] for s, e in event["evi_frames"] for t in (s, e)]


def test_arrange_refuses_what_it_cannot_shape(dvc):
    with pytest.raises(ValueError, match="preference pairs"):
        data.arrange({**dvc, "rejected": {}}, "coupled")
    with pytest.raises(ValueError, match="response_format 'both'"):
        data.arrange(dvc, "both")
    with pytest.raises(ValueError, match="evidence_level 'pixel'"):
        data.arrange(dvc, "factorized", "pixel")
    with pytest.raises(SystemExit, match="response_format='coupld' is not one of factorized, coupled"):
        config.configure(CFG, ["response_format=coupld"])


def test_pair_boundaries_reads_start_end_pairs():
    text, spans = data.pair_boundaries(f"{EVI}{EVI}{EVI}{EVI}{EVI_END}at {EVI}{EVI} and {EVI}.",
                                       [[3, 3], [1, 1], [6, 6], [9, 9], [2, 2], [4, 4], [7, 7]])
    assert text == f"{EVI}{EVI}{EVI_END}at {EVI} and {EVI}."
    assert spans == [[1, 3], [6, 9], [2, 4], [7, 7]]  # reversed boundaries ordered; a lone one is a point


def test_grounding_ce_against_a_loop():
    torch.manual_seed(0)
    sim = torch.randn(2, 3, 7)
    spans = torch.tensor([[[2, 2], [6, 6], [-1, -1]], [[0, 0], [-1, -1], [-1, -1]]])
    mask = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    got, has = losses.grounding_ce(sim, spans, mask, alpha=2.0)
    for b in range(2):
        T = int(mask[b].sum())
        rows = [k for k in range(3) if spans[b, k, 0] >= 0]
        total = 0.0
        for k in rows:
            t0 = int(spans[b, k, 0])
            q = [2.0 ** -abs(t - t0) for t in range(T)]
            z = sum(math.exp(float(sim[b, k, t])) for t in range(T))
            total += -sum(q[t] / sum(q) * (float(sim[b, k, t]) - math.log(z)) for t in range(T))
        assert got[b].item() == pytest.approx(total / len(rows), rel=1e-5)
    assert has.tolist() == [True, True]
    with pytest.raises(ValueError, match="single frames"):
        losses.grounding_ce(sim, torch.tensor([[[2, 3]] * 3] * 2), mask, 2.0)


def test_select_frame_is_the_argmax_over_valid_frames():
    logits = torch.tensor([[[0.1, 0.9, 0.3, 2.0]]])
    assert evidence.select_frame(logits).tolist() == [[[3, 3]]]
    assert evidence.select_frame(logits, torch.tensor([[True, True, True, False]])).tolist() == [[[1, 1]]]


def _objective(fmt, level, dvc, synthetic):
    cfg = dataclasses.replace(CFG, response_format=fmt, evidence_level=level)
    torch.manual_seed(0)
    m = model.build_model(cfg)
    ds = batches.VideoDataset([dvc], synthetic / "videos", m.tokenizer, cfg)
    b = batches.collate([ds[0]], m.tokenizer, m.qformer_tokenizer, cfg)
    out = m(b)
    return cfg, b, out, losses.sft_objective(out, b, cfg)


def test_only_the_factorized_format_has_a_consistency_term(dvc, synthetic):
    K = len(dvc["spans"])
    for fmt, level, n_evi in (("factorized", "event", 2 * K), ("coupled", "event", K),
                              ("factorized_text", "event", K), ("factorized", "frame", 4 * K)):
        cfg, b, out, terms = _objective(fmt, level, dvc, synthetic)
        assert out["sim"].shape[1] == n_evi and b["answer_spans"].shape[1] == n_evi
        assert (terms["cons"] > 0) == (fmt == "factorized")
        assert terms["loss"].item() == pytest.approx(
            (terms["sft"] + cfg.w_gnd * terms["gnd"] + cfg.w_cons * terms["cons"]).item(), rel=1e-5)
        ground = losses.grounding_ce if level == "frame" else losses.grounding_bce
        want = ground(out["sim"], b["answer_spans"], out["frame_mask"], cfg.alpha)[0]
        assert terms["gnd"].item() == pytest.approx(want.item(), rel=1e-6)
        if level == "frame":  # each boundary <evi> takes in one frame's state: its point span
            assert (b["answer_spans"][0, :, 0] == b["answer_spans"][0, :, 1]).all()


@pytest.mark.parametrize("row", sorted(VARIANTS))
def test_each_variant_trains_two_steps_and_generates(row, synthetic, tmp_path):
    train.main(["--data", str(synthetic / "mixed.json"), "--videos", str(synthetic / "videos"), "--max-steps", "2",
                "--log-every", "1", "--out", str(tmp_path), "--name", row, "--workers", "0", "--set", *VARIANTS[row]])
    run = tmp_path / row / "sft"
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()][:-1]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and r["gnd"] > 0 for r in rows)
    assert all((r["cons"] > 0) == (row in ("B1", "B2")) for r in rows)
    m = checkpoint.from_checkpoint(run / "step_000002").eval()
    for item in VARIANTS[row]:  # the checkpoint keeps the switch
        field, value = item.split("=")
        assert str(getattr(m.cfg, field)).lower() == value
    with torch.no_grad():  # the <evi> row tilted so that the untrained model emits some
        m.lm_head.weight[m.token_id[EVI]] += 50 * m.lm_head.weight[m.token_id[EVI]].sign()
    recs = [r for r in json.loads((synthetic / "test.json").read_text()) if r["task"] in ("tvg", "dvc")][:2]
    preds = evaluate.predict(m, recs, synthetic / "videos", max_new_tokens=6, progress=False)
    assert all(EVI not in p["a"] for p in preds)
    if row != "B2":  # FPO's pairs exist for the factorized, event-level response only: refused at the start
        with pytest.raises(SystemExit, match="fpo: preference pairs are made for the factorized, event-level"):
            train.main(["--stage", "fpo", "--init", str(run / "step_000002"), "--data", str(synthetic / "tvg.json"),
                        "--videos", str(synthetic / "videos"), "--out", str(tmp_path), "--name", row,
                        "--workers", "0"])


def test_frame_level_generation_pairs_boundaries(synthetic, monkeypatch):
    """B1 at inference: each <evi> is the argmax frame; text and spans come out one per event."""
    cfg = dataclasses.replace(CFG, evidence_level="frame")
    torch.manual_seed(0)
    m = model.build_model(cfg).eval()
    monkeypatch.setattr(decoding, "_choose", lambda logits, *_: torch.full(logits.shape[:1], m.token_id[EVI]))
    recs = [r for r in json.loads((synthetic / "test.json").read_text()) if r["task"] == "tvg"][:1]
    ds = batches.VideoDataset(recs, synthetic / "videos", m.tokenizer, cfg, with_response=False)
    b = batches.collate([ds[0]], m.tokenizer, m.qformer_tokenizer, cfg, with_response=False)
    g = decoding.generate(m, b, max_new_tokens=5)[0]
    n = sum(t == m.token_id[EVI] for t in g["tokens"])
    assert n == 5 and len(g["probs"]) == 5 and len(g["spans"]) == 3  # 2 + 2 + 1 boundaries
    for p in g["probs"]:
        assert sum(p) == pytest.approx(1.0, abs=1e-4)  # a softmax over the frames
    argmax = [max(range(len(p)), key=p.__getitem__) / cfg.fps for p in g["probs"]]
    assert g["spans"] == [sorted(argmax[0:2]), sorted(argmax[2:4]), [argmax[4]] * 2]
    assert g["text"] == data.render(EVI * 3, g["spans"])


def test_ablate_trains_scores_resumes_and_tabulates(synthetic, tmp_path, monkeypatch):
    """bench.py ablate's machinery on the test set: A5 goes on from A4's SFT run, B3 is A4's result,
    each row is scored on its answer, and a second call trains and predicts nothing."""
    extra = ["--max-steps", "2", "--workers", "0"]
    res = ablations.run_all(["A1", "A5", "B3"], 1, root=tmp_path, data_root=synthetic, extra=extra, max_new_tokens=8, start="none")
    assert [r["row"] for r in res] == ["A1", "A5", "A4"]
    assert (tmp_path / "A4-s0" / "fpo").is_dir() and not (tmp_path / "B3-s0").exists()
    assert checkpoint.read_config(tmp_path / "A1-s0" / "sft" / "step_000002").response_format == "coupled"
    assert (tmp_path / "A1-s0" / "curves.png").is_file()
    for r in res:
        preds = json.loads((checkpoint.results_dir(r["checkpoint"]) / ablations.PREDICTIONS).read_text())
        assert all(p["a"] == ablations.answer_of(p["response"]) for p in preds)
        _, merged = etbench.summary(etbench.score_etbench(preds, "etchat"))
        assert all(r[k] == merged[k] for k in ablations.METRICS)
        test = json.loads((synthetic / "test.json").read_text())
        assert r["tvg_picks"]["single"][1] + r["tvg_picks"]["multi"][1] == sum(t["task"] == "tvg" for t in test)
    monkeypatch.setattr(ablations.train, "main", lambda *a: pytest.fail("trained again"))
    monkeypatch.setattr(ablations.evaluate, "predict", lambda *a, **k: pytest.fail("predicted again"))
    assert ablations.run_all(["A1", "A5", "B3"], 1, root=tmp_path, data_root=synthetic, extra=extra, start="none") == res
    # a result made before a config field existed reads it as its default, as a saved config does
    kept = ablations.result_path(tmp_path, "A1", 0)
    text = kept.read_text()
    made = json.loads(text)
    del made["config"]["seq_multiple"]
    kept.write_text(json.dumps(made))
    got = ablations.run_all(["A1"], 1, root=tmp_path, data_root=synthetic, extra=extra, start="none")
    assert got[0]["F1 (gnd)"] == res[0]["F1 (gnd)"] and "seq_multiple" not in got[0]["config"]
    kept.write_text(text)
    # kept only: what is missing (A2, every seed 1) is left out, not run
    assert ablations.run_all(["A1", "A2", "A5", "B3"], 2, root=tmp_path, extra=extra, kept_only=True, start="none") == res
    with pytest.raises(SystemExit, match=r"made with the train.py arguments \[--max-steps 2 --workers 0\], not \[--max-steps 3\]"):
        ablations.run_all(["A1"], 1, root=tmp_path, data_root=synthetic, extra=["--max-steps", "3"], start="none")
    # a changed RECIPE or preset: the kept result was made otherwise, and says how
    monkeypatch.setattr(ablations, "RECIPE", (*ablations.RECIPE, "w_gnd=5"))
    with pytest.raises(SystemExit, match=r"A1-s0.json: made with w_gnd=10.0 \(now 5.0\)"):
        ablations.run_all(["A1"], 1, root=tmp_path, data_root=synthetic, extra=extra, start="none")
    monkeypatch.undo()
    tiny = ablations.PRESETS["tiny"]
    monkeypatch.setitem(ablations.PRESETS, "tiny", dataclasses.replace(tiny, batch_size=tiny.batch_size + 1))
    with pytest.raises(SystemExit, match=rf"made with batch_size={tiny.batch_size} \(now {tiny.batch_size + 1}\)"):
        ablations.run_all(["A5"], 1, root=tmp_path, data_root=synthetic, extra=extra, start="none")
    monkeypatch.undo()
    # two more seeds of A1, made up: the table's mean and sample std, B3 filled from A4
    fake = [dict(res[0], seed=s, **{"F1 (gnd)": v}) for s, v in ((1, 30.0), (2, 36.0))]
    summary = ablations.tables(res + fake)
    values = [res[0]["F1 (gnd)"], 30.0, 36.0]
    assert summary["A1"]["F1 (gnd)"] == pytest.approx((statistics.mean(values), statistics.stdev(values), 3))
    assert summary["B3"] == summary["A4"] and "A2" not in summary
    text = ablations.show(summary)
    assert "(21.2)" in text and "(39.5)" in text and "n=3" in text
    ablations.plot(summary, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_ablate_sft_starts_from_the_start_and_fpo_from_its_sft(tmp_path, monkeypatch):
    """Each row's SFT run gets the starting point as --init; FPO goes on from the run's own SFT (no --init),
    and a kept result made from another start is refused."""
    calls = []
    monkeypatch.setattr(ablations.train, "main", calls.append)
    monkeypatch.setattr(ablations.plots, "curves", lambda *a: None)
    for stage in ("sft", "fpo"):
        ablations._train(tmp_path / "A4-s0", stage, ["w_cons=0"], 0, tmp_path, ["--max-steps", "2"], "runs/x/step_9")
    sft, fpo = calls
    assert sft[sft.index("--init") + 1] == "runs/x/step_9" and sft[sft.index("--set") + 1] == "w_cons=0"
    assert "--init" not in fpo and "--set" not in fpo and fpo[fpo.index("--stage") + 1] == "fpo"
    out = ablations.result_path(tmp_path, "A1", 0)
    out.parent.mkdir(parents=True)
    out.write_text(json.dumps({"start": "none", "args": []}))
    with pytest.raises(SystemExit, match=r"A1-s0.json: made from the starting point none, not runs/x/step_9"):
        ablations.run_one("A1", 0, root=tmp_path, start="runs/x/step_9")


def test_ablate_stops_at_the_first_failed_run(synthetic, tmp_path):
    """A run that fails in its worker process is raised in the caller, and nothing is kept for it."""
    extra = ["--max-steps", "2", "--workers", "0", "--set", "no_such_field=1"]
    with pytest.raises(SystemExit, match="--set no_such_field=1: expected FIELD=VALUE"):
        ablations.run_all(["A1", "A2", "A3"], 1, root=tmp_path, data_root=synthetic, extra=extra, jobs=1, start="none")
    assert not (tmp_path / "results").exists()


def test_tvg_picks_counts_the_event_the_query_names():
    """An answer picks the named event when its first span overlaps it more than any other event of
    the video; no span, or no overlap, is no pick; chance is 1/K per question on a K-event video."""
    records = [{"task": "dvc", "video": "a.mp4", "tgt": [[0, 4], [10, 14]]},
               {"task": "dvc", "video": "b.mp4", "tgt": [[2, 6]]}, {"task": "tvg", "video": "b.mp4", "tgt": [2, 6]}]
    said = "The event happens in {} seconds."
    preds = [{"task": "tvg", "video": "a.mp4", "tgt": [10, 14], "a": said.format("10.0 - 13.0")},  # picked
             # overlaps both: IoU 1/12 with [0, 4], 2/11 with [10, 14], so it grounds the other one
             {"task": "tvg", "video": "a.mp4", "tgt": [0, 4], "a": said.format("3.0 - 12.0, 0.0 - 4.0")},
             {"task": "tvg", "video": "a.mp4", "tgt": [0, 4], "a": "I cannot tell."},
             {"task": "tvg", "video": "b.mp4", "tgt": [2, 6], "a": said.format("7.0 - 9.0")},  # no overlap
             {"task": "tvg", "video": "b.mp4", "tgt": [2, 6], "a": said.format("2.0 - 5.0")},  # picked
             {"task": "epm", "video": "a.mp4", "tgt": [0, 4], "a": said.format("0.0 - 4.0")}]  # not a tvg question
    assert ablations.tvg_picks(preds, records) == {"single": [1, 2], "multi": [1, 3], "chance": 1.5}
    assert ablations.tvg_picks(preds, records[1:]) is None  # a.mp4's events are not listed


def test_answer_of():
    assert ablations.answer_of(f"3.0 - 5.0{EVI_END}The event happens in 3.0 - 5.0 seconds.") \
        == "The event happens in 3.0 - 5.0 seconds."
    assert ablations.answer_of("The event happens in 3.0 - 5.0 seconds.") == "The event happens in 3.0 - 5.0 seconds."


def test_orderings_pair_the_rows_seed_by_seed():
    """Each step's change is taken within a seed; B3 is A4; a seed one row lacks is left out."""
    def made(row, seed, gnd):
        return {"row": row, "seed": seed, "F1 (gnd)": gnd, "F1 (cap)": 50.0, "Sim (cap)": 40.0}
    res = [made("A3", 0, 60.0), made("A4", 0, 58.0), made("A3", 1, 40.0), made("A4", 1, 45.0), made("A4", 2, 70.0),
           made("B2", 0, 50.0), made("B2", 1, 50.0)]
    steps = {(o["step"], o["metric"]): o for o in ablations.orderings(res)}
    a = steps["A3->A4", "F1 (gnd)"]
    assert a["seeds"] == [0, 1] and a["ours"] == [-2.0, 5.0] and a["holds"] == 1
    assert a["paper"] == pytest.approx(39.5 - 35.6)
    b = steps["B2->B3", "F1 (gnd)"]  # B3 read from A4
    assert b["ours"] == [8.0, -5.0] and b["holds"] == 1
    assert steps["A3->A4", "F1 (cap)"]["holds"] == 0  # a tie goes neither way
    assert steps["A1->A2", "F1 (gnd)"]["seeds"] == []
    text = ablations.show_orderings(ablations.orderings(res))
    assert "A3->A4   F1 (gnd)      +3.9   -2.0, +5.0" in text and "1/2" in text

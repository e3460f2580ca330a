"""What the scorers read: a bad predictions or ground-truth file is one error line naming the file,
the record and the field; Charades-STA / YouCook2 predictions are scored against TimeChat's ground
truth, a video without a prediction counted as the release counts it (checked by hand here)."""
import json
import re

import pytest

import evaluate
from scoring.captions import CaptionScorers
from scoring.charades_youcook2 import charades_truth, score_charades, score_youcook2, youcook2_records
from scoring.etbench import load_predictions
from scoring.rules import Embedder

GOOD = {"task": "tvg", "source": "s", "video": "v.mp4", "a": "1 - 2", "tgt": [1, 2]}
MCQ = {**GOOD, "task": "rar", "o": ["a", "b", "c", "d"], "p": 1}


@pytest.fixture(scope="module")
def scorers():
    """One Java METEOR process for the module (the MiniLM model is never loaded here)."""
    return CaptionScorers(Embedder())


def _without(record, field):
    return {k: v for k, v in record.items() if k != field}


# (file name, content, what the one line must say after "<file>: ")
BAD_FILES = [
    ("a.json", "[{", r"line 1: not valid JSON"),
    ("a.json", json.dumps({"records": []}), r"expected a JSON list of records, got an object"),
    ("a.json", "[]", r"holds no records"),
    ("a.json", "", r"holds no records \(empty file\)"),
    ("a.jsonl", json.dumps(GOOD) + "\n{oops\n", r"line 2: not valid JSON"),
    ("a.json", json.dumps([GOOD, [1, 2]]), r"record 1: not a JSON object but a list"),
    ("a.json", json.dumps([GOOD, _without(MCQ, "o")]), r"record 1: field 'o' missing \(task 'rar'"),
    ("a.json", json.dumps([_without(GOOD, "tgt")]), r"record 0: field 'tgt' missing \(task 'tvg', source 's', video 'v.mp4'\)"),
    ("a.json", json.dumps([{**GOOD, "task": "tal", "tgt": []}]), r"record 0: field 'tgt' is not a non-empty list of spans"),
    ("a.json", json.dumps([{**GOOD, "task": "vhd", "tgt": [10, 14]}]), r"record 0: field 'tgt' is not a non-empty list"),
    ("a.json", '[{"task": "tvg", "source": "s", "a": "1 - 2", "tgt": [NaN, 3]}]',
     r"record 0: field 'tgt' is not a span \[start, end\] of finite numbers: \[nan, 3\]"),
    ("a.json", '[{"task": "tem", "source": "s", "a": "", "tgt": [[1, 1e999]]}]', r"record 0: field 'tgt' .* \[1, inf\]"),
    ("a.json", json.dumps([{**GOOD, "tgt": [5, 1]}]), r"record 0: field 'tgt' has a span that ends before it starts"),
    ("a.json", json.dumps([{**GOOD, "a": None}]), r"record 0: field 'a' is not a string: None"),
    ("a.json", json.dumps([{**GOOD, "task": "xyz"}]), r"record 0: field 'task' is not an E.T.Bench task"),
    ("a.json", json.dumps([{**MCQ, "p": 4}]), r"record 0: field 'p' is not the index of one of the 4 options: 4"),
    ("a.json", json.dumps([{**MCQ, "p": "b"}]), r"record 0: field 'p' is not the index"),
    ("a.json", json.dumps([{**MCQ, "o": ["a", "\ud800"]}]), r"record 0: field 'o' is not text"),
    ("a.json", json.dumps([{**GOOD, "task": "dvc", "tgt": [[0, 1]], "g": ["x", "y"]}]),
     r"record 0: field 'g' is not a list of one caption per tgt span \(1\)"),
]


@pytest.mark.parametrize("name,content,says", BAD_FILES)
def test_a_bad_predictions_file_is_one_line(tmp_path, name, content, says):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError) as e:
        load_predictions(path)
    assert re.match(re.escape(f"{path}: ") + says, str(e.value)) and "\n" not in str(e.value)


def test_shared_fields_are_checked_first_and_other_failures(tmp_path):
    path = tmp_path / "pred.json"  # record 0 lacks tgt, record 1 lacks "a": the file is no predictions file
    path.write_text(json.dumps([_without(GOOD, "tgt"), _without(GOOD, "a")]))
    with pytest.raises(ValueError, match=r"pred.json: record 1: field 'a' missing"):
        load_predictions(path)
    path.write_bytes(b'[{"a": "\xe9"}]')
    with pytest.raises(ValueError, match=r"pred.json: not UTF-8 text"):
        load_predictions(path)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty_dir: no \*.json or \*.jsonl prediction files"):
        load_predictions(tmp_path / "empty_dir")
    path.write_text(json.dumps([GOOD]))
    with pytest.raises(ValueError, match=r"record 0: field 'idx' missing"):
        load_predictions(path, require=("idx",))
    assert load_predictions(path) == [GOOD]


def test_the_cli_says_one_line(tmp_path):
    path = tmp_path / "pred.json"
    path.write_text("[]")
    with pytest.raises(ValueError, match=r"pred.json: holds no records$"):  # cli.run prints "error: " + it
        evaluate.main(["--score", str(path)])
    assert not (tmp_path / "metrics.json").exists()
    with pytest.raises(SystemExit, match="--score needs --data"):
        evaluate.main(["--benchmark", "youcook2", "--score", str(path)])
    with pytest.raises(SystemExit, match="drop --data"):
        evaluate.main(["--score", str(path), "--data", str(path)])


# ---------------------------------------------------------------------------------------------
# TimeChat's ground truth

def _write(tmp_path, name, annotations):
    path = tmp_path / name
    path.write_text(json.dumps({"annotations": annotations}))
    return path


CHARADES = [{"image_id": f"V{i}.mp4", "caption": "person opens a door.", "timestamp": [10.0, 20.0], "id": i}
            for i in range(4)]
YOUCOOK2 = [{"image_id": "a.mp4", "duration": 60.0, "segments": [[0, 10], [20, 30]], "pure_cap": "crack the eggs. whisk the eggs"},
            {"image_id": "b.mp4", "duration": 60.0, "segments": [[5, 15]], "pure_cap": "add salt"},
            {"image_id": "c.mp4", "duration": 60.0, "segments": [[0, 8], [10, 20]], "pure_cap": "cut onion. fry onion"}]


@pytest.mark.parametrize("annotations,says", [
    ([{**CHARADES[0], "timestamp": [1, float("nan")]}], r"annotation 0: field 'timestamp' is not a span"),
    ([CHARADES[0], _without(CHARADES[1], "id")], r"annotation 1: field 'id' missing \(image_id 'V1.mp4'\)"),
    ([CHARADES[0], {**CHARADES[1], "id": 0}], r"annotation 1: field 'id' repeats annotation 0"),
    ([], r'expected \{"annotations": \[...\]\}'),
])
def test_a_bad_charades_file_is_one_line(tmp_path, annotations, says):
    path = _write(tmp_path, "test.json", annotations)
    with pytest.raises(ValueError, match=re.escape(f"{path}: ") + says):
        charades_truth(path)


def test_a_bad_youcook2_file_is_one_line(tmp_path):
    path = _write(tmp_path, "val.json", [{**YOUCOOK2[0], "pure_cap": "one caption only"}])
    with pytest.raises(ValueError, match=r"annotation 0: field 'pure_cap' splits at '. ' into 1 captions for 2"):
        youcook2_records(path)
    path = _write(tmp_path, "val.json", [YOUCOOK2[0], {**YOUCOOK2[1], "image_id": "x/a.mp4"}])
    with pytest.raises(ValueError, match=r"annotation 1: field 'image_id' repeats annotation 0"):
        youcook2_records(path)


def test_charades_missing_and_unknown_queries(tmp_path, capsys):
    """Ids 0-3 in the ground truth; predictions for 0 (IoU 1), 1 (IoU 1/3), 2 (no </evi>: Failed), 7
    (no such id) and 0 again before (repeated: the last counts); 3 has none. By the official rules:
    num = 3 (0, 1 and 7 have a span), hits only for ids of the ground truth."""
    truth_path = _write(tmp_path, "test.json", CHARADES)
    recs = [{**GOOD, "source": "charades_sta", "idx": i, "tgt": [10.0, 20.0], "a": a} for i, a in [
        (0, "nothing</evi>nothing"), (0, "10 - 20</evi>The event happens in 10 - 20."),
        (1, "12 - 20</evi>The event happens in 15 - 25."), (2, "The event happens in 10 - 20."),
        (7, "10 - 20</evi>10 - 20")]]
    out = score_charades(recs, charades_truth(truth_path))
    assert (out["Total"], out["Failed"], out["num"], out["missing"], out["unknown"], out["repeated"]) == (4, 1, 3, 1, 1, 1)
    assert out["R1@0.3"] == 2 * 100 / 3 and out["R1@0.5"] == 100 / 3 and out["R1@0.7"] == 100 / 3
    assert out["mIoU"] == pytest.approx((1 + 1 / 3) / 3)
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps(recs))
    cli = evaluate.main(["--benchmark", "charades", "--score", str(pred), "--data", str(truth_path)])
    assert cli == out and "charades: 1 ground-truth queries" in capsys.readouterr().err
    pred.write_text(json.dumps([_without(r, "idx") for r in recs]))
    with pytest.raises(ValueError, match=r"pred.json: record 0: field 'idx' missing"):
        evaluate.main(["--benchmark", "charades", "--score", str(pred), "--data", str(truth_path)])


def _parse_sent(text):
    return " ".join(re.sub("[^a-zA-Z]", " ", text).lower().split())


def test_youcook2_a_missing_video_scores_zero(tmp_path, scorers, capsys):
    """Ground truth a, b, c; predictions for a (perfect), c (IoU 1 and 0.4; an earlier record of c
    is repeated) and d (not in the ground truth); none for b. Per the official script b is a zero
    video: Precision@0.3 = (1 + 0 + 1) / 3, @0.5 = (1 + 0 + 1/2) / 3, n_preds = (2 + 0 + 2) / 3."""
    truth_path = _write(tmp_path, "val.json", YOUCOOK2)
    answers = {"a": "0 - 10, 20 - 30</evi>0 - 10 seconds, crack the eggs.\n20 - 30 seconds, whisk the eggs.",
               "c": "x</evi>0 - 8 seconds, cut onion.\n10 - 14 seconds, fry onion.", "d": "x</evi>0 - 5 seconds, stir."}
    recs = [{"task": "dvc", "source": "youcook2", "video": f"youcook2/{v}.mp4", "tgt": [[0, 1]], "g": ["x"], "a": a}
            for v, a in [("c", "garbage"), *answers.items()]]
    truth = youcook2_records(truth_path)
    out = score_youcook2(recs, scorers, truth=truth)
    assert (out["Total"], out["Failed"], out["missing"], out["unknown"], out["repeated"]) == (3, 0, 1, 1, 1)
    assert out["Precision@0.3"] == round((1 + 0 + 1) / 3 * 100, 1) == out["Recall@0.3"]
    assert out["Precision@0.5"] == round((1 + 0 + 0.5) / 3 * 100, 1) == out["Recall@0.9"]
    assert out["Precision_Mean"] == round((1 + 0 + 0.625) / 3 * 100, 1) == out["F1_Score"]
    assert out["n_preds"] == round(4 / 3, 1)
    # the caption metrics of a and c are unchanged, b adds a zero: 2/3 of the mean over a and c
    present = score_youcook2(recs, scorers, truth=[truth[0], truth[2]])
    for k in ("CIDER", "METEOR", "SODA_c_2"):
        assert abs(out[k] - present[k] * 2 / 3) <= 0.1, k
    # paragraphs: the release zips a's and c's paragraphs with a's and b's ground truth
    gts = {"0": [_parse_sent("crack the eggs. whisk the eggs.")], "1": [_parse_sent("add salt.")]}
    res = {"0": [_parse_sent("crack the eggs.. whisk the eggs.")], "1": [_parse_sent("cut onion.. fry onion.")]}
    assert out["Para_METEOR"] == round(scorers.meteor.compute_score(gts, res)[0] * 100, 1)
    assert present["Para_METEOR"] > out["Para_METEOR"]
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps(recs))
    evaluate.main(["--benchmark", "youcook2", "--score", str(pred), "--data", str(truth_path)])
    assert "youcook2: 1 of the 3 ground-truth videos" in capsys.readouterr().err


def test_youcook2_odd_characters_never_raise(scorers):
    """Control characters go through the Java tools as the release's do; a lone surrogate in a
    caption (official: UnicodeEncodeError in the tokenizer) makes that response Failed."""
    recs = [{"task": "dvc", "source": "youcook2", "video": f"yc/{i}.mp4", "tgt": [[0, 10], [20, 30]], "g": ["crack", "whisk"],
             "a": f"</evi>0 - 10 seconds, crack{ch} eggs.\n20 - 30 seconds, whisk{ch}."}
            for i, ch in enumerate(["\r", "\x0b", "\u2028", "\x00", "|||", "\ud800"])]
    out = score_youcook2(recs, scorers)
    assert out["Total"] == 6 and out["Failed"] == 1 and out["n_preds"] == round(10 / 6, 1)

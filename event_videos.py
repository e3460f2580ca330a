"""The embedded default dataset: synthetic event videos (docs/design.md#the-embedded-default).

Coloured shapes appear / move / grow / blink during known spans over a textured grey background.
Spans are whole seconds and a shape is on screen for every frame with start <= t <= end, so the
1-fps frames show exactly the annotated events. Each video gets one question per task in SYN_TASKS,
phrased as E.T.Bench asks and E.T.Instruct-164K answers; the train split is written in the
E.T.Instruct-164K txt schema, the test split in the E.T.Bench schema.

    make_synthetic(root, n_train, n_test, seed)   mp4 files + root/train.json + root/test.json
    ensure_synthetic(root)                        the same, unless already there (first use)
    corpus(n_scenes)                              questions and answers of random scenes, no video
                                                  (what the in-code tokenizer is trained on)

CLI: python event_videos.py --out data/synthetic [--n-train 200 --n-test 40 --seed 0]
"""
from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from data import CAPTION_TASKS, GROUNDING_TASKS, fmt_time, load_records, span_text
from support import cli, outputs
from support.files import write_json_rows
from video import write_video

SYNTHETIC = Path("data/synthetic")  # where train.py and evaluate.py put and look for it by default

SYN_FPS, SYN_W, SYN_H = 4, 160, 120          # video frame rate and size (4:3, so the crop is exercised)
SYN_DURATION = (10, 40)                      # seconds, inclusive
SYN_EVENT_LEN = (2, 8)                       # seconds, inclusive
SYN_MAX_EVENTS = 4
SYN_GAP = 2                                  # seconds from one event's end to the next start
SYN_COLOURS = {"red": (225, 35, 35), "green": (35, 190, 55), "blue": (40, 75, 235), "yellow": (235, 215, 30),
               "purple": (150, 45, 215), "orange": (245, 130, 20), "cyan": (25, 200, 215)}
SYN_SHAPES = ("square", "circle", "triangle")
SYN_ACTIONS = ("appears", "moves left", "moves right", "grows", "blinks")
SYN_STEPS = {"appears": "show the {c} {s}", "moves left": "move the {c} {s} to the left",
             "moves right": "move the {c} {s} to the right", "grows": "enlarge the {c} {s}",
             "blinks": "flash the {c} {s}"}
SYN_TASKS = GROUNDING_TASKS + CAPTION_TASKS  # the E.T.Bench tasks E.T.Instruct-164K trains
SYN_SOURCE = "synthetic"
# the clips of the pretraining set (make_pretrain): shorter than the SFT videos, other scenes
PRE_CLIPS, PRE_DURATION = 600, (10, 24)
PRETRAIN = "pretrain.json"  # its annotation file, beside train.json and test.json
PRETRAIN_FRAMES = "pretrain_frames.json"  # what each of its clips' 1-fps frames shows: image-text pairs
NO_SHAPE = "no shape"  # the text of a frame that shows the background alone
GENERATOR = "event_videos.py"  # what the folders it writes are recorded as made by (support/outputs.py)
INTRO = "You are given a video of coloured shapes on a textured background. Watch the video carefully and "


def _scene(rng, durations=SYN_DURATION):
    """Draw one video: duration (seconds, in `durations`), background and 1-4 non-overlapping events
    with distinct colours."""
    duration = int(rng.integers(durations[0], durations[1] + 1))
    k = int(rng.integers(1, SYN_MAX_EVENTS + 1))
    lens = [int(rng.integers(SYN_EVENT_LEN[0], SYN_EVENT_LEN[1] + 1)) for _ in range(k)]
    while sum(lens) + SYN_GAP * (len(lens) - 1) > duration - 1:  # all must end by the last frame
        lens.pop()
    k = len(lens)
    free = duration - 1 - sum(lens) - SYN_GAP * (k - 1)
    cuts = np.sort(rng.integers(0, free + 1, size=k))
    colours = rng.choice(list(SYN_COLOURS), size=k, replace=False)
    actions = [str(a) for a in rng.choice(SYN_ACTIONS, size=k)]
    if k >= 2 and rng.random() < 0.5:  # same-class events, so that action localisation is not trivial
        actions[int(rng.integers(1, k))] = actions[0]
    events, t = [], 0
    for i in range(k):
        s = t + int(cuts[i]) - (int(cuts[i - 1]) if i else 0)
        events.append({"colour": str(colours[i]), "shape": str(rng.choice(SYN_SHAPES)), "action": actions[i],
                       "span": [float(s), float(s + lens[i])], "x": int(rng.integers(55, 106)), "y": int(rng.integers(35, 86))})
        t = s + lens[i] + SYN_GAP
    coarse = rng.uniform(70, 150, size=(SYN_H // 10, SYN_W // 10, 1))
    bg = np.kron(coarse, np.ones((10, 10, 1))) + rng.normal(0, 6, size=(SYN_H, SYN_W, 1))
    bg = np.clip(bg + rng.uniform(-6, 6, size=3), 0, 255).astype(np.uint8)  # near-grey, slightly tinted
    return {"duration": duration, "events": events, "bg": bg}


def _render(scene):
    n = scene["duration"] * SYN_FPS
    frames = np.repeat(scene["bg"][None], n, axis=0)
    yy, xx = np.mgrid[0:SYN_H, 0:SYN_W]
    for ev in scene["events"]:
        s, e = map(int, ev["span"])
        for i in range(s * SYN_FPS, e * SYN_FPS + 1):
            u = (i / SYN_FPS - s) / max(e - s, 1)  # progress through the event, 0..1
            x, y, r = ev["x"], ev["y"], 12.0
            if ev["action"] == "moves left":
                x = ev["x"] + 25 - 50 * u
            elif ev["action"] == "moves right":
                x = ev["x"] - 25 + 50 * u
            elif ev["action"] == "grows":
                r = 6 + 14 * u
            dx, dy = xx - x, yy - y
            if ev["shape"] == "square":
                mask = (np.abs(dx) <= r) & (np.abs(dy) <= r)
            elif ev["shape"] == "circle":
                mask = dx ** 2 + dy ** 2 <= r ** 2
            else:
                mask = (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
            colour = np.array(SYN_COLOURS[ev["colour"]], dtype=np.float64)
            if ev["action"] == "blinks" and int(i / SYN_FPS - s) % 2:
                colour = colour * 0.5  # dim on odd seconds, bright on even ones: visible throughout
            frames[i][mask] = colour.astype(np.uint8)
    return frames


def _caption(ev):
    return f"a {ev['colour']} {ev['shape']} {ev['action']}"


def _tvg(ev):
    return (INTRO + f"find a visual event described by the sentence: '{_caption(ev)}'. The format of your "
            "response should be: 'The event happens in <start time> - <end time>'.",
            f"The event happens in {span_text(ev['span'])} seconds.", ev["span"], None)


def _questions(scene, rng):
    """One (task, question, answer, tgt, captions) per task for this scene, phrased as E.T.Bench asks
    and E.T.Instruct answers. tgt is in E.T.Bench's per-task shape."""
    evs = scene["events"]
    out = {}
    out["tvg"] = _tvg(evs[int(rng.integers(len(evs)))])
    ev = evs[int(rng.integers(len(evs)))]
    out["epm"] = (INTRO + f"answer the question from my point of view: 'When did I see the {ev['colour']} "
                  f"{ev['shape']}?' The format of your response should be: 'The event happens in <start time> - "
                  "<end time>'.", f"The event happens in {span_text(ev['span'])} seconds.", ev["span"], None)
    action = evs[int(rng.integers(len(evs)))]["action"]
    spans = [e["span"] for e in evs if e["action"] == action]
    out["tal"] = (INTRO + f"find all the moments of the action 'a shape {action}'. The format of your response "
                  "should be: 'The action happens in <start time> - <end time>, <start time> - <end time>, and "
                  "<start time> - <end time>'.",
                  "The action happens in " + ", ".join(map(span_text, spans)) + " seconds.", spans, None)
    out["evs"] = (INTRO + "summarize it by selecting its most important segments. The format of your response "
                  "should be: 'The key segments are <start time> - <end time>, <start time> - <end time>'.",
                  "The key segments are " + ", ".join(span_text(e["span"]) for e in evs)
                  + " seconds.", [e["span"] for e in evs], None)
    shape = evs[int(rng.integers(len(evs)))]["shape"]
    spans = [e["span"] for e in evs if e["shape"] == shape]
    s, e = max(spans, key=lambda x: x[1] - x[0])
    out["vhd"] = (INTRO + f"find the highlight moment for the query: 'a {shape}'. The format of your response "
                  "should be: 'The highlight is at <time> seconds'.",
                  f"The highlight is at {fmt_time((s + e) / 2)} seconds.", spans, None)
    caps = [_caption(e) + "." for e in evs]
    out["dvc"] = (INTRO + "densely describe all the events. For each event, you need to determine the start and "
                  "end times and provide a concise description. The format of your response should be: "
                  "'<start time> - <end time>, <description>'.",
                  "\n".join(f"{span_text(e['span'])} seconds, {c}" for e, c in zip(evs, caps)),
                  [e["span"] for e in evs], caps)
    steps = [SYN_STEPS[e["action"]].format(c=e["colour"], s=e["shape"]) + "." for e in evs]
    out["slc"] = (INTRO + "localize the steps of the procedure it shows. For each step, you need to determine the "
                  "start and end times and provide a concise description. The format of your response should be: "
                  "'<start time> - <end time>, <description>'.",
                  "\n".join(f"{span_text(e['span'])} seconds, {c}" for e, c in zip(evs, steps)),
                  [e["span"] for e in evs], steps)
    return out


def _pretrain_questions(scene, rng):
    """What the pretraining set asks of one clip, in the E.T.Instruct-164K txt schema's two turns,
    never when: a caption of the whole clip ("caption"), and ("qa") for each event one question that
    names it by some of its colour, shape and action and is answered by the rest, and whether a shape
    is there. Each answer begins with what has to be found in the frames."""
    evs = scene["events"]
    out = [("caption", "describe what happens in the video.", ". ".join(_caption(e) for e in evs) + ".")]
    for ev in evs:
        c, s, a = ev["colour"], ev["shape"], ev["action"]
        alike = sum(e["shape"] == s and e["action"] == a for e in evs)
        kind = int(rng.integers(3 if alike == 1 else 2))
        if kind == 0:
            out.append(("qa", f"answer the question: 'What is the {c} shape, and what does it do?'", f"{s}, it {a}."))
        elif kind == 1:
            out.append(("qa", f"answer the question: 'What does the {c} {s} do?'", f"it {a}."))
        else:
            out.append(("qa", f"answer the question: 'What colour is the {s} that {a}?'",
                        f"{c}."))
    shown = {e["colour"] for e in evs}
    if rng.random() < 0.5:
        ev = evs[int(rng.integers(len(evs)))]
        out.append(("qa", f"answer the question: 'Is there a {ev['colour']} {ev['shape']}?'", f"yes, it {ev['action']}."))
    else:
        c = str(rng.choice([x for x in SYN_COLOURS if x not in shown]))
        out.append(("qa", f"answer the question: 'Is there a {c} {rng.choice(SYN_SHAPES)}?'", "no."))
    return [(task, INTRO + q, a) for task, q, a in out]


def _pretrain_one(args):
    """Render, encode and annotate one pretraining clip (runs in a worker process)."""
    root, i, seed = args
    rng = np.random.default_rng([seed, 2, i])  # stream 2: neither the train (0) nor the test (1) videos
    scene = _scene(rng, PRE_DURATION)
    name = f"pretrain_{i:04d}.mp4"
    write_video(Path(root) / "videos" / name, _render(scene), SYN_FPS)
    shown = [NO_SHAPE] * (scene["duration"] + 1)  # frame k (1 fps) shows second k
    during = [""] * (scene["duration"] + 1)
    for ev in scene["events"]:
        s, e = map(int, ev["span"])
        shown[s:e + 1] = [f"a {ev['colour']} {ev['shape']}"] * (e - s + 1)
        during[s:e + 1] = [_caption(ev)] * (e - s + 1)
    recs = [{"task": task, "source": SYN_SOURCE, "video": name, "duration": float(scene["duration"]),
             "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]}
            for task, q, a in _pretrain_questions(scene, rng)]
    return recs, {"video": name, "duration": float(scene["duration"]), "frames": shown, "events": during}


def _claim(root, flag, names) -> None:
    """The folder this generator writes: new, empty, or one it generated (outputs.claim_folder)."""
    outputs.claim_folder(root, flag, {"command": GENERATOR}, names)


def _write(root, name, rows, made) -> None:
    """An annotation file of a claimed folder, recorded (a line says when it replaces an earlier one)."""
    with outputs.output(Path(root) / name, {"command": GENERATOR, **made}, owned=True) as tmp:
        write_json_rows(tmp, rows)


def make_pretrain(root, n_clips: int = PRE_CLIPS, seed: int = 0, workers: int | None = None, flag: str = "--out"):
    """Write `n_clips` pretraining clips under root/videos, their records to root/PRETRAIN (the
    E.T.Instruct-164K txt schema, tasks "caption" and "qa": data.PLAIN_TASKS) and what each of their
    1-fps frames shows to root/PRETRAIN_FRAMES ({"video", "duration", "frames": [text per frame],
    "events": [the caption of the event each frame is part of, "" for none]}). Their scenes are drawn
    from their own random stream, apart from make_synthetic's train and test videos. Returns the path."""
    root = Path(root)
    _claim(root, flag, (PRETRAIN, PRETRAIN_FRAMES))
    (root / "videos").mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(workers or os.cpu_count()) as pool:
        done = list(pool.map(_pretrain_one, [(str(root), i, seed) for i in range(n_clips)], chunksize=8))
    for name, rows in ((PRETRAIN_FRAMES, [f for _, f in done]), (PRETRAIN, [r for rs, _ in done for r in rs])):
        _write(root, name, rows, {"n_clips": n_clips, "seed": seed})  # PRETRAIN last: its presence means complete
    return root / PRETRAIN


def _synth_one(args):
    """Render, encode and annotate one video (runs in a worker process)."""
    root, split, i, seed = args
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
    scene = _scene(rng)
    name = f"{split}_{i:04d}.mp4"
    write_video(Path(root) / "videos" / name, _render(scene), SYN_FPS)
    questions = list(_questions(scene, rng).items())
    if split == "train":  # every event also asked about: one video, several queries, several answers
        asked = dict(questions)["tvg"][2]
        questions += [("tvg", _tvg(ev)) for ev in scene["events"] if ev["span"] != asked]
    recs = []
    for task, (q, a, tgt, caps) in questions:
        head = {"task": task, "source": SYN_SOURCE, "video": name, "duration": float(scene["duration"])}
        if split == "train":
            recs.append({**head, "conversations": [{"from": "human", "value": "<image>\n" + q},
                                                   {"from": "gpt", "value": a}]})
        else:
            rec = {"version": 1.0, **head, "q": q, "tgt": tgt}
            if caps is not None:
                rec["g"] = [c.rstrip(".") for c in caps]
            recs.append(rec)
    return recs


def make_synthetic(root, n_train: int = 200, n_test: int = 40, seed: int = 0, workers: int | None = None,
                   flag: str = "--out"):
    """Write `n_train` + `n_test` synthetic mp4 files under root/videos and their annotations:
    root/train.json (E.T.Instruct-164K txt schema) and root/test.json (E.T.Bench schema), one record
    per task in SYN_TASKS per video (train: plus a tvg record for each of the video's other events).
    The annotation files are written last, so their presence means the set is complete. Same seed ->
    byte-identical annotation files. `root` must be new, empty or generated here before (outputs.claim_folder;
    `flag`: what a refusal names it by)."""
    root = Path(root)
    _claim(root, flag, ("train.json", "test.json"))
    (root / "videos").mkdir(parents=True, exist_ok=True)
    jobs = [(str(root), "train", i, seed) for i in range(n_train)] + [(str(root), "test", i, seed) for i in range(n_test)]
    with ProcessPoolExecutor(workers or os.cpu_count()) as pool:
        results = list(pool.map(_synth_one, jobs, chunksize=4))
    train = [r for recs in results[:n_train] for r in recs]
    test = [{"version": r.pop("version"), "idx": j, **r}
            for j, r in enumerate(r for recs in results[n_train:] for r in recs)]
    for name, recs in (("train.json", train), ("test.json", test)):
        _write(root, name, recs, {"n_train": n_train, "n_test": n_test, "seed": seed})
    return root / "train.json", root / "test.json"


def ensure_synthetic(root=SYNTHETIC, **kw):
    """Generate the synthetic set under `root` unless it is already there (first use)."""
    root = Path(root)
    if not ((root / "train.json").is_file() and (root / "test.json").is_file()):
        print(f"generating the synthetic dataset under {root} ...", file=sys.stderr)
        make_synthetic(root, flag="the synthetic set's folder", **kw)
    return root / "train.json", root / "test.json"


def corpus(n_scenes: int = 300, seed: int = 0) -> list:
    """The questions and answers of `n_scenes` random scenes (nothing rendered), in a fixed order:
    the phrasing the in-code tokenizer (model.build_tiny_tokenizer) is trained on."""
    rng = np.random.default_rng(seed)
    return [text for _ in range(n_scenes) for q, a, _, _ in _questions(_scene(rng), rng).values() for text in (q, a)]


def main(argv=None):
    ap = cli.ArgumentParser(description="Generate the synthetic event-video dataset.")
    ap.add_argument("--out", default=str(SYNTHETIC))
    ap.add_argument("--n-train", type=cli.at_least(1), default=200)
    ap.add_argument("--n-test", type=cli.at_least(1), default=40)
    ap.add_argument("--seed", type=cli.seed, default=0)
    ap.add_argument("--workers", type=cli.at_least(1), default=None)
    args = ap.parse_args(argv)
    t = time.time()
    train, test = make_synthetic(args.out, args.n_train, args.n_test, args.seed, args.workers)
    n_tr, n_te = len(load_records(train)), len(load_records(test))
    print(f"wrote {args.n_train + args.n_test} videos and {n_tr} train / {n_te} test records "
          f"to {args.out} in {time.time() - t:.1f} s")


if __name__ == "__main__":
    cli.run(main)

"""Factorized preference data: rejected responses made by perturbing the chosen one, event by event.

Paper: "Factorized Preference Data Synthesis"; docs/design.md#preference-data-synthesis (the parameters are ours: the authors did
not release their generator). Each perturbation touches one event of the response, so the source
of the error is known and recorded with the pair.

    temporal kinds (spans change)              text kinds (spans stay)
    shift   move one span by +-(0.3-1.0) x     tamper  swap one key word (colour, object,
            its length, at least 2 s                   action, number) for another of its class
    insert  add a spurious event in a gap              found in the data
            (multi-event tasks)                repeat  say one line / sentence twice
    delete  drop one event (K >= 2)
    merge   fuse two neighbouring events (K >= 2)

    perturb(record, kind, rng)         an evidence-format record (data.to_evidence) -> the rejected
                                       response {response, spans, evi_spans}, or None if `kind` does not apply
    make_pairs(records, seed)          preference records: the chosen record + "rejected" + "kind"

CLI: python synth.py --data FILE --out pairs.json  (prints how many pairs of each kind were made
and how many records no kind applies to).
"""
from __future__ import annotations

import re
import sys
from collections import Counter

import numpy as np

import data
from data import EVI, EVI_END
from support import cli, outputs
from support.files import read_json, write_json_rows

SHIFT = (0.3, 1.0)      # shift by this fraction of the span's length ...
MIN_SHIFT = 2.0         # ... but at least this many seconds
INSERT_LEN = (2.0, 8.0)  # seconds, when the record has no event to copy a length from
# the key words `tamper` swaps, by class; make_pairs keeps the ones that occur in the data
KEY_WORDS = {
    "colour": "red orange yellow green blue purple pink brown black white grey gray cyan magenta".split(),
    "object": ("square circle triangle man woman person boy girl child baby dog cat horse bird car bike bicycle "
               "ball door table chair cup bowl plate knife spoon bottle box bag phone book window bed tree water "
               "pan pot egg onion tomato potato meat bread rice noodles sauce oil salt pepper cheese").split(),
    "action": ("appears moves grows blinks shrinks disappears opens closes walks runs jumps sits stands picks puts "
               "takes cuts adds pours stirs mixes washes cooks throws catches holds drinks eats talks").split(),
    "number": "one two three four five six seven eight nine ten".split(),
    "direction": "left right up down".split(),
}
_LIST_SEP = re.compile(r"^(?:,\s*(?:and\s+)?|\s+and\s+|\s*;\s*)$")


# ---------------------------------------------------------------------------------------------
# The stage-2 answer as a list of events

def _units(response):
    """Split a response (K <evi>, </evi>, answer with K <evi>) into its answer's event units.
    Returns (mode, head, units, seps, tail): "lines" when the answer has one line per event (dense
    captioning), "list" when the events are <evi> in one sentence separated by commas / "and"
    (tvg, tal, ...), None when neither (then only `shift`, `tamper`, `repeat` can apply)."""
    answer = response.split(EVI_END, 1)[1]
    lines = answer.split("\n")
    if len(lines) > 1 and all(line.count(EVI) == 1 for line in lines):
        return "lines", "", lines, ["\n"] * (len(lines) - 1), ""
    pieces = answer.split(EVI)
    if len(pieces) >= 2 and all(_LIST_SEP.match(p) for p in pieces[1:-1]):
        return "list", pieces[0], [EVI] * (len(pieces) - 1), pieces[1:-1], pieces[-1]
    return None, "", [], [], ""


def _assemble(head, units, seps, tail, mode):
    """Units back into a response: stage 1 (one <evi> per unit) + the answer."""
    if mode == "list" and len(units) != len(seps) + 1:  # re-join a list that changed length
        last = seps[-1] if seps else ", "
        seps = [seps[0] if seps else ", "] * max(len(units) - 2, 0) + ([last] if len(units) > 1 else [])
    body = head + "".join(u + s for u, s in zip(units, seps + [""])) + tail
    return EVI * body.count(EVI) + EVI_END + body


def _rejected(response, spans, evi_spans=None):
    spans = [[round(float(s), 2), round(float(e), 2)] for s, e in spans]
    return {"response": response, "spans": spans, "evi_spans": evi_spans if evi_spans is not None else spans * 2}


# ---------------------------------------------------------------------------------------------
# Perturbations

def _shift(record, rng, vocab, borrowed):
    """Move one span by +-(0.3-1.0) x its length, at least MIN_SHIFT seconds, inside the video."""
    spans, dur = [list(x) for x in record["spans"]], float(record["duration"])
    if not spans:
        return None
    k = int(rng.integers(len(spans)))
    s, e = spans[k]
    length = e - s
    d = max(MIN_SHIFT, rng.uniform(*SHIFT) * length)
    for sign in rng.permutation([-1, 1]):
        ns = min(max(s + sign * d, 0.0), max(dur - length, 0.0))
        if abs(ns - s) >= MIN_SHIFT / 2:  # clamping at the video's ends may eat part of the shift
            spans[k] = [ns, ns + length]
            return _rejected(record["response"], spans)
    return None


def _insert(record, rng, vocab, borrowed):
    """A spurious event in a gap between the events (multi-event tasks): one more <evi> in a list,
    or a line borrowed from another record in dense captions."""
    spans, dur = [list(x) for x in record["spans"]], float(record["duration"])
    mode, head, units, seps, tail = _units(record["response"])
    if mode is None or record["task"] not in data.SPAN_LIST_TASKS or not spans:  # multi-event tasks
        return None
    length = float(np.clip(np.mean([e - s for s, e in spans]), *INSERT_LEN))
    edges = sorted(spans)
    gaps = [(a, b) for a, b in zip([0.0] + [e for _, e in edges], [s for s, _ in edges] + [dur]) if b - a > length + 1]
    if not gaps:
        return None
    a, b = gaps[int(rng.integers(len(gaps)))]
    ns = round(float(rng.uniform(a + 0.5, b - 0.5 - length)), 1)
    at = sum(s < ns for s, _ in spans)  # keep the events in time order
    if mode == "lines":
        if not borrowed:
            return None
        units.insert(at, borrowed[int(rng.integers(len(borrowed)))])
        seps = ["\n"] * (len(units) - 1)
    else:
        units.insert(at, EVI)
    spans.insert(at, [ns, ns + length])
    return _rejected(_assemble(head, units, seps, tail, mode), spans)


def _drop(record, rng, merge: bool):
    """Delete one event, or merge two neighbours into one span with the first one's words (K >= 2)."""
    spans = [list(x) for x in record["spans"]]
    K = len(spans)
    mode, head, units, seps, tail = _units(record["response"])
    if mode is None or K < 2 or len(units) != K:
        return None
    k = int(rng.integers(K - 1 if merge else K))
    if merge:  # events k and k+1 become one span with event k's words
        spans[k] = [min(spans[k][0], spans[k + 1][0]), max(spans[k][1], spans[k + 1][1])]
        k += 1
    del units[k], spans[k]
    seps = seps[:-1] if mode == "lines" else (seps[1:] if k == 0 else seps[:k - 1] + seps[k:])
    return _rejected(_assemble(head, units, seps, tail, mode), spans)


def _tamper(record, rng, vocab, borrowed):
    """Swap one key word of the answer (colour, object, action, ...) for another of its class."""
    stage1, answer = record["response"].split(EVI_END, 1)
    cls_of = {w: c for c, ws in vocab.items() if len(ws) > 1 for w in ws}
    hits = [m for m in re.finditer(r"[A-Za-z]+", answer) if m.group().lower() in cls_of]
    if not hits:
        return None
    m = hits[int(rng.integers(len(hits)))]
    word = m.group()
    options = [w for w in vocab[cls_of[word.lower()]] if w != word.lower()]
    new = options[int(rng.integers(len(options)))]
    new = new.capitalize() if word[0].isupper() else new
    return _rejected(stage1 + EVI_END + answer[:m.start()] + new + answer[m.end():], record["spans"])


def _repeat(record, rng, vocab, borrowed):
    """Say one line (or, in a one-line answer, one sentence) twice."""
    spans = [list(x) for x in record["spans"]]
    stage1, answer = record["response"].split(EVI_END, 1)
    lines = answer.split("\n")
    if len(lines) > 1:
        k = int(rng.integers(len(lines)))
        parts, joiner = lines, "\n"
    else:
        parts = [p for p in re.split(r"(?<=[.!?])\s+", answer) if p]
        if not parts:
            return None
        k, joiner = int(rng.integers(len(parts))), " "
    parts = parts[:k + 1] + [parts[k]] + parts[k + 1:]
    # the repeated piece refers to the same events again: one more stage-2 <evi> per <evi> in it
    before = sum(p.count(EVI) for p in parts[:k + 1])
    again = list(range(before - parts[k].count(EVI), before))
    stage2 = list(range(len(spans)))
    stage2 = stage2[:before] + again + stage2[before:]
    return _rejected(stage1 + EVI_END + joiner.join(parts), spans, spans + [spans[i] for i in stage2])


# kind -> f(record, rng, vocab, borrowed) -> the rejected response, or None where it does not apply
PERTURBATIONS = {"shift": _shift, "insert": _insert,
                 "delete": lambda record, rng, vocab, borrowed: _drop(record, rng, merge=False),
                 "merge": lambda record, rng, vocab, borrowed: _drop(record, rng, merge=True),
                 "tamper": _tamper, "repeat": _repeat}
KINDS = tuple(PERTURBATIONS)
# what a pair holds in a pairs file (save_pairs, load_pairs): the chosen record in evidence format, its rejection
PAIR_FIELDS = ("task", "source", "video", "duration", "prompt", "response", "spans", "question_spans", "rejected", "kind")


def perturb(record, kind, rng, vocab=None, borrowed=()):
    """The rejected response for `record` (data.to_evidence output) made by `kind`, or None if the
    kind does not apply. vocab: {class: [words]} for `tamper` (default KEY_WORDS); borrowed: answer
    lines of other records (one <evi> each) for `insert` into dense captions.
    Returns {"response", "spans" (the K events, seconds), "evi_spans" (one span per <evi>, stage 1
    then stage 2; differs from spans * 2 only for `repeat`)}."""
    if kind not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {kind!r}; expected one of {KINDS}")
    return PERTURBATIONS[kind](record, rng, vocab or KEY_WORDS, borrowed)


# ---------------------------------------------------------------------------------------------
# Pairs

class Pairs(list):
    """Preference records, plus `.counts` (pairs per kind) and `.unusable` (records no kind applies to)."""

    def __init__(self, items, counts, unusable):
        super().__init__(items)
        self.counts, self.unusable = counts, unusable


def vocabulary(records):
    """KEY_WORDS restricted to the words that occur in the records' answers (so `tamper` swaps in
    words of the dataset)."""
    seen = Counter(w.lower() for r in records for w in re.findall(r"[A-Za-z]+", r["response"].split(EVI_END, 1)[1]))
    return {c: [w for w in ws if seen[w]] for c, ws in KEY_WORDS.items()}


def make_pairs(records, seed: int = 0, per_sample: int = 1, kinds=KINDS) -> Pairs:
    """For each evidence-format record, `per_sample` rejected responses of distinct kinds, drawn at
    random among the kinds that apply (seeded). A pair is the record with two more fields:
    "rejected" ({response, spans, evi_spans}) and "kind". Records that no kind applies to are
    counted in `.unusable`, never dropped silently."""
    rng = np.random.default_rng(seed)
    vocab = vocabulary(records)
    lines = [(i, u) for i, r in enumerate(records) if _units(r["response"])[0] == "lines"
             for u in _units(r["response"])[2]]
    out, counts, unusable = [], Counter(), 0
    for i, rec in enumerate(records):
        borrowed = [u for j, u in lines if j != i]
        made = 0
        for kind in rng.permutation(kinds):
            rej = perturb(rec, str(kind), rng, vocab, borrowed)
            if rej is None:
                continue
            out.append({**rec, "rejected": rej, "kind": str(kind)})
            counts[str(kind)] += 1
            made += 1
            if made == per_sample:
                break
        unusable += made == 0
    return Pairs(out, dict(counts), unusable)


def save_pairs(pairs, path):
    """JSON list, seconds only (frames are recomputed at the model's fps when read); temp + rename."""
    write_json_rows(path, ({k: p[k] for k in PAIR_FIELDS} for p in pairs))


def load_pairs(path, fps: float = 1.0) -> list:
    """Read a pairs file written by save_pairs, check every pair (_check_pair: the fields a record
    holds, checked as data.to_evidence checks them, and the <evi> counts), and add the frame spans
    at `fps`. A bad pair raises one line naming the file, the pair and the field."""
    parsed = read_json(path, "pairs file", item="pair")
    if not isinstance(parsed, list) or not parsed:
        raise ValueError(f"{path}: expected a non-empty JSON list of pairs")
    out = []
    for i, p in enumerate(parsed):
        try:
            _check_pair(p)
        except data.BadRecord as e:
            raise ValueError(f"{path}: pair {i}: {e}") from None
        out.append({**p, "frames": data.to_frames(p["spans"], fps), "question_frames": data.to_frames(p["question_spans"], fps)})
    return out


def _check_pair(p) -> None:
    """data.BadRecord naming the field of the first thing wrong with a pair of save_pairs' format."""
    if not isinstance(p, dict):
        raise data.BadRecord("pair", f"expected an object, got {type(p).__name__}")
    for f in PAIR_FIELDS:
        if f not in p:
            raise data.BadRecord(f, "missing")
    if p["task"] not in data.INSTRUCT_TASKS + data.BENCH_TASKS:
        raise data.BadRecord("task", "not a task of E.T.Instruct-164K or E.T.Bench")
    if p["kind"] not in KINDS:
        raise data.BadRecord("kind", f"not one of {', '.join(KINDS)}")
    data.check_text(p["source"], "source")
    data.check_video_path(p["video"])
    duration = data.check_number(p["duration"], "duration")
    data.check_text(p["prompt"], "prompt", allow=(EVI,))
    data.check_text(p["response"], "response", allow=(EVI, EVI_END))
    rej = p["rejected"]
    if not isinstance(rej, dict) or not all(k in rej for k in ("response", "spans", "evi_spans")):
        raise data.BadRecord("rejected", "expected an object with response, spans and evi_spans")
    data.check_text(rej["response"], "rejected", allow=(EVI, EVI_END))
    spans = {f: data.check_spans(x, f, duration, empty=True) for f, x in
             (("spans", p["spans"]), ("question_spans", p["question_spans"]), ("rejected", rej["spans"]))}
    counts = (("response", p["response"].count(EVI), 2 * len(spans["spans"])),
              ("prompt", p["prompt"].count(EVI), len(spans["question_spans"])),
              ("rejected", rej["response"].count(EVI), len(data.check_spans(rej["evi_spans"], "rejected", duration,
                                                                            empty=True))))
    for field, have, want in counts:
        if have != want:
            raise data.BadRecord(field, f"{have} {EVI} where its spans need {want}")


def main(argv=None):
    ap = cli.ArgumentParser(description="Make factorized preference pairs from an annotation file.")
    ap.add_argument("--data", required=True, help="E.T.Instruct-164K (txt / vid) or synthetic train.json")
    ap.add_argument("--out", required=True, help="pairs JSON to write")
    ap.add_argument("--seed", type=cli.seed, default=0)
    ap.add_argument("--per-sample", type=cli.at_least(1), default=1)
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    ap.add_argument("--on-error", choices=list(data.ON_ERROR), default="raise")
    args = ap.parse_args(argv)
    made = {"command": "synth.py", "data": str(outputs.resolved(args.data)), "seed": args.seed,
            "per_sample": args.per_sample, "kinds": args.kinds, "on_error": args.on_error}
    outputs.check_file(args.out, "--out", made, {"--data": args.data})
    recs = data.load_records(args.data, args.on_error)
    pairs = make_pairs([data.to_evidence(r) for r in recs], args.seed, args.per_sample, tuple(args.kinds))
    with outputs.output(args.out, made, "--out") as tmp:
        save_pairs(pairs, tmp)
    counts = ", ".join(f"{k} {pairs.counts.get(k, 0)}" for k in args.kinds)
    print(f"{args.out}: {len(pairs)} pairs from {len(recs)} records ({counts}); no kind applies to "
          f"{pairs.unusable} records; {len(recs.skipped)} invalid records skipped", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)

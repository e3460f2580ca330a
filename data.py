"""Data for D2VLM: annotations -> the evidence format.

Paper: "Experiments / implementation details" (E.T.Instruct-164K for training, E.T.Bench for testing)
and "Overall Architecture" (the two-stage response: K <evi>, </evi>, then the answer with one <evi>
per event). docs/design.md#response-format (conversion).

    load_records(path)          E.T.Instruct-164K (txt / vid) or E.T.Bench JSON/JSONL, validated
    to_evidence(record)         -> prompt, two-stage response, spans (seconds and frames)
    arrange(ev, format, level)  the response in an ablation's format (coupled, times as text, frame-level)
    render(response, spans)     <evi> -> "s - e" (the text a scorer reads)

The batches the model reads (VideoDataset, collate): batches.py.
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path, PurePosixPath

from evidence import EVI, EVI_END
from support.files import is_number, is_text, parse_json, read_text, show

VID = "<vid>"  # E.T.Instruct-164K's placeholder for a timestamp given in `tgt` / `src` (the vid variant)
DURATION_TOLERANCE = 1.0  # seconds a timestamp may run past `duration` (rounding in the annotations)
# characters of one question, answer, option or caption: 16 a token (more than any word piece of Phi-3's
# vocabulary) times Phi-3's 4096 positions; a longer text fits no context, and tokenizing it costs gigabytes
MAX_TEXT_CHARS = 65536

# E.T.Bench's tasks by the capability its table reports them under, in the table's order
# (docs/scoring-rules.md#the-overall-row; scoring.etbench.MERGED averages each group into one row); the
# other task lists derive from them
MCQ_TASKS = ("rar", "eca", "rvq")                # referring: multiple choice alone
GROUNDING_TASKS = ("tvg", "epm", "tal", "evs", "vhd")
CAPTION_TASKS = ("dvc", "slc")                   # dense captioning: g, one caption per tgt span
COMPLEX_TASKS = ("tem", "gvq")
BENCH_TASKS = MCQ_TASKS + GROUNDING_TASKS + CAPTION_TASKS + COMPLEX_TASKS
# the shape of their `tgt` field (docs/scoring-rules.md#input-file; vhd's: see _bench_answer; multiple choice
# alone has none), and the tasks with options
ONE_SPAN_TASKS = ("tvg", "epm", "gvq")           # tgt = [s, e]
SPAN_LIST_TASKS = ("tem", "tal", "evs", "dvc", "slc")  # tgt = [[s, e], ...]: the answer is a list of events
OPTION_TASKS = MCQ_TASKS + ("gvq",)              # o, the options, and p, the answer's index
# E.T.Instruct-164K's nine: the grounding and dense-captioning tasks above, and two more captioning
# tasks the release's FPO builder names (tvc, rvc); records in its format may also use E.T.Bench's
INSTRUCT_TASKS = GROUNDING_TASKS + CAPTION_TASKS + ("tvc", "rvc")
# the pretraining set's (event_videos.make_pretrain; E.T.Chat's stages 1 and 2 in miniature): an answer in
# words alone, trained as it is, with no evidence (no <evi>, no </evi>), as a model that knows no <evi> answers
PLAIN_TASKS = ("caption", "qa")
# tasks whose answer names when its events happen (every E.T.Bench task but multiple choice alone): an
# answer of one of them without a time is refused
GROUNDED_TASKS = GROUNDING_TASKS + CAPTION_TASKS + COMPLEX_TASKS
LETTERS = "ABCDE"  # multiple-choice options, in order

# Phi-3's chat format (batches.CHAT): the headers of its turns, the end of a turn, the end of a text
# (the in-code tokenizer's padding), and the one video placeholder of its user turn (model.py turns it
# into T video tokens)
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
VIDEO, END, END_OF_TEXT = "<video>", "<|end|>", "<|endoftext|>"
DEC = "[DEC]"  # the Q-Former tokenizer's bos, added to bert-base-uncased by InstructBLIP
# text a tokenizer would read as one of its special tokens, refused inside a record's text by name: ours,
# Phi-3's (<|...|>: the chat turns, <|endoftext|>, placeholders; <s> </s> <unk>), the Q-Former's (BERT's + [DEC])
RESERVED = (EVI, EVI_END, VIDEO, "<s>", "</s>", "<unk>", "[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]", DEC)
_CHAT_TOKEN = re.compile(r"<\|\w{1,40}\|>")
SPAN_STYLES = ("seconds", "release")  # how render writes a span (see render)
ON_ERROR = ("raise", "skip")  # what load_records (and the CLIs' --on-error) do with a bad record


class BadRecord(ValueError):
    """A record that cannot be used; `field` names the offending field."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"field '{field}': {reason}")
        self.field, self.reason = field, reason


class Records(list):
    """The records of one file, plus what was skipped (`on_error="skip"`): a list of 'index: reason'."""

    def __init__(self, items, path, skipped):
        super().__init__(items)
        self.path, self.skipped = str(path), skipped


# ---------------------------------------------------------------------------------------------
# Reading and validating annotation files


def load_records(path, on_error: str = "raise") -> Records:
    """Read an E.T.Instruct-164K or E.T.Bench annotation file (.json list or .jsonl) and validate
    every record (fields per task, `tgt` shape, finite times inside the video, <vid> counts, and
    that it converts to the evidence format). A bad record raises ValueError naming file, index and
    field; with on_error="skip" it is left out, counted in `.skipped` and reported on stderr."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be {' or '.join(map(repr, ON_ERROR))}, not {on_error!r}")
    path = Path(path)
    text = read_text(path, "annotation file")
    if path.suffix == ".jsonl":
        parsed = [parse_json(line, path, n) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    else:
        parsed = parse_json(text, path)
        if not isinstance(parsed, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(parsed).__name__}")
    if not parsed:
        raise ValueError(f"{path}: holds no records")
    good, skipped = [], []
    for i, rec in enumerate(parsed):
        try:
            to_evidence(rec)  # validates as it converts
        except BadRecord as e:
            if on_error == "raise":
                raise ValueError(f"{path}: record {i}: {e}") from None
            skipped.append(f"{i}: {e}")
            continue
        good.append(rec)
    if skipped:
        print(f"{path}: skipped {len(skipped)} of {len(parsed)} records (first: record {skipped[0]})",
              file=sys.stderr)
    return Records(good, path, skipped)


def check_number(x, field: str) -> float:
    """x as a float, when it is a finite number (not a bool, not an integer beyond float's range);
    BadRecord naming the field otherwise."""
    if is_number(x):
        return float(x)
    if isinstance(x, int) and not isinstance(x, bool):  # finite, but beyond float's range
        raise BadRecord(field, f"expected a finite number, got an integer of {len(str(x))} digits")
    raise BadRecord(field, f"expected a finite number, got {show(x)}")


def check_text(v, field: str, allow=()) -> str:
    """v, when it is text a record may hold: a non-empty string, UTF-8 (no lone surrogate), at most
    MAX_TEXT_CHARS characters, none of the RESERVED or chat-template tokens (but those in `allow`:
    the <evi> of a converted record). BadRecord naming the field otherwise."""
    if not isinstance(v, str) or not v.strip():
        raise BadRecord(field, "missing or not a non-empty string")
    if len(v) > MAX_TEXT_CHARS:
        raise BadRecord(field, f"{len(v):,} characters, more than {MAX_TEXT_CHARS:,}: no model context holds it")
    if not is_text(v):
        bad = next(i for i, c in enumerate(v) if not is_text(c))
        raise BadRecord(field, f"not UTF-8 text: a lone surrogate {v[bad]!r} at character {bad}")
    token = next((t for t in RESERVED if t in v and t not in allow), None) or (_CHAT_TOKEN.search(v) or [None])[0]
    if token is not None:
        raise BadRecord(field, f"contains {token!r}, a reserved token (special to the model's tokenizers)")
    return v


def _span(x, field, duration):
    if not isinstance(x, (list, tuple)) or len(x) != 2:
        raise BadRecord(field, f"expected a span [start, end], got {show(x)}")
    return _check_spans([[check_number(x[0], field), check_number(x[1], field)]], field, duration)[0]


def check_spans(x, field: str, duration: float, empty: bool = False) -> list:
    """x as [[start, end], ...] in seconds, each finite and 0 <= start <= end <= duration (+ the
    tolerance); an empty list only when `empty`. BadRecord naming the field otherwise."""
    if not isinstance(x, list) or not (x or empty):
        raise BadRecord(field, f"expected a {'' if empty else 'non-empty '}list of spans, got {show(x)}")
    return [_span(v, field, duration) for v in x]


# ---------------------------------------------------------------------------------------------
# Timestamps in text -> <evi>

_NUM = r"(\d+(?:\.\d+)?)"
_UNIT = r"(?:\s*(?:seconds?|secs?|s)\b)"
# a pair: "3 - 8", "3-8", "3 to 8", "from 3s to 8s", "3 seconds - 8 seconds" ("from" stays in the text)
_PAIR = rf"{_NUM}{_UNIT}?\s*(?:-|–|\s+to\s+)\s*{_NUM}"
# a single time: a number followed by a unit, directly or through a list ("at 3, 5 and 8 seconds")
_POINT = rf"{_NUM}(?=(?:\s*(?:,|and|or|, and)\s*\d+(?:\.\d+)?)*{_UNIT})"
_TXT_TIME = re.compile(rf"(?<![\w.]){_PAIR}|(?<![\w.]){_POINT}")
# what the patterns above would misread: a minus sign before a time ("-3.0 - 5.0" is not [3, 5]) and
# nan / inf next to a time ("nan - 5.0 seconds" is not a point at 5)
# a minus directly before a time (a number then a unit, or a range), not inside a word or number
_SIGN = re.compile(rf"(?<![\w.])[-–](?=\d+(?:\.\d+)?(?:{_UNIT}|\s*(?:-|–|\bto\b)\s*\d))")
_NOT_A_NUMBER = re.compile(r"(?i)(?<![\w.])(?:nan|inf(?:inity)?)\s*(?:-|–|\bto\b)\s*\d|\d\s*(?:-|–|\bto\b)\s*(?:nan|inf(?:inity)?)\b")
# a time written otherwise than as digits with a decimal point (a sentence's full stop may follow), where a
# time stands: before a unit or a range's dash or "to", or after the dash or "to". "0,5 - 5,0 seconds" would
# read as [5, 5], "1e1 - 2e1", "10... - 12.." and "1:30 - 2:00" as nothing or as a wrong span
_WRITTEN_TIME = re.compile(rf"(?<![\w.,:])(\d[\d.,:eE+]*)(?=\s*(?:-|–|to\b)|{_UNIT})|(?:-|–|\bto)\s*(\d[\d.,:eE+]*)")
_PLAIN_TIME = re.compile(r"\d+(?:\.\d+)?\.?")
_VID_TIME = re.compile(rf"{re.escape(VID)}\s*(?:-|–|\s+to\s+)\s*{re.escape(VID)}|{re.escape(VID)}")


def extract_times(text: str, values=None):
    """Replace each timestamp expression of `text` by one <evi> and return (template, spans).
    With `values` (vid variant) the placeholders are <vid> tokens filled in order from `values`
    (a flat list); otherwise the numbers are read from the text (txt variant). A pair gives a span
    [a, b], a single time a point [a, a]. Raises BadRecord on a count mismatch, a negative time or
    nan / inf where a time stands."""
    spans, out, last = [], [], 0
    if values is None:
        bad = _NOT_A_NUMBER.search(text)
        if bad:
            raise BadRecord("text", f"a timestamp that is not a number: {text[max(0, bad.start() - 10):bad.end() + 10]!r}")
        for bad in _SIGN.finditer(text):
            if not text[:bad.start()].rstrip()[-1:].isdigit():  # "3 -5" is a range, "at -5" a negative time
                raise BadRecord("text", f"a negative timestamp: {text[max(0, bad.start() - 10):bad.end() + 10]!r}")
        for m in _WRITTEN_TIME.finditer(text):
            if not _PLAIN_TIME.fullmatch((m.group(1) or m.group(2)).rstrip(",")):
                raise BadRecord("text", f"a time not written as plain seconds (digits and a decimal point): "
                                        f"{text[max(0, m.start() - 10):m.end() + 10]!r}")
        for m in _TXT_TIME.finditer(text):
            a = m.group(1) if m.group(1) is not None else m.group(3)
            b = m.group(2) if m.group(1) is not None else a
            spans.append([float(a), float(b)])
            out += [text[last:m.start()], EVI]
            last = m.end()
    else:
        n = text.count(VID)
        if n != len(values):
            raise BadRecord(VID, f"{n} {VID} placeholders but {len(values)} values")
        vals = iter(values)
        for m in _VID_TIME.finditer(text):
            a = next(vals)
            b = next(vals) if m.group(0) != VID else a
            spans.append([a, b])
            out += [text[last:m.start()], EVI]
            last = m.end()
    out.append(text[last:])
    return "".join(out), spans


def _check_spans(spans, field, duration):
    for s, e in spans:
        if not (math.isfinite(s) and math.isfinite(e)):
            raise BadRecord(field, f"timestamp {s} - {e} is not finite")
        if not 0 <= s <= e <= duration + DURATION_TOLERANCE:
            raise BadRecord(field, f"span [{s:g}, {e:g}] is not 0 <= start <= end <= duration ({duration:g} s)")
    return spans


def span_text(span) -> str:
    """[s, e] in seconds -> "s - e", as E.T.Instruct writes spans."""
    return "{} - {}".format(*map(fmt_time, span))


def fmt_time(x: float) -> str:
    """Seconds as text, as E.T.Instruct writes them: 1 or 2 decimals (12 -> '12.0', 3.25 -> '3.25')."""
    s = f"{x:.2f}"
    return s[:-1] if s.endswith("0") else s


def to_frames(spans, fps: float = 1.0):
    """Spans in seconds -> inclusive frame-index spans at `fps` (frame k shows t = k/fps): each time
    to the nearest frame, a tie to the even one, as the release rounds times (Python's round for the
    grounding targets, torch.round for the injected spans): [2.5, 5.5] -> [2, 6]."""
    return [[round(s * fps), round(e * fps)] for s, e in spans]


def render(response: str, spans, style: str = "seconds", fps: float = 1.0) -> str:
    """Replace the i-th <evi> of `response` by spans[i] (seconds). style "seconds": "s - e" as
    E.T.Instruct writes times, adjacent <evi> (stage 1) joined by ", " so the evidence part stays
    parseable; style "release": as the D2VLM release writes them, "{s} - {e} " with the inclusive
    integer frame indices at `fps` (seconds at 1 fps), nothing joined."""
    if response.count(EVI) != len(spans):
        raise ValueError(f"{response.count(EVI)} {EVI} tokens but {len(spans)} spans")
    if style not in SPAN_STYLES:
        raise ValueError(f"span style {style!r}: expected one of {', '.join(SPAN_STYLES)}")
    out, k, prev = [], 0, None
    for piece in re.split(f"({re.escape(EVI)})", response):
        if piece == EVI:
            if style == "release":
                out.append("{} - {} ".format(*to_frames([spans[k]], fps)[0]))
            else:
                out.append((", " if prev == EVI else "") + span_text(spans[k]))
            k += 1
        elif piece:
            out.append(piece)
        prev = piece if piece else prev
    return "".join(out)


def answer_text(rendered: str) -> str:
    """The stage-2 part of a rendered response (everything after the first </evi>)."""
    return rendered.partition(EVI_END)[2]


def to_evidence(record: dict, fps: float = 1.0) -> dict:
    """Convert one E.T.Instruct-164K (`conversations`) or E.T.Bench (`q`) record to D2VLM's format:

    prompt            the user question, question timestamps replaced by <evi>
    response          K <evi>, </evi>, then the answer with one <evi> per event (2K <evi> in all);
                      empty stage 1 for multiple choice; the answer alone for PLAIN_TASKS
    spans, frames     the K answer events, [s, e] in seconds / in frame indices at `fps`
    question_spans, question_frames   the same for the question's <evi>
    Raises BadRecord (naming the field) on anything it cannot convert.
    """
    if not isinstance(record, dict):
        raise BadRecord("record", f"expected an object, got {type(record).__name__}")
    task = record.get("task")
    if not isinstance(task, str) or not task:
        raise BadRecord("task", "missing or not a string")
    check_text(record.get("source"), "source")
    check_video_path(record.get("video"))
    duration = check_number(record.get("duration"), "duration")
    if duration <= 0:
        raise BadRecord("duration", f"must be positive, got {duration:g}")
    src = record.get("src")
    if src is not None:
        if not isinstance(src, list):
            raise BadRecord("src", f"expected a flat list of seconds, got {show(src)}")
        src = [check_number(v, "src") for v in src]
    if "conversations" in record:
        if task not in INSTRUCT_TASKS + BENCH_TASKS + PLAIN_TASKS:
            raise BadRecord("task", f"unknown task {show(task)} (E.T.Instruct-164K: {', '.join(INSTRUCT_TASKS)}; "
                                    f"E.T.Bench: {', '.join(BENCH_TASKS)}; pretraining: {', '.join(PLAIN_TASKS)})")
        question, answer = _instruct_turns(record)
        tgt = record.get("tgt")
        if tgt is not None:
            if not isinstance(tgt, list):
                raise BadRecord("tgt", f"expected a flat list of seconds, got {show(tgt)}")
            tgt = [check_number(v, "tgt") for v in tgt]
        if VID in answer or tgt:
            template, spans = _extract(answer, tgt or [], "tgt")
        else:
            template, spans = _extract(answer, None, "conversations")
        if spans and task in PLAIN_TASKS:
            raise BadRecord("conversations", f"a {task} answer is words alone, this one gives times: {show(answer)}")
        if not spans and task in GROUNDED_TASKS:  # it would train as an answer about no event
            raise BadRecord("conversations", f"a {task} answer must give its events' times (as 's - e seconds'), "
                                             f"this one gives none: {show(answer)}")
        _check_spans(spans, "tgt" if tgt else "conversations", duration)
        qfield = "src" if VID in question else "conversations"
    elif "q" in record:
        question = check_text(record.get("q"), "q")
        template, spans = _bench_answer(record, task, duration)
        qfield = "src" if VID in question else "q"
    else:
        raise BadRecord("conversations", "record has neither 'conversations' (E.T.Instruct) nor 'q' (E.T.Bench)")
    prompt, qspans = _extract(question, (src or []) if VID in question else None, qfield)
    _check_spans(qspans, qfield, duration)
    response = template if task in PLAIN_TASKS else EVI * len(spans) + EVI_END + template
    return {"task": task, "source": record["source"], "video": record["video"], "duration": duration,
            "prompt": prompt, "response": response, "spans": spans, "frames": to_frames(spans, fps),
            "question_spans": qspans, "question_frames": to_frames(qspans, fps)}


def arrange(ev: dict, response_format: str = "factorized", evidence_level: str = "event") -> dict:
    """to_evidence's record in another response format or evidence level (the paper's ablations;
    config.RESPONSE_FORMATS, EVIDENCE_LEVELS). Returns a copy whose `response` is

    factorized        K <evi>, </evi>, the answer with one <evi> per event (to_evidence's; 2K <evi>)
    coupled           the answer alone, one <evi> per event (A1: no stage 1, no </evi>; K <evi>)
    factorized_text   K <evi>, </evi>, the answer with its times written as text (A2; K <evi>)

    and, at evidence_level "frame" (B1), every answer <evi> doubled: one token per boundary, start
    then end. `evi_frames` is the inclusive frame span each answer <evi> token is trained to ground,
    in order: the event's span, or at frame level the boundary frame [t, t]. Question <evi> are left
    as they are (they carry the question's times, not the model's evidence)."""
    K, frames = len(ev["spans"]), ev["frames"]
    if ev["task"] in PLAIN_TASKS:  # no evidence to arrange
        return {**ev, "evi_frames": []}
    if "rejected" in ev and (response_format, evidence_level) != ("factorized", "event"):
        raise ValueError("preference pairs are made for the factorized, event-level response only")
    if ev["response"].count(EVI) != 2 * K or ev["response"][:len(EVI * K + EVI_END)] != EVI * K + EVI_END:
        raise ValueError(f"arrange: expected to_evidence's response (K = {K} <evi>, {EVI_END}, the answer), "
                         f"got {ev['response']!r}")
    answer = ev["response"][len(EVI * K + EVI_END):]
    if response_format == "factorized":
        response, per_token = ev["response"], frames * 2
    elif response_format == "coupled":
        response, per_token = answer, frames
    elif response_format == "factorized_text":
        response, per_token = EVI * K + EVI_END + render(answer, ev["spans"]), frames
    else:
        raise ValueError(f"response_format {response_format!r}: expected factorized, coupled or factorized_text")
    if evidence_level == "frame":
        response = response.replace(EVI, EVI * 2)
        per_token = [b for s, e in per_token for b in ([s, s], [e, e])]
    elif evidence_level != "event":
        raise ValueError(f"evidence_level {evidence_level!r}: expected event or frame")
    return {**ev, "response": response, "evi_frames": per_token}


def pair_boundaries(text: str, spans):
    """Frame-level output (B1) -> event-level: each run of adjacent <evi> in `text` is read as
    (start, end) pairs, each pair one <evi> with the span [min, max] of its two boundaries (seconds or
    frames); an unpaired last boundary of a run is a point [t, t]. Returns (text, spans)."""
    if text.count(EVI) != len(spans):
        raise ValueError(f"{text.count(EVI)} {EVI} tokens but {len(spans)} spans")
    out, events, k = [], [], 0
    for piece in re.split(f"((?:{re.escape(EVI)})+)", text):
        if not piece.startswith(EVI):
            out.append(piece)
            continue
        n = piece.count(EVI)
        for j in range(0, n, 2):
            b = [spans[k + j][0], spans[k + j + 1][0]] if j + 1 < n else [spans[k + j][0]] * 2
            events.append([min(b), max(b)])
            out.append(EVI)
        k += n
    return "".join(out), events


def _extract(text, values, field):
    try:
        return extract_times(text, values)
    except BadRecord as e:
        raise BadRecord(field, e.reason) from None


def check_video_path(v) -> str:
    """v, when it is a relative path inside the video folder (no "..", not absolute, no drive);
    BadRecord naming the field 'video' otherwise. (Symbolic links are followed and checked by
    VideoDataset, on disk.)"""
    if not isinstance(v, str) or not v or not is_text(v) or "\x00" in v:
        raise BadRecord("video", f"missing or not a path: {show(v)}")
    path = PurePosixPath(v.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or re.match(r"[A-Za-z]:", v):
        raise BadRecord("video", f"{show(v)} must be a relative path inside the video folder")
    return v


def _instruct_turns(record):
    conv = record["conversations"]
    if (not isinstance(conv, list) or len(conv) != 2 or not all(isinstance(t, dict) for t in conv)
            or [t.get("from") for t in conv] != ["human", "gpt"]):
        raise BadRecord("conversations", "expected one human turn followed by one gpt turn")
    q, a = (check_text(t.get("value"), "conversations") for t in conv)
    return q.replace("<image>", "").strip(), a.strip()


def _options(record):
    o, p = record.get("o"), record.get("p")
    if not isinstance(o, list) or len(o) not in (4, 5):
        raise BadRecord("o", f"expected a list of 4 or 5 options, got {show(o)}")
    for v in o:
        if isinstance(v, list) and len(v) == 2:
            check_number(v[0], "o"), check_number(v[1], "o")
        else:
            check_text(v, "o")
    if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < len(o):
        raise BadRecord("p", f"expected an option index in 0..{len(o) - 1}, got {show(p)}")
    opt = o[p] if isinstance(o[p], str) else "{} - {}".format(*o[p])
    return f"({LETTERS[p]}) {opt}"


def _bench_answer(record, task, duration):
    """The ground-truth answer of an E.T.Bench record, phrased as E.T.Instruct answers are."""
    tgt = record.get("tgt")
    if task in MCQ_TASKS:
        return _options(record), []
    if task in ("tvg", "epm"):
        return f"The event happens in {EVI} seconds.", [_span(tgt, "tgt", duration)]
    if task == "gvq":
        return f"{_options(record)}. The evidence is in {EVI} seconds.", [_span(tgt, "tgt", duration)]
    if task == "vhd":
        if isinstance(tgt, list) and tgt and isinstance(tgt[0], list) and tgt[0] and isinstance(tgt[0][0], list):
            spans = [s for ann in tgt for s in check_spans(ann, "tgt", duration)]
        else:
            spans = check_spans(tgt, "tgt", duration)
        s, e = max(spans, key=lambda x: x[1] - x[0])  # a point inside the longest highlight span
        return f"The highlight is at {EVI} seconds.", [[round((s + e) / 2, 1)] * 2]
    if task in SPAN_LIST_TASKS:
        spans = check_spans(tgt, "tgt", duration)
        if task in CAPTION_TASKS:
            g = record.get("g")
            if not isinstance(g, list) or len(g) != len(spans):
                raise BadRecord("g", f"expected {len(spans)} captions (one per tgt span), got {show(g)}")
            for c in g:
                check_text(c, "g")
            return "\n".join(f"{EVI} seconds, {c.strip()}" for c in g), spans
        return ", ".join([EVI] * len(spans)) + " seconds.", spans
    raise BadRecord("task", f"unknown E.T.Bench task {show(task)} (expected one of {', '.join(BENCH_TASKS)})")

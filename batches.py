"""Batches for D2VLM: records in the evidence format (data.py) + their frames (video.py) -> the
tensors the model reads, in Phi-3's chat format. Paper: "Experiments / implementation details".

    VideoDataset(records, videos, tokenizer, cfg)   every record checked, every video pre-flighted, the
                                                    lengths counted, before any weight is loaded
    collate(samples, tokenizer, qformer_tokenizer, cfg)   right-padded tensors; preference pairs packed
    CHAT, IGNORE                                    the chat format; the label of untrained tokens
    filter_records(records, cfg)                    the release's training-data filters (durations, answer length)
    micro_batches(...), readable(stream, limit)     the training loop's stream of micro-batches, from any
                                                    (epoch, micro) on; the next one that holds a sample
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from data import (ASSISTANT, DURATION_TOLERANCE, END, SYSTEM, USER, VIDEO, Records, arrange, load_records, to_evidence,
                  to_frames)
from evidence import EVI
from video import FrameCache, normalize, probe_all

# how far a record's `duration` may be from its video's length (VideoDataset): 2 s or 10 %, whichever is more
DURATION_SLACK_S, DURATION_SLACK_FRACTION = 2.0, 0.1
CHAT = (f"{SYSTEM}\n{{system}}{END}\n{USER}\n{VIDEO}\n{{prompt}}{END}\n{ASSISTANT}\n", f"{{response}}{END}")
FRAME_CACHE_BYTES = 2**30  # decoded frames a VideoDataset keeps (per process): every synthetic video fits
IGNORE = -100  # the label of tokens that are not trained on (the prompt, padding)


class VideoDataset(torch.utils.data.Dataset):
    """Training/eval samples from an annotation file and its video folder: {"evidence", "frames"}.

    Every record is validated and converted up front (load_records / to_evidence), every video file
    must exist and pass the pre-flight check (video.probe_all: opens, decodes, not truncated; spans
    past its last frame are counted in `.past_end` and reported), and the chat-formatted length
    (prompt + response tokens, the video placeholder replaced by one token per frame, counted from
    the video's last frame, so a video is never cut) must fit `cfg.max_len`.
    A record that is too long is skipped, never cut through the response; the count is in
    `.skipped["too_long"]` (and with on_error="skip": bad records in `.skipped["invalid"]`, records
    without a video file or with an unreadable one in `["missing_video"]` / `["bad_video"]`).
    Per kept record: `.items` (its evidence), `.kept` (its index in `records`), `.n_frames` (the frames
    it samples) and `.budget` (the frames that would still fit)."""

    def __init__(self, records, videos, tokenizer, cfg, on_error: str = "raise", with_response: bool = True):
        # records: an annotation file, or a list of raw records / evidence-format records (e.g. pairs)
        recs = records if isinstance(records, list) else load_records(records, on_error)
        where = getattr(recs, "path", "records")
        videos = Path(videos)
        if not videos.is_dir():
            raise FileNotFoundError(f"{videos}: video folder not found")
        self.videos, self.cfg, self.with_response, self.tokenizer = videos, cfg, with_response, tokenizer
        self.frames = FrameCache(FRAME_CACHE_BYTES)  # the tasks of one video share its frames
        evs = [r if "response" in r else to_evidence(r, cfg.fps) for r in recs]
        if with_response:  # the response format and evidence level of cfg (the ablations)
            evs = [arrange(ev, cfg.response_format, cfg.evidence_level) for ev in evs]
        if not evs:
            raise ValueError(f"{where}: no records to make samples of")
        root = videos.resolve()
        missing = [(i, why) for i, ev in enumerate(evs) for why in [_not_in_folder(videos / ev["video"], root)] if why]
        if missing and on_error == "raise":
            i, why = missing[0]
            raise FileNotFoundError(f"{where}: record {i}: field 'video': {why} ({len(missing)} records have no "
                                    f"video file in {videos})")
        gone = {i for i, _ in missing}
        bad, mismatch, past_end, ends = self._check_videos(evs, gone, where, on_error)
        gone |= {i for i, _ in bad + mismatch}
        n_text = [len(x) for x in prompt_ids(tokenizer, cfg, [ev["prompt"] for ev in evs])]
        if with_response:
            resp = [CHAT[1].format(response=ev["response"]) for ev in evs]
            n_text = [a + len(b) for a, b in zip(n_text, tokenizer(resp, add_special_tokens=False)["input_ids"])]
            rej = [CHAT[1].format(response=ev["rejected"]["response"]) if "rejected" in ev else "" for ev in evs]
            n_text = [a + len(b) for a, b in zip(n_text, tokenizer(rej, add_special_tokens=False)["input_ids"])]
        self.items, self.budget, self.kept, self.n_frames, too_long = [], [], [], [], 0
        for i, (ev, n) in enumerate(zip(evs, n_text)):
            if i in gone:
                continue
            frames = math.floor(ends[i] * cfg.fps) + 1  # sample_frames keeps k/fps <= the last frame's time
            if n - 1 + frames > cfg.max_len:
                too_long += 1
                continue
            self.items.append(ev)
            self.kept.append(i)  # the record's position in `records`
            self.n_frames.append(frames)  # what __getitem__ samples
            self.budget.append(cfg.max_len - n + 1)  # frames that still fit
        self.where = where
        self.skipped = {"invalid": len(getattr(recs, "skipped", ())), "missing_video": len(missing),
                        "bad_video": len(bad), "bad_duration": len(mismatch), "too_long": too_long}
        self.past_end = past_end  # records with a span past their video's last frame (kept: clamped to it)
        if missing or bad or mismatch or too_long:
            first = "".join(f" (first: record {i}: {why})" for i, why in (missing + bad + mismatch)[:1])
            print(f"{where}: skipped {self.skipped_text()}{first}; {len(self.items)} left", file=sys.stderr)
        if past_end:
            i, msg = past_end[0]
            print(f"{where}: {len(past_end)} records have a span past the last frame of their video, clamped to it "
                  f"(first: record {i}: {msg})", file=sys.stderr)

    def skipped_text(self) -> str:
        """What the checks left out, as a phrase: "2 longer than max_len=512, 1 without a video file"."""
        what = {"invalid": "invalid", "missing_video": "without a video file", "bad_video": "with an unreadable video",
                "bad_duration": "whose duration is not their video's", "too_long": f"longer than max_len={self.cfg.max_len}"}
        return ", ".join(f"{n} {what[k]}" for k, n in self.skipped.items() if n) or "nothing"

    def _check_videos(self, evs, gone, where, on_error):
        """The pre-flight check (video.probe_all) of every record's video. Returns (bad, mismatch,
        past_end, ends): (record, message) pairs of unreadable videos and of records whose `duration`
        is neither the duration their video's header declares nor where its frames end (a variable
        frame rate), by more than DURATION_SLACK_S and DURATION_SLACK_FRACTION (both an error unless
        on_error="skip"), and of records whose spans run past their video's last frame
        by more than DURATION_TOLERANCE; {record: the time of its video's last frame} (what the frame
        count, and so the length, follows from)."""
        paths = {i: self.videos / ev["video"] for i, ev in enumerate(evs) if i not in gone}
        probes = probe_all(paths.values())
        bad = [(i, probes[p]) for i, p in paths.items() if isinstance(probes[p], str)]
        if bad and on_error == "raise":
            raise ValueError(f"{where}: record {bad[0][0]}: field 'video': {bad[0][1]} ({len(bad)} records have "
                             "videos that cannot be read; --on-error skip leaves them out)")
        mismatch = []
        for i, p in paths.items():
            if isinstance(probes[p], str) or "duration" not in evs[i]:
                continue
            declared, end, duration = probes[p]["declared"], probes[p]["end"], evs[i]["duration"]
            off = [abs(duration - x) > max(DURATION_SLACK_S, DURATION_SLACK_FRACTION * x) for x in (declared, end)
                   if x is not None]  # the header's duration, or where the frames end (a variable frame rate)
            if all(off):
                two = declared is not None and abs(declared - end) > DURATION_SLACK_S
                length = f"{declared:.1f} s long by its header, its frames end at {end:.1f} s" if two else \
                    f"{declared or end:.1f} s long"
                mismatch.append((i, f"{duration:g} s, its video {p} is {length}"))
        if mismatch and on_error == "raise":
            i, msg = mismatch[0]
            raise ValueError(f"{where}: record {i}: field 'duration': {msg} ({len(mismatch)} records are off by more "
                             f"than {DURATION_SLACK_S:g} s and {DURATION_SLACK_FRACTION:.0%}; --on-error skip leaves them out)")
        past_end = []
        for i, p in paths.items():
            if isinstance(probes[p], str):
                continue
            ev, end = evs[i], probes[p]["end"]
            spans = ev["spans"] + ev["question_spans"] + ev.get("rejected", {}).get("evi_spans", [])
            last = max([e for _, e in spans], default=0.0)
            if last > end + DURATION_TOLERANCE:
                past_end.append((i, f"span end {last:g} s, the video's frames end at {end:.1f} s"))
        ends = {i: probes[p]["end"] for i, p in paths.items() if not isinstance(probes[p], str)}
        return bad, mismatch, past_end, ends

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        """{"evidence", "frames", "index"}; a video that fails now (changed since the pre-flight check)
        gives {"failed": message, "index"} instead, which collate leaves out and reports."""
        ev = self.items[i]
        try:
            frames = self.frames(self.videos / ev["video"], self.cfg.fps, self.cfg.image_size, max_frames=self.budget[i])
        except (ValueError, OSError) as e:
            return {"failed": f"{self.where}: record {self.kept[i]}: {e}", "index": i}
        return {"evidence": ev, "frames": frames, "index": i}


def _not_in_folder(path: Path, root: Path) -> str | None:
    """Why `path` is not a file inside the folder `root` (resolved): missing, a loop of links, or a
    symbolic link out of the folder; None when it is one."""
    try:
        real = path.resolve(strict=True)
    except RuntimeError:  # what Path.resolve raises for a loop
        return f"{path} is a loop of symbolic links"
    except OSError:
        return f"{path} not found"
    if root not in real.parents:
        return f"{path} links to {real}, outside the video folder"
    return None if real.is_file() else f"{path} is not a file"


def collate(samples, tokenizer, qformer_tokenizer, cfg, with_response: bool = True) -> dict:
    """samples: dicts with "evidence" (to_evidence output) and "frames" (uint8 (T, 3, S, S)).
    Returns right-padded tensors: frames (B, T, 3, S, S) CLIP-normalised, frame_mask (B, T),
    input_ids / attention_mask / labels (B, L) in Phi-3's chat format (labels on the response only),
    qformer_ids / qformer_mask (B, Lq) (the question, left-truncated; within [CLS] ... [SEP] when
    cfg.qformer_special_tokens), question_spans (B, Nq, 2) and answer_spans (B, Na, 2) in frames,
    one per <evi> in order (the record's `evi_frames` from arrange; else to_evidence's: stage 1 and
    stage 2 share the event spans), clamped to the sampled frames, padded with -1. Without a
    response: prompts for generation.

    Preference samples (evidence with "rejected", see synth.py) are packed: prompt, chosen response,
    rejected response in one row, labels on both responses, and three more tensors: branch (B, L)
    (0 prompt, 1 chosen, 2 rejected), prev (B, L) (the position each token follows: the rejected
    response follows the prompt, not the chosen response) and answer_times (below). answer_spans
    then holds the chosen <evi> spans followed by the rejected ones (`evi_spans` of the rejected
    response); answer_times (B, Na, 2) float64 the same spans as written, times fps, neither rounded
    nor clamped: what FPO's grounding factor reads (fpo.response_logprob), as the paper's p_g and
    the release do.

    Samples that failed to load ({"failed": message}) are left out; their messages are in
    out["failed"] (only when there are any), and a batch of nothing but failures is {"failed": [...]}."""
    failed = [s["failed"] for s in samples if "failed" in s]
    samples = [s for s in samples if "failed" not in s]
    if not samples:
        return {"failed": failed}
    pairs = ["rejected" in s["evidence"] for s in samples]
    if any(pairs) and not all(pairs):
        raise ValueError("collate: a batch mixes preference pairs and plain samples")
    ids, labels, qids, qspans, aspans, branches, prevs, times = [], [], [], [], [], [], [], []
    front, back = _specials(qformer_tokenizer) if cfg.qformer_special_tokens else ([], [])
    room = cfg.qformer_max_text - len(front) - len(back)  # instruction tokens inside [CLS] ... [SEP]
    for s in samples:
        ev, n = s["evidence"], s["frames"].shape[0]
        p = prompt_ids(tokenizer, cfg, [ev["prompt"]])[0]
        r = tokenizer(CHAT[1].format(response=ev["response"]), add_special_tokens=False)["input_ids"] if with_response else []
        clamp = lambda spans: [[min(max(a, 0), n - 1), min(max(b, 0), n - 1)] for a, b in spans]  # noqa: E731
        spans = clamp(ev["evi_frames"] if "evi_frames" in ev else ev["frames"] * 2) if with_response else []
        branch = [0] * len(p) + [1] * len(r)
        if pairs[0]:
            rej = ev["rejected"]
            q = tokenizer(CHAT[1].format(response=rej["response"]), add_special_tokens=False)["input_ids"]
            c = len(p) + len(r)  # where the rejected response starts; its first token follows the prompt
            prev = list(range(-1, c - 1)) + [len(p) - 1] + list(range(c, c + len(q) - 1))
            r, branch = r + q, branch + [2] * len(q)
            spans += clamp(to_frames(rej["evi_spans"], cfg.fps))
            prevs.append(prev)  # FPO's grounding factor reads the times as written, in frames, unrounded
            times.append([[s * cfg.fps, e * cfg.fps] for s, e in ev["spans"] * 2 + rej["evi_spans"]])
        ids.append(p + r)
        labels.append([IGNORE] * len(p) + r)
        branches.append(branch)
        q = qformer_tokenizer(ev["prompt"].replace(EVI, ""), add_special_tokens=False)["input_ids"]
        if cfg.qformer_special_tokens:  # as the release: [CLS] + the last tokens that fit + [SEP]
            q = front + (q[-room:] if room > 0 else []) + back
        qids.append(q[-cfg.qformer_max_text:] or [qformer_tokenizer.pad_token_id])
        qspans.append(clamp(ev["question_frames"]))
        aspans.append(spans)
    T = max(s["frames"].shape[0] for s in samples)
    frames = torch.zeros(len(samples), T, *samples[0]["frames"].shape[1:])
    frame_mask = torch.zeros(len(samples), T, dtype=torch.bool)
    for i, s in enumerate(samples):
        frames[i, :len(s["frames"])] = normalize(s["frames"])
        frame_mask[i, :len(s["frames"])] = True
    input_ids, attention_mask = _pad(ids, tokenizer.pad_token_id)
    qformer_ids, qformer_mask = _pad(qids, qformer_tokenizer.pad_token_id)
    out = {"frames": frames, "frame_mask": frame_mask, "input_ids": input_ids, "attention_mask": attention_mask,
           "labels": _pad(labels, IGNORE)[0], "qformer_ids": qformer_ids, "qformer_mask": qformer_mask,
           "question_spans": _pad_spans(qspans), "answer_spans": _pad_spans(aspans)}
    if pairs[0]:
        out["branch"], out["prev"] = _pad(branches, 0)[0], _pad(prevs, 0)[0]
        out["answer_times"] = _pad_spans(times, torch.float64)
    if all("index" in s for s in samples):  # dataset positions (FPO looks up reference log-probs by them)
        out["index"] = torch.tensor([s["index"] for s in samples])
    if failed:
        out["failed"] = failed
    return out


def prompt_ids(tokenizer, cfg, prompts) -> list:
    """The LLM's token ids of each prompt in Phi-3's chat format (CHAT[0], cfg.system_prompt): the
    text as one piece without special tokens, or with cfg.prompt_as_released as the release
    tokenizes it: split at the video, each piece with the tokenizer's default special tokens, the
    first piece's leading ones kept and the later pieces' dropped (Phi-3: one leading <s>, and the
    text after the video tokenized as a new text, so it starts with a word boundary)."""
    chats = [CHAT[0].format(system=cfg.system_prompt, prompt=p) for p in prompts]
    if not cfg.prompt_as_released:
        return tokenizer(chats, add_special_tokens=False)["input_ids"]
    front, video = _specials(tokenizer)[0], tokenizer.convert_tokens_to_ids(VIDEO)
    out = []
    for chat in chats:
        pieces = [tokenizer(x)["input_ids"] for x in chat.split(VIDEO)]
        ids = pieces[0]
        for piece in pieces[1:]:
            ids = ids + [video] + (piece[len(front):] if piece[:len(front)] == front else piece)
        out.append(ids)
    return out


def _specials(tokenizer):
    """(the ids a tokenizer puts before a text, those it puts after), e.g. ([CLS], [SEP]) for BERT."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    wrapped = tokenizer("a")["input_ids"]
    i = next(k for k in range(len(wrapped) - len(plain) + 1) if wrapped[k:k + len(plain)] == plain)
    return wrapped[:i], wrapped[i + len(plain):]


def _pad(rows, value):
    L = max(len(r) for r in rows)
    out = torch.full((len(rows), L), value, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = True
    return out, mask


def _pad_spans(rows, dtype=torch.long):
    out = torch.full((len(rows), max([len(r) for r in rows] + [0]), 2), -1, dtype=dtype)
    for i, r in enumerate(rows):
        if r:
            out[i, :len(r)] = torch.tensor(r, dtype=dtype)
    return out


def filter_records(records: Records, cfg) -> tuple:
    """The release's training-data filters (cfg.min_duration / max_duration in seconds, of the
    record's `duration`; cfg.max_answer_words, the answer split on spaces; 0 switches one off).
    Returns (the records kept, as Records of the same file; counts {"short", "long", "wordy"})."""
    counts, kept = {"short": 0, "long": 0, "wordy": 0}, []
    for r in records:
        conv = r.get("conversations")
        answer = conv[1]["value"] if conv else r.get("a", "")
        if cfg.min_duration and r["duration"] < cfg.min_duration:
            counts["short"] += 1
        elif cfg.max_duration and r["duration"] > cfg.max_duration:
            counts["long"] += 1
        elif cfg.max_answer_words and len(answer.split(" ")) > cfg.max_answer_words:
            counts["wordy"] += 1
        else:
            kept.append(r)
    return Records(kept, records.path, records.skipped), counts


def readable(stream, limit):
    """The next micro-batch of `stream` that holds a sample, the messages of the samples that failed
    on the way (videos broken since the pre-flight check), and how many micro-batches held none (each
    replaced by the next: every rank still runs its accumulation's passes). SystemExit after `limit`
    micro-batches in a row with nothing readable."""
    failed = []
    for n in range(limit):
        batch = next(stream)
        failed += batch.pop("failed", [])
        if "input_ids" in batch:
            return batch, failed, n
    raise SystemExit(f"{limit} micro-batches in a row could not be read, an epoch's worth: the videos have failed "
                     f"since the pre-flight check (first: {failed[0]})")


def micro_batches(ds, sampler, collate, *, batch_size: int, workers: int, pin_memory: bool, start=(0, 0)):
    """Micro-batches of batch_size from start = (epoch, micro-batch) on, forever; the order is a
    function of (seed, epoch) only."""
    epoch, micro = start
    while True:
        sampler.set_epoch(epoch)
        order = list(sampler)[micro * batch_size:]
        # own generator: creating the loader must not draw from the global RNG (exact resume)
        yield from DataLoader(ds, batch_size=batch_size, sampler=order, collate_fn=collate, num_workers=workers,
                              generator=torch.Generator(), pin_memory=pin_memory)
        epoch, micro = epoch + 1, 0

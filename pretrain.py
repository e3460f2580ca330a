"""The miniature's starting point: what the paper's model knows before D2VLM's SFT, learnt on the
synthetic world. Paper: "Experiments / implementation details" (D2VLM starts from E.T.Chat stage 2);
docs/release.md#what-the-starting-point-has-learnt; docs/training.md "The starting point".

The real run starts from an EVA-CLIP ViT and a Q-Former aligned to text by BLIP-2's pretraining, and
an LLM that E.T.Chat's stages 1 and 2 taught to caption videos and answer questions about them; none
of it was trained to say when. The `tiny` model has none of that. `train.py --stage pretrain` gives
it BLIP-2's first stage on clips of its own (event_videos.make_pretrain):

    phase 1  the ViT frozen, its LayerNorm, the query tokens and the Q-Former trained, each 1-fps frame
             against texts: the image-text contrastive objective (`itc_loss`: "a red circle", "no
             shape") and matching (`itm_loss`: an instruction naming an event, the Q-Former reading it
             with its queries), through heads used here only (`ItcHeads`)
    phase 2  (cfg.pretrain_epochs > 0; 0 for `tiny`: it lowered every grounding score) E.T.Chat's
             stages 1 and 2: captions of the clips and questions about them in words only
             (data.PLAIN_TASKS), the encoder as phase 1 left it (`set_trainable`)

    itc_loss(img, txt, same, temperature)     the contrastive objective, per frame (pure function)
    itm_loss(logits, match)                   the matching objective, per frame (pure function)
    FrameTexts                                the clips' frames and what each shows
    align_encoder(model, path, videos, ...)   phase 1, in place; returns the loss of each step
    set_trainable(model)                      phase 2's trained weights
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from data import BadRecord, check_video_path
from event_videos import INTRO
from support.files import read_json, show
from video import normalize, sample_frames


def itc_loss(img: torch.Tensor, txt: torch.Tensor, same: torch.Tensor, temperature: float) -> torch.Tensor:
    """BLIP-2's image-text contrastive loss with in-batch negatives. img (N, Q, d) the Q-Former's
    query outputs of N frames, projected and L2-normalised; txt (N, d) the pooled, projected,
    L2-normalised text of each frame; same (N, N) bool, texts i and j equal (every pair of equal texts
    is a positive, so a batch may repeat a text). The similarity of frame i and text j is the largest
    over the queries of img[i, q] . txt[j], over `temperature`. Returns (N,): per frame the mean of
    the image-to-text and text-to-image cross-entropies against targets spread evenly over the
    positives."""
    sim = torch.einsum("iqd,jd->ijq", img, txt).amax(-1) / temperature  # (N, N)
    target = same.float() / same.float().sum(1, keepdim=True)
    i2t = -(target * F.log_softmax(sim, 1)).sum(1)
    t2i = -(target * F.log_softmax(sim.T, 1)).sum(1)
    return (i2t + t2i) / 2


def itm_loss(logits: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
    """BLIP-2's image-text matching loss. logits (N, Q, 2): the matching head on each query output
    of the Q-Former run on a frame and a text together; match (N,) bool: the text names what the
    frame shows. The logits are averaged over the queries, then cross-entropy. Returns (N,)."""
    return F.cross_entropy(logits.mean(1), match.long(), reduction="none")


# how the matching objective asks about an event ({c}: "a red circle blinks", {np}: "a red circle"), after
# event_videos.INTRO: an instruction, as the Q-Former reads one in SFT and at inference (InstructBLIP's
# instruction-aware queries). Varied, so that the Q-Former learns to find the shape named anywhere in one
MATCH_TEMPLATES = ("answer the question: 'Does the video show that {c}?'", "tell me what happens when {c}.",
                   "describe the scene where {c}.", "look for the moment described as '{c}' and describe it.",
                   "answer the question: 'Is there {np}?'", "answer the question: 'What does {np} do?'")


class ItcHeads(nn.Module):
    """The heads of phase 1, dropped after it as BLIP-2's are when InstructBLIP is built on its
    Q-Former: two projections (qformer_width -> itc_dim) for frames and texts (contrastive), and the
    matching classifier (qformer_width -> 2)."""

    def __init__(self, cfg):
        super().__init__()
        self.vision = nn.Linear(cfg.qformer_width, cfg.itc_dim)
        self.text = nn.Linear(cfg.qformer_width, cfg.itc_dim)
        self.match = nn.Linear(cfg.qformer_width, 2)


def encode_texts(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ids, mask (N, L) -> the Q-Former's text encoding (no queries, no image), mean over the real
    tokens (N, qformer_width)."""
    h = model.qformer(input_ids=ids, attention_mask=mask).last_hidden_state
    return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


class FrameTexts:
    """The frames of the clips listed in `path` (event_videos.PRETRAIN_FRAMES: {"video", "duration",
    "frames": [text per 1-fps frame], "events": [caption of its event per frame]}) with their texts,
    decoded once: frames (F, 3, S, S) uint8, text (F,) long indices into texts (the distinct texts),
    event (F,) long indices into captions (the distinct event captions; -1: no event)."""

    def __init__(self, path, videos, cfg):
        rows = read_json(path)
        if not isinstance(rows, list) or not rows:
            raise ValueError(f"{path}: expected a non-empty list of clips")
        frames, labels, events = [], [], []
        index, caps = {}, {}
        for i, row in enumerate(rows):
            try:
                if not isinstance(row, dict):
                    raise BadRecord("record", f"expected an object, got {type(row).__name__}")
                f = sample_frames(Path(videos) / check_video_path(row.get("video")), cfg.fps, cfg.image_size)
                for field in ("frames", "events"):
                    texts = row.get(field)
                    if not isinstance(texts, list) or len(texts) < len(f) or not all(isinstance(t, str) for t in texts):
                        raise BadRecord(field, f"expected a text for each of the video's {len(f)} frames, got {show(texts)}")
            except (ValueError, OSError) as e:  # BadRecord, or a video PyAV cannot read
                raise ValueError(f"{path}: record {i}: {e}") from None
            frames.append(f)
            labels += [index.setdefault(t, len(index)) for t in row["frames"][:len(f)]]
            events += [caps.setdefault(c, len(caps)) if c else -1 for c in row["events"][:len(f)]]
        self.texts, self.captions = list(index), list(caps)
        self.frames, self.text, self.event = torch.cat(frames), torch.tensor(labels), torch.tensor(events)


def align_encoder(model, path, videos, cfg, seed: int, schedule, log=sys.stderr) -> list:
    """Phase 1, in place: itc_loss (and itm_loss when cfg.itm) over batches of cfg.itc_batch frames
    of the clips in `path` (`videos`: their folder), cfg.itc_epochs passes, AdamW at cfg.itc_lr times
    schedule(step, total, cfg.warmup) (train.lr_factor). Trains the ViT's LayerNorm, the query tokens
    and the Q-Former; the ViT stays frozen. Returns the loss of each step."""
    data = FrameTexts(path, videos, cfg)  # on the CPU, as the random draws; each batch goes to the model's device
    device = model.query_tokens.device
    tok = model.qformer_tokenizer
    enc = tok(data.texts, padding=True, add_special_tokens=False, return_tensors="pt").to(device)
    ids, mask = enc["input_ids"], enc["attention_mask"].bool()
    heads = ItcHeads(cfg).to(device)
    # as BLIP-2's first stage: the image encoder frozen, what reads it trained
    params = [*model.vision.post_layernorm.parameters(), model.query_tokens, *model.qformer.parameters(),
              *heads.parameters()]
    for p in model.parameters():
        p.requires_grad = False
    for p in params:
        p.requires_grad = True
    opt = torch.optim.AdamW(params, lr=cfg.itc_lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n = len(data.text)
    per_epoch = math.ceil(n / cfg.itc_batch)
    total = max(1, round(cfg.itc_epochs * per_epoch))
    losses, hits, matched, t0 = [], [], [], time.time()
    model.train()
    for step in range(total):
        if step % per_epoch == 0:
            order = torch.randperm(n, generator=gen)
        pick = order[(step % per_epoch) * cfg.itc_batch:][:cfg.itc_batch]
        for g in opt.param_groups:
            g["lr"] = cfg.itc_lr * schedule(step, total, cfg.warmup)
        text = data.text[pick].to(device)
        patches = model.patches(normalize(data.frames[pick]).to(device))  # the ViT is frozen: once for both objectives
        img = F.normalize(heads.vision(model.query_outputs(patches)), dim=-1)
        every = F.normalize(heads.text(encode_texts(model, ids, mask)), dim=-1)  # (U, d), the distinct texts
        loss = itc_loss(img, every[text], text[:, None] == text[None], cfg.itc_temperature).mean()
        if cfg.itm:  # each frame with an instruction naming an event: its own (half the time) or any other
            own = data.event[pick]
            asked = torch.where((torch.rand(len(own), generator=gen) < 0.5) & (own >= 0), own,
                                torch.randint(len(data.captions), own.shape, generator=gen))
            form = torch.randint(len(MATCH_TEMPLATES), own.shape, generator=gen)
            said = [data.captions[int(a)] for a in asked]
            prompts = [INTRO + MATCH_TEMPLATES[int(k)].format(c=c, np=" ".join(c.split()[:3])) for c, k in zip(said, form)]
            q = tok(prompts, padding=True, add_special_tokens=False, return_tensors="pt").to(device)
            logits = heads.match(model.query_outputs(patches, q["input_ids"], q["attention_mask"].bool()))
            match = torch.tensor([c.startswith(data.texts[int(t)] + " ") for c, t in zip(said, data.text[pick])],
                                 device=device)
            loss = loss + itm_loss(logits, match).mean()
            matched.append((logits.detach().mean(1).argmax(1) == match.long()).float().mean())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        hits.append((torch.einsum("iqd,ud->iuq", img.detach(), every.detach()).amax(-1).argmax(1) == text).float().mean())
    losses, hits, matched = (torch.stack(x).tolist() if x else [] for x in (losses, hits, matched))  # one host read
    print(f"pretrain: encoder aligned on {n} frames of {len(data.texts)} texts, {total} steps in "
          f"{time.time() - t0:.1f} s, loss {sum(losses[:10]) / min(10, len(losses)):.3f} -> "
          f"{sum(losses[-10:]) / min(10, len(losses)):.3f}; the nearest text is the frame's own for "
          f"{100 * sum(hits[-10:]) / min(10, len(hits)):.0f} % of the last steps' frames"
          + (f", matching right for {100 * sum(matched[-10:]) / min(10, len(matched)):.0f} %" if matched else ""), file=log)
    return losses


def set_trainable(model) -> None:
    """Phase 2: the encoder stays as phase 1 aligned it (the ViT, its LayerNorm, the query tokens and
    the Q-Former frozen); the aggregator, the LLM and the heads train."""
    for n, p in model.named_parameters():
        p.requires_grad = not n.startswith(("vision.", "qformer.", "query_tokens"))

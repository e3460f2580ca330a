"""Speed figures (not tests). Each ratio is measured within one run on the same machine.

    python bench.py            forward / backward time of a preset on one 32-frame video, and our
                               forward against a plain Phi-3 forward over the same number of tokens;
                               an FPO step (chosen + rejected packed in one sequence) against an SFT
                               step and against two separate forwards
"""
import argparse
import time
import warnings

import numpy as np
import torch
from transformers import Phi3ForCausalLM

import data
import fpo
import losses
import model
import synth

warnings.filterwarnings("ignore", category=FutureWarning)


def _time(fn, repeat):
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def forward_figures(preset="tiny", frames=32, repeat=5):
    cfg = model.PRESETS[preset]
    torch.manual_seed(0)
    m = model.build_model(cfg)
    ev = {"prompt": "Find the moment when a red square appears.", "frames": [[4, 9]], "question_frames": [],
          "response": f"{data.EVI}{data.EVI_END}The event happens in {data.EVI} seconds."}
    clip = torch.randint(0, 255, (frames, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    b = data.collate([{"evidence": ev, "frames": clip}], m.tokenizer, m.qformer_tokenizer, cfg)
    n_tokens = b["input_ids"].shape[1] - 1 + frames

    def fwd():
        with torch.no_grad():
            m(b)

    def fwd_bwd():
        m.zero_grad(set_to_none=True)
        out = m(b)
        (out["logits"].float().logsumexp(-1).mean() + out["sim"].float().mean()).backward()

    base = m.llm.get_base_model()
    plain = Phi3ForCausalLM(base.config)
    ids = torch.randint(0, base.config.vocab_size, (1, n_tokens))

    def plain_fwd():
        with torch.no_grad():
            plain(input_ids=ids)

    def video():
        with torch.no_grad():
            m.encode_video(b["frames"], b["frame_mask"], b["qformer_ids"], b["qformer_mask"])

    t_f, t_fb, t_p, t_v = (_time(f, repeat) for f in (fwd, fwd_bwd, plain_fwd, video))
    print(f"preset {preset}, {frames} frames, {n_tokens} LLM tokens, {torch.get_num_threads()} threads")
    print(f"  D2VLM forward            {t_f * 1e3:8.1f} ms")
    print(f"  D2VLM forward + backward {t_fb * 1e3:8.1f} ms")
    print(f"  plain Phi-3 forward      {t_p * 1e3:8.1f} ms  (same config, {n_tokens} tokens)")
    print(f"  of which video encoding  {t_v * 1e3:8.1f} ms  (ViT, Q-Former, aggregator)")
    print(f"  ratio D2VLM / plain      {t_f / t_p:8.2f}x  whole forward")
    print(f"  ratio LLM part / plain   {(t_f - t_v) / t_p:8.2f}x  (prefix pass + suffix pass, heads, <evi> injection)")


def fpo_figures(preset="tiny", frames=32, repeat=5):
    """One training step (forward + backward) of the SFT objective, of the FPO objective on a packed
    pair, and of the unpacked alternative (two SFT-style forwards, chosen and rejected)."""
    cfg = model.PRESETS[preset]
    torch.manual_seed(0)
    m = model.build_model(cfg)
    E = data.EVI
    spans = [[2, 6], [10, 15], [20, 26]]
    ev = {"task": "dvc", "duration": float(frames), "prompt": "Densely describe all the events.", "spans": spans,
          "frames": spans, "question_spans": [], "question_frames": [],
          "response": E * 3 + data.EVI_END + f"{E} seconds, a red square appears.\n{E} seconds, a blue circle "
                      f"moves left.\n{E} seconds, a green triangle grows."}
    rej = synth.perturb(ev, "shift", np.random.default_rng(0))
    clip = torch.randint(0, 255, (frames, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)

    def col(evs):
        return data.collate([{"evidence": e, "frames": clip} for e in evs], m.tokenizer, m.qformer_tokenizer, cfg)

    sft_b = col([ev])
    pair_b = col([{**ev, "rejected": rej}])
    rej_b = col([{**ev, "response": rej["response"], "spans": rej["spans"], "frames": rej["spans"]}])

    def sft_step():
        m.zero_grad(set_to_none=True)
        losses.sft_objective(m(sft_b), sft_b, cfg)["loss"].backward()

    def fpo_step():
        m.zero_grad(set_to_none=True)
        fpo.objective(m(pair_b), pair_b, cfg)["loss"].backward()

    def unpacked_step():
        m.zero_grad(set_to_none=True)
        loss = losses.sft_objective(m(sft_b), sft_b, cfg)["loss"] + losses.sft_objective(m(rej_b), rej_b, cfg)["loss"]
        loss.backward()

    t_s, t_f, t_u = (_time(f, repeat) for f in (sft_step, fpo_step, unpacked_step))
    print(f"training steps, {frames} frames, a 3-event answer ({sft_b['input_ids'].shape[1]} text tokens; "
          f"packed pair {pair_b['input_ids'].shape[1]})")
    print(f"  SFT step                 {t_s * 1e3:8.1f} ms")
    print(f"  FPO step (packed pair)   {t_f * 1e3:8.1f} ms  = {t_f / t_s:.2f}x the SFT step")
    print(f"  two separate forwards    {t_u * 1e3:8.1f} ms  = {t_u / t_s:.2f}x the SFT step")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(model.PRESETS))
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    forward_figures(a.preset, a.frames, a.repeat)
    fpo_figures(a.preset, a.frames, a.repeat)

"""model.py: parity with plain Phi-3, the attention mask, evidence injection, batched / cached
generation, real-size parameter counts, loading from checkpoint directory layouts."""
import dataclasses

import numpy as np
import pytest
import torch
from transformers import (InstructBlipConfig, InstructBlipForConditionalGeneration, OPTConfig, Phi3ForCausalLM)

import batches
import checkpoint
import config
import data
import decoding
import evidence
import model
from evidence import EVI, EVI_END


CFG = config.PRESETS["tiny"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = model.build_model(CFG).eval()
    return m


def clip(n, seed, colour=(200, 30, 30)):
    """Random-texture frames (uint8, T x 3 x S x S) with a coloured box on frames 2..4."""
    rng = np.random.default_rng(seed)
    f = rng.integers(0, 255, (n, 3, CFG.image_size, CFG.image_size), dtype=np.uint8)
    f[2:5, :, 20:60, 20:60] = np.array(colour, np.uint8)[:, None, None]
    return torch.from_numpy(f)


def sample(n, response=f"{EVI}{EVI_END}The event happens in {EVI} seconds.", spans=((2, 4),), q="Find the red box.",
           qspans=(), seed=0):
    ev = {"prompt": q, "response": response, "frames": [list(s) for s in spans],
          "question_frames": [list(s) for s in qspans]}
    return {"evidence": ev, "frames": clip(n, seed)}


def batch(m, samples, with_response=True):
    return batches.collate(samples, m.tokenizer, m.qformer_tokenizer, CFG, with_response=with_response)


def test_text_only_logits_equal_plain_phi3(tiny):
    base = tiny.llm.get_base_model()
    plain = Phi3ForCausalLM(base.config).eval()
    sd = {k.replace(".base_layer", ""): v for k, v in base.state_dict().items() if "lora_" not in k}
    plain.load_state_dict(sd, strict=True)
    ids = tiny.tokenizer(["<|user|>\nwhere is the red square?<|end|>\n<|assistant|>\nat 3.0 - 5.0 seconds",
                          "<|user|>\nhello<|end|>"], add_special_tokens=False)["input_ids"]
    input_ids, attn = batches._pad(ids, tiny.tokenizer.pad_token_id)
    b = {"input_ids": input_ids, "attention_mask": attn, "labels": torch.full_like(input_ids, -100),
         "answer_spans": torch.zeros(2, 0, 2, dtype=torch.long)}
    with torch.no_grad():
        ours = tiny(b)["logits"]
        for i, row in enumerate(ids):
            ref = plain(input_ids=torch.tensor([row])).logits[0]
            torch.testing.assert_close(ours[i, :len(row)], ref, atol=1e-5, rtol=1e-5)


def test_layout_by_hand():
    """Two samples: [a b <video> c d] with 3 frames, and [a <video> c] + 2 pads with 2 of 3 frames.
    The prefixes (text before the video + its frames) end together at column P - 1 = 4."""
    V, pad = 9, 0
    ids = torch.tensor([[1, 2, V, 3, 4], [1, V, 3, pad, pad]])
    attn = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()
    frame_mask = torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()
    lay = model.layout(ids, attn, frame_mask, V)
    assert (lay.P, lay.S) == (5, 2)
    assert lay.col.tolist() == [[0, 1, 4, 5, 6], [2, 4, 5, 0, 0]]
    assert lay.vid_col[0].tolist() == [2, 3, 4] and lay.vid_col[1, :2].tolist() == [3, 4]
    assert lay.pre_mask.tolist() == [[True] * 5, [False, False, True, True, True]]
    assert lay.suf_mask.tolist() == [[True, True], [True, False]]
    with pytest.raises(ValueError, match="one <video> token"):
        model.layout(ids, attn, torch.zeros(2, 3, dtype=torch.bool), V)


def test_the_two_passes_are_one_forward(tiny):
    """What model.layout buys: forward (the prefix run once with its cache, then the response on it)
    computes what one plain decoder run over all columns at once computes (the same embeddings, no
    cache): the logits and the <evi> similarities, on two samples of unequal lengths and frames."""
    from transformers import DynamicCache
    b = batch(tiny, [sample(8, spans=((2, 5),)), sample(5, seed=1, q="Where is the box?")])
    with torch.no_grad():
        out = tiny(b)
        prompt = tiny.encode_prompt(b)
        pos, mask, spans = tiny.answer_evidence(b)
        response = tiny.capture_evidence(prompt, pos, mask, spans)
        lay = model.layout(b["input_ids"], b["attention_mask"].bool(), b["frame_mask"], tiny.token_id[data.VIDEO])
        flat, is_video = tiny.embed_prompt(b, lay, b["frame_mask"])
        hs = tiny.run(torch.cat([flat[:, :lay.P], response], 1), torch.cat([lay.pre_mask, lay.suf_mask], 1),
                      DynamicCache(config=tiny.decoder.config), None,
                      torch.cat([is_video, torch.zeros_like(lay.suf_mask)], 1))
        logits = tiny.lm_head(hs[-1].gather(1, lay.col[..., None].expand(-1, -1, hs[-1].shape[-1])))
        match = hs[CFG.match_layer]
        feats = tiny.evi_head(match.gather(1, lay.col.gather(1, pos - 1)[..., None].expand(-1, -1, match.shape[-1])))
        frm = tiny.frm_head(match.gather(1, lay.vid_col[..., None].expand(-1, -1, match.shape[-1])))
    real = b["attention_mask"].bool()
    torch.testing.assert_close(out["logits"][real], logits[real], atol=1e-5, rtol=1e-5)
    both = mask[..., None] & b["frame_mask"][:, None, :]  # real <evi>, real frames
    torch.testing.assert_close(out["sim"][both], evidence.similarity(feats, frm)[both], atol=1e-5, rtol=1e-5)
    assert mask.sum(1).min() >= 1


def test_columns_padded_to_a_multiple_change_no_result(tiny, monkeypatch):
    """cfg.seq_multiple pads the LLM's prefix and suffix to fewer distinct shapes: the logits at the
    real positions, the <evi> similarities and features, and greedy answers stay those of the
    unpadded layout."""
    samples = [sample(8), sample(5, seed=1, q="Where is the box?")]
    b, g = batch(tiny, samples), batch(tiny, samples, with_response=False)
    with torch.no_grad():
        ref, ref_gen, P = tiny(b), decoding.generate(tiny, g, 12), tiny.encode_prompt(b).P
        monkeypatch.setattr(tiny, "cfg", dataclasses.replace(tiny.cfg, seq_multiple=16))
        pr = tiny.encode_prompt(b)
        out, gen = tiny(b), decoding.generate(tiny, g, 12)
    assert pr.P % 16 == 0 and pr.suffix.shape[1] % 16 == 0 and pr.P > P
    real = b["attention_mask"].bool()
    torch.testing.assert_close(out["logits"][real], ref["logits"][real], atol=1e-5, rtol=1e-5)
    for k in ("sim", "evi_feats"):
        torch.testing.assert_close(out[k], ref[k], atol=1e-5, rtol=1e-5)
    assert [x["tokens"] for x in gen] == [x["tokens"] for x in ref_gen]
    assert [x["spans"] for x in gen] == [x["spans"] for x in ref_gen]


def test_one_host_read_per_generated_token(tiny):
    """decoding.generate reads one value back per new token (whether to stop, whether any <evi> came),
    not one per sample: counted under gpu.HostWork on steps without an <evi>."""
    from measure import gpu
    g = batch(tiny, [sample(8), sample(5, seed=1), sample(6, seed=2)], with_response=False)
    reads = []
    for n in (3, 9):
        with torch.no_grad(), gpu.HostWork() as w:
            out = decoding.generate(tiny, g, n)
        assert all(len(o["tokens"]) == n and not o["spans"] for o in out)  # no sample stopped, no <evi>
        reads.append(w.totals()[1])
    assert (reads[1] - reads[0]) / 6 == 1


def test_merged_lora_answers_as_the_unmerged():
    """model.for_inference merges the LoRA into the LLM's weights on CUDA: greedy answers stay token
    for token (checked here on the CPU, with a LoRA far from zero)."""
    torch.manual_seed(0)
    m = model.build_model(CFG).eval()
    g = batch(m, [sample(8), sample(5, seed=1), sample(6, seed=2)], with_response=False)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        # <evi> where the first answer token would win: the <evi> path runs too
        first = decoding.generate(m, g, 1)[0]["tokens"][0]
        m.lm_head.weight[m.token_id[EVI]] = 1.01 * m.lm_head.weight[first]
        ref = decoding.generate(m, g, 16)
        m.llm.merge_adapter()
        out = decoding.generate(m, g, 16)
    assert [o["tokens"] for o in out] == [o["tokens"] for o in ref] and [o["spans"] for o in out] == [o["spans"] for o in ref]
    assert any(o["spans"] for o in ref)  # the <evi> path ran too
    for o, r in zip(out, ref):
        for p, q in zip(o["probs"], r["probs"]):
            assert p == pytest.approx(q, abs=1e-4)


def test_mask_video_bidirectional_text_causal(tiny):
    b = batch(tiny, [sample(8)])
    with torch.no_grad():
        ctx = tiny.encode_prompt(b)
        P, T = ctx.P, 8
        video = ctx.pre_hs[-1][0, P - T:]
        b2 = dict(b, frames=b["frames"].clone())
        b2["frames"][0, T - 1] += 1.0  # perturb the last frame
        video2 = tiny.encode_prompt(b2).pre_hs[-1][0, P - T:]
        assert (video2[0] - video[0]).abs().max() > 1e-4  # the first video position sees the last frame
        out = tiny(b)["logits"]
        b3 = dict(b, input_ids=b["input_ids"].clone())
        L = int(b["attention_mask"][0].sum())
        b3["input_ids"][0, L - 2] = tiny.tokenizer.convert_tokens_to_ids("a")  # perturb late text
        out3 = tiny(b3)["logits"]
    torch.testing.assert_close(out3[0, :L - 2], out[0, :L - 2], atol=0, rtol=0)
    assert (out3[0, L - 2] - out[0, L - 2]).abs().max() > 1e-4


def test_answer_evi_embedding_is_token_plus_mean_layer_states(tiny):
    b = batch(tiny, [sample(8, spans=((2, 5),))])
    seen = []
    hook = tiny.decoder.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            tiny(b)
            ctx = tiny.encode_prompt(b)
    finally:
        hook.remove()
    suffix_in = seen[1][0]  # pass 2 input
    P = ctx.P
    ids = b["input_ids"][0]
    evi_pos = (ids == tiny.token_id[EVI]).nonzero()[:, 0]
    layer = ctx.pre_hs[CFG.inject_layer][0, P - 8:]  # layer-`inject_layer` states of the 8 video tokens
    expect = tiny.decoder.embed_tokens(torch.tensor(tiny.token_id[EVI])) + layer[2:6].mean(0)
    for p in evi_pos:
        torch.testing.assert_close(suffix_in[int(ctx.col[0, p]) - P], expect, atol=1e-5, rtol=1e-5)
    # a question <evi> gets the mean raw video token instead
    b = batch(tiny, [sample(8, q=f"What happens in {EVI}?", qspans=((1, 3),))])
    seen.clear()
    hook = tiny.decoder.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            ctx = tiny.encode_prompt(b)
            video = tiny.encode_video(b["frames"], b["frame_mask"], b["qformer_ids"], b["qformer_mask"])
    finally:
        hook.remove()
    ids = b["input_ids"][0]
    qpos = int((ids == tiny.token_id[EVI]).nonzero()[0, 0])
    expect = tiny.decoder.embed_tokens(torch.tensor(tiny.token_id[EVI])) + video[0, 1:4].mean(0)
    torch.testing.assert_close(ctx.suffix[0, int(ctx.col[0, qpos]) - ctx.P], expect, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def evi_happy(tiny):
    """The tiny random model, with the LM-head row of <evi> tilted so that it gets emitted now and then."""
    m = model.build_model(CFG).eval()
    m.load_state_dict(tiny.state_dict())
    with torch.no_grad():
        head = m.lm_head.weight
        b = batch(m, [sample(6, seed=s) for s in range(3)], with_response=False)
        first = [g["tokens"][0] for g in decoding.generate(m, b, max_new_tokens=1)]
        head[m.token_id[EVI]] = head[first[0]] * 1.02  # wins wherever that token would have
    return m


def test_generation_batched_equals_one_by_one_and_cache_equals_recompute(evi_happy):
    m = evi_happy
    samples = [sample(n, seed=s) for n, s in ((6, 0), (9, 1), (7, 2))]
    b = batch(m, samples, with_response=False)
    together = decoding.generate(m, b, max_new_tokens=10)
    assert any(g["spans"] for g in together), "no <evi> emitted: the test would not cover injection"
    for s, g in zip(samples, together):
        alone = decoding.generate(m, batch(m, [s], with_response=False), max_new_tokens=10)[0]
        assert alone["tokens"] == g["tokens"] and alone["spans"] == g["spans"]
    recompute = decoding.generate(m, b, max_new_tokens=10, use_cache=False)
    assert [g["tokens"] for g in recompute] == [g["tokens"] for g in together]
    assert [g["spans"] for g in recompute] == [g["spans"] for g in together]
    for g in together:  # every <evi> is rendered as "s - e" with its span
        assert g["text"].count(" - ") >= len(g["spans"]) and EVI not in g["text"]


def test_real_size_parameter_counts_on_meta():
    with torch.device("meta"):
        m = model.build_model(config.PRESETS["d2vlm-3.8b"])
    assert sum(p.numel() for p in m.vision.parameters()) == 985_952_256
    assert len(m.vision.encoder.layers) == 39
    assert sum(p.numel() for p in m.qformer.parameters()) == 185_659_392 + 768  # + the [DEC] row of the vocabulary
    base = m.llm.get_base_model()
    assert sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n) == 3_821_079_552
    assert m.query_tokens.shape == (1, 32, 768)


def write_instructblip(path, cfg, seed=1, **qformer):
    """A tiny InstructBLIP checkpoint directory in transformers' layout, sharded, with a language
    model inside (which must never be loaded). `qformer` overrides Q-Former config fields."""
    ib_cfg = InstructBlipConfig(vision_config=model.vision_config(cfg).to_dict(),
                                qformer_config={**model.qformer_config(cfg).to_dict(), **qformer},
                                text_config=OPTConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                      ffn_dim=64, num_attention_heads=2, word_embed_proj_dim=32).to_dict(),
                                num_query_tokens=cfg.num_query_tokens)
    torch.manual_seed(seed)
    ib = InstructBlipForConditionalGeneration(ib_cfg)
    ib.save_pretrained(path, max_shard_size="200KB")
    return ib


def write_weight_directories(tmp_path, tiny):
    """`tiny` as an InstructBLIP directory (tmp_path/instructblip, with qformer_tokenizer/) and a Phi-3
    directory (tmp_path/phi3, with the tokenizer), in transformers' layouts: (InstructBLIP, Phi-3) models."""
    ib = write_instructblip(tmp_path / "instructblip", CFG)
    tiny.tokenizer.save_pretrained(tmp_path / "instructblip" / "qformer_tokenizer")
    phi = tiny.llm.get_base_model()
    plain = Phi3ForCausalLM(phi.config)
    plain.load_state_dict({k.replace(".base_layer", ""): v for k, v in phi.state_dict().items() if "lora_" not in k})
    plain.save_pretrained(tmp_path / "phi3")
    tiny.tokenizer.save_pretrained(tmp_path / "phi3")
    return ib, plain


def test_loading_from_checkpoint_layouts(tmp_path, tiny):
    """Tiny checkpoints saved as an InstructBLIP directory and a Phi-3 directory go through the same
    loader as the real ones."""
    ib, plain = write_weight_directories(tmp_path, tiny)
    assert len(list((tmp_path / "instructblip").glob("model-*.safetensors"))) > 1  # sharded
    m = checkpoint.from_weights(CFG, vision_weights=tmp_path / "instructblip", llm_weights=tmp_path / "phi3")
    torch.testing.assert_close(m.vision.state_dict(), ib.vision_model.state_dict())
    torch.testing.assert_close(m.qformer.state_dict(), ib.qformer.state_dict())
    torch.testing.assert_close(m.query_tokens, ib.query_tokens)
    torch.testing.assert_close(m.lm_head.weight, plain.lm_head.weight)
    assert not any(n.startswith("language") for n, _ in m.named_parameters())
    with pytest.raises(FileNotFoundError, match="nowhere: weights directory not found"):
        checkpoint.from_weights(CFG, vision_weights=tmp_path / "nowhere")
    # a Q-Former vocabulary other than the config's: one error naming the tensor and both shapes
    write_instructblip(tmp_path / "other_vocab", CFG, vocab_size=CFG.qformer_vocab + 1)
    tiny.tokenizer.save_pretrained(tmp_path / "other_vocab" / "qformer_tokenizer")
    want = (rf"other_vocab: tensor qformer.embeddings.word_embeddings.weight has shape \({CFG.qformer_vocab + 1}, "
            rf"{CFG.qformer_width}\), this model expects \({CFG.qformer_vocab}, {CFG.qformer_width}\)")
    with pytest.raises(ValueError, match=want):
        checkpoint.from_weights(CFG, vision_weights=tmp_path / "other_vocab")


def test_vit_patches_raw_to_the_aggregator_normalised_to_the_qformer(tiny):
    """Upstream's qformer_ln (HF's post_layernorm, eps 1e-5, trained) sits only between the ViT and
    the Q-Former's cross-attention; the aggregator's keys, values and residual read the raw patches."""
    b = batch(tiny, [sample(4)])
    seen = {}
    hooks = [tiny.qformer.register_forward_pre_hook(lambda mod, a, kw: seen.update(q=kw["encoder_hidden_states"]),
                                                    with_kwargs=True),
             tiny.aggregator.register_forward_pre_hook(lambda mod, a: seen.update(agg=a[1]))]
    try:
        with torch.no_grad():
            tiny.encode_video(b["frames"], b["frame_mask"], b["qformer_ids"], b["qformer_mask"])
            raw = tiny.vision(pixel_values=b["frames"][0], output_hidden_states=True).hidden_states[-1][:, 1:]
    finally:
        for h in hooks:
            h.remove()
    ln = tiny.vision.post_layernorm
    assert ln.eps == CFG.qformer_ln_eps == 1e-5
    torch.testing.assert_close(seen["agg"], raw)
    ref = (raw - raw.mean(-1, keepdim=True)) / torch.sqrt(raw.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(seen["q"], ref * ln.weight + ln.bias, atol=1e-5, rtol=1e-5)
    trained = {n for n, p in tiny.named_parameters() if p.requires_grad and n.startswith("vision.")}
    assert trained == {"vision.post_layernorm.weight", "vision.post_layernorm.bias"}


def test_evidence_tokens_take_phi3s_next_ids():
    """On a tokenizer laid out as Phi-3-mini's (32000 SentencePiece pieces, then its 11 added tokens,
    <|end|> = 32007), <evi> and </evi> get 32011 and 32012, as in the released D2VLM weights."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    added = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
             "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]
    core = Tokenizer(models.WordLevel({f"piece{i}": i for i in range(32000)}, unk_token="piece0"))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": added})
    assert tok.convert_tokens_to_ids("<|end|>") == 32007 and len(tok) == 32011
    model.add_special_tokens(tok)
    assert [tok.convert_tokens_to_ids(t) for t in (EVI, EVI_END, data.VIDEO)] == [32011, 32012, 32013]


# ---------------------------------------------------------------------------------------------
# The release's decoding protocol (decoding.DECODINGS["release"])

def test_repetition_penalty_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False], [False, False, True, True]])
    want = torch.tensor([[2.0 / 1.2, -1.0 * 1.2, 0.5, 3.0], [2.0, -1.0, 0.5 / 1.2, 3.0 / 1.2]])
    torch.testing.assert_close(decoding.repetition_penalty(logits, seen, 1.2), want, rtol=0, atol=0)


def test_the_penalty_covers_prompt_and_answer_but_not_the_video_and_evi(evi_happy, monkeypatch):
    m = evi_happy
    b = batch(m, [sample(6, seed=0), sample(9, seed=1)], with_response=False)
    calls = []
    real = decoding.repetition_penalty
    monkeypatch.setattr(decoding, "repetition_penalty", lambda lg, seen, p: calls.append(seen.clone()) or real(lg, seen, p))
    out = decoding.generate(m, b, max_new_tokens=6, penalty=1.2, penalize=[True, False])
    ids, mask = b["input_ids"][0], b["attention_mask"][0].bool()
    prompt = set(ids[mask].tolist()) - {m.token_id[data.VIDEO], m.token_id[EVI]}
    assert set(calls[0][0].nonzero()[:, 0].tolist()) == prompt  # the first step: the prompt only
    assert not calls[0][0, m.token_id[data.VIDEO]] and not calls[0][0, m.token_id[EVI]]
    first = out[0]["tokens"][0]
    assert calls[1][0, first] == (first != m.token_id[EVI])  # then each generated token but <evi>
    plain = decoding.generate(m, b, max_new_tokens=6)
    assert out[1]["tokens"] == plain[1]["tokens"]  # the unpenalized sample decodes as without the penalty


def test_seeded_sampling_is_repeatable_and_batch_invariant(evi_happy):
    m = evi_happy
    samples = [sample(n, seed=s) for n, s in ((6, 0), (9, 1), (7, 2))]
    b = batch(m, samples, with_response=False)
    one = decoding.generate(m, b, max_new_tokens=8, temperature=1.0, seeds=[10, 11, 12])
    assert [g["tokens"] for g in decoding.generate(m, b, max_new_tokens=8, temperature=1.0, seeds=[10, 11, 12])] \
        == [g["tokens"] for g in one]
    for s, seed, g in zip(samples, (10, 11, 12), one):
        alone = decoding.generate(m, batch(m, [s], with_response=False), max_new_tokens=8, temperature=1.0, seeds=[seed])
        assert alone[0]["tokens"] == g["tokens"]
    other = decoding.generate(m, b, max_new_tokens=8, temperature=1.0, seeds=[20, 21, 22])
    assert [g["tokens"] for g in other] != [g["tokens"] for g in one]


def test_release_span_text_reads_back_through_the_scorers():
    from scoring import etbench
    text = data.render(f"{EVI}{EVI_END}The event happens in {EVI}.", [[12.0, 18.0]] * 2, "release")
    assert text == "12 - 18 </evi>The event happens in 12 - 18 ."
    rec = {"task": "tvg", "source": "s", "video": "v.mp4", "q": "q", "tgt": [12.0, 18.0], "a": text}
    for protocol in ("etchat", "strict", "d2vlm"):
        assert etbench.score_etbench([rec], protocol)["tvg"]["s"]["mIoU"] == pytest.approx(1.0)
    tal = {**rec, "task": "tal", "tgt": [[3.0, 5.0], [12.0, 18.0]],
           "a": data.render(f"{EVI}{EVI}{EVI_END}At {EVI}, {EVI}.", [[3, 5], [12, 18]] * 2, "release")}
    assert etbench.score_etbench([tal], "etchat")["tal"]["s"]["F1@0.7"] == pytest.approx(1.0)


def test_merged_then_fresh_lora_computes_what_the_sft_model_computed(tiny):
    """The release's FPO start: SFT LoRA merged, a fresh one on top: the same logits and
    similarities before the first FPO step, the same tensors train, and the new LoRA starts at B = 0."""
    m = model.build_model(CFG).eval()
    m.load_state_dict(tiny.state_dict())
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # a trained SFT adapter
    b = batch(m, [sample(6, seed=0), sample(8, seed=1)])
    with torch.no_grad():
        before = m(b)
    trained = {n.replace(".base_layer", "") for n, p in m.named_parameters() if p.requires_grad}
    model.merge_and_fresh_lora(m)
    with torch.no_grad():
        after = m(b)
    torch.testing.assert_close(after["logits"], before["logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(after["sim"], before["sim"], rtol=0, atol=1e-5)
    assert {n.replace(".base_layer", "") for n, p in m.named_parameters() if p.requires_grad} == trained
    assert all(not p.any() for n, p in m.named_parameters() if "lora_B" in n)


def test_generation_stops_at_the_end_of_the_context_and_says_so(evi_happy):
    m = evi_happy
    b = batch(m, [sample(6, seed=0), sample(9, seed=1)], with_response=False)
    lengths = (b["attention_mask"].sum(1) - 1 + b["frame_mask"].sum(1)).tolist()
    m.cfg = dataclasses.replace(m.cfg, llm_max_positions=int(max(lengths)) + 3)
    try:
        out = decoding.generate(m, b, max_new_tokens=50)
    finally:
        m.cfg = CFG
    assert any(g["stopped"] == "context" for g in out)
    for g, n in zip(out, lengths):
        assert g["stopped"] in ("end", "context")
        if g["stopped"] == "context":
            assert len(g["tokens"]) == max(lengths) + 3 - n


def test_semantic_capture_off_leaves_answer_evi_as_token_embeddings(evi_happy):
    """Ablation B2: answer <evi> (training and generation) get no video states; question <evi> keep theirs."""
    m = evi_happy
    b = batch(m, [sample(6, seed=0, q=f"What happens after {EVI}?", qspans=((1, 2),))])
    prompt = m.encode_prompt(b)
    pos, mask, spans = m.answer_evidence(b)
    on = m.capture_evidence(prompt, pos, mask, spans)
    m.cfg = dataclasses.replace(CFG, semantic_capture=False)
    try:
        off = m.capture_evidence(prompt, pos, mask, spans)
        torch.testing.assert_close(off, prompt.suffix, rtol=0, atol=0)
        cols = prompt.columns(pos)[mask] - prompt.P
        raw = m.decoder.embed_tokens(torch.tensor([m.token_id[EVI]]))[0]
        torch.testing.assert_close(off[0, cols], raw.expand(len(cols), -1), rtol=0, atol=0)
        assert not torch.equal(on[0, cols], off[0, cols])
        q = prompt.columns(model._positions((b["input_ids"] == m.token_id[EVI]) & (b["labels"] == batches.IGNORE))[0])
        assert not torch.equal(prompt.suffix[0, q[0] - prompt.P], raw)  # the question <evi> still takes in its span
        g = decoding.generate(m, batch(m, [sample(6, seed=0)], with_response=False), max_new_tokens=10)
        assert g[0]["spans"]  # <evi> are still emitted and grounded, only not fed their frames
    finally:
        m.cfg = CFG

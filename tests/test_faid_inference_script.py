"""``FAiDConfig(semantics="inference-script")`` pinned to the official inference script, step by step.

The oracle is a transcription of the official decode path (PLUM-Lab/AR-RAG, MIT), written line by
line from it and sharing nothing with arrag_kernels.faid:

* ``arrag/Janus/example/t2i_faid.py`` ``generate``: one image, rows (conditional, unconditional);
  at steps with ``i > image_dim and (i - 1) % image_dim < image_dim - retri_num - 1`` the retrieved
  codes are clamped (``-1 -> 0``), embedded (``gen_embed``, ``gen_aligner``) and passed as
  ``retrieved_features`` (1, 1, K, D); other steps pass zeros; the KV-cached forward with ``pos_id=i``,
  ``gen_head`` on the last position, CFG, then the next token's ``prepare_gen_img_embeds``.
* ``arrag/Janus/janus/models/llama_conv.py`` ``SmoothPatchBlender.forward`` (inference branch,
  ``pos_id`` given: the blender layer's normalised inputs so far laid on a zero map, the windows of
  the one target, the centre replaced by the retrieved embedding) and ``LlamaDecoderLayer.forward``
  (``previous_hidden_states`` accumulated per layer, ``retrieval_layernorm``, the blender's output
  returned as the next layer's ``retrieved_features`` with no zeroing, ``retrieved_features[1] = 0``,
  the mean over K added to the last position).

The official modules (``SmoothPatchBlender``'s parameters, ``LlamaRMSNorm``) and the training
oracle come from ``tests/test_faid_official.py``. Retrieved ids come from the library's retriever
with some slots padded (-1), which the script clamps to code 0. Token ids are the library's greedy
decode (each step sees only earlier tokens), fed to the script in place of its multinomial draw.
"""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import arrag_kernels as ak
from arrag_kernels.faid import FAiDConfig
from arrag_kernels.faid.train import TeacherForcedFAiD
from arrag_kernels.models import tiny_prompt_ids
# db and model are that module's module-scoped fixtures: pytest finds them here too, one instance per module
from tests.test_faid_official import (BLENDERS, K, db, decode_recording_logits, max_errors, model, official_logits,
                                      official_parts, official_state_dict, pad_some_slots, uncond_prompts)

RTOL = 2e-5


# ---- the official inference path, transcribed ----------------------------------------------------------
def blender_inference(self, hidden_states, retrieved_embeds, S_img, pos_id):
    """``SmoothPatchBlender.forward`` with ``pos_id`` given (``self``: the transcribed module)."""
    if pos_id == 0:
        hidden_states = torch.zeros(hidden_states.shape[0], S_img, hidden_states.shape[2])
    else:
        # pad to S_img with zeros
        target_full_img_features = torch.zeros(hidden_states.shape[0], S_img, hidden_states.shape[2])
        target_full_img_features[:, :pos_id, :] = hidden_states[:, -pos_id:, :]
        hidden_states = target_full_img_features
    B, _, D = hidden_states.shape
    K = self.retrieved_key_num
    if retrieved_embeds.shape[2] > K:
        retrieved_embeds = retrieved_embeds[:, :, :K, :]
    H = W = int(math.sqrt(S_img))
    assert H * W == S_img
    hidden_map = hidden_states.view(B, H, W, D).permute(0, 3, 1, 2).contiguous()
    hidden_map_pad = F.pad(hidden_map, (3, 3, 3, 3), mode="constant", value=0)  # [B, D, H+6, W+6]
    row, col = pos_id // W, pos_id % W
    row_pad, col_pad = row + 3, col + 3
    patches = {h: hidden_map_pad[:, :, row_pad - h : row_pad + h + 1, col_pad - h : col_pad + h + 1]
               for h in (1, 2, 3) if h in self.blender}  # [B, D, 2h+1, 2h+1]
    retrieved_center = retrieved_embeds[:, 0].permute(0, 2, 1)  # [B, D, K]
    conv_outputs = []
    for h in (1, 2, 3):
        if h in self.blender:
            n = 2 * h + 1
            p = patches[h].unsqueeze(2).expand(-1, -1, K, -1, -1).clone()  # [B, D, K, n, n]
            p[:, :, :, h, h] = retrieved_center
            p = p.permute(0, 2, 1, 3, 4).reshape(B * K, D, n, n)
            first, second = getattr(self, f"conv{h}"), getattr(self, f"conv{h}2")
            conv_outputs.append(second(first(p.to(dtype=first.weight.dtype))).view(B, K, D))
    if self.num_hops > 1:
        weights = F.softmax(self.conv_weights, dim=0).view(-1, 1, 1, 1)
        conv_out = (weights * torch.stack(conv_outputs, dim=0)).sum(dim=0)  # [B, K, D]
    else:
        conv_out = conv_outputs[0]
    w_k = self.mlp(conv_out)  # [B, K, 1]
    total_feature = conv_out * w_k
    return total_feature.unsqueeze(1)  # [B, 1, K, D]


def script_decoder_layer(layer, parts, state, hidden_states, attention_mask, position_embeddings, cache,
                         retrieved_features, pos_id, S_img):
    """``LlamaDecoderLayer.forward`` with ``pos_id`` (the HF layer's attention / MLP / norms, KV-cached);
    ``state`` holds the layer's ``previous_hidden_states``."""
    residual = hidden_states
    hidden_states = layer.input_layernorm(hidden_states)
    if parts is not None:
        if pos_id == 0:
            state["previous_hidden_states"] = hidden_states
        else:
            state["previous_hidden_states"] = torch.cat([state["previous_hidden_states"], hidden_states], dim=1)
        retrieved_features = parts.retrieval_layernorm(retrieved_features)
        retrieved_features = blender_inference(parts.blender, state["previous_hidden_states"], retrieved_features,
                                               S_img, pos_id)
    hidden_states, _ = layer.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                       position_embeddings=position_embeddings, cache=cache)
    hidden_states = residual + hidden_states
    if parts is not None:
        if len(retrieved_features) == 1:
            retrieved_features = torch.cat([retrieved_features, retrieved_features], dim=0)
        retrieved_features[1, :, :, :] = 0  # clean the uncondition part
        hidden_states[:, -1, :] += retrieved_features.mean(dim=2).squeeze(1)
    residual = hidden_states
    hidden_states = layer.post_attention_layernorm(hidden_states)
    hidden_states = layer.mlp(hidden_states)
    return residual + hidden_states, retrieved_features


def script_logits(model, parts, prompt, uncond, image_tokens, retrieved_codes):
    """``generate`` of t2i_faid.py for one image (parallel_size = 1): raw head logits (2, N, V) of every
    step, rows (conditional, unconditional); ``image_tokens`` (N,) replace the multinomial draw,
    ``retrieved_codes`` (N, K) what the retriever returns at each step (-1: padding)."""
    inner = model.model
    lm = inner.language_model
    N = image_tokens.shape[0]
    image_dim, retri_num = int(math.sqrt(N)), 1
    D = lm.config.hidden_size
    tokens = torch.stack([prompt, uncond])
    inputs_embeds = lm.get_input_embeddings()(tokens)
    cache = DynamicCache(config=lm.config)
    states = {i: {} for i in parts}
    recorded, seen = [], 0
    for i in range(N):
        if i > image_dim and (i - 1) % image_dim < image_dim - retri_num - 1:
            retrieved_codes_i = retrieved_codes[i : i + 1]  # what the retriever returns at step i, (1, K)
            retrieved_codes_clamped = torch.where(retrieved_codes_i < 0, torch.zeros_like(retrieved_codes_i),
                                                  retrieved_codes_i)
            retrieved_emb = inner.generation_embeddings(retrieved_codes_clamped)
            retrieved_emb_aligned = inner.generation_aligner(retrieved_emb).unsqueeze(0)  # [1, 1, K, D]
        else:
            retrieved_emb_aligned = torch.zeros((1, 1, K, D))
        # LlamaModel.forward, KV-cached: positions continue the cache; the prefill is causal
        S = inputs_embeds.shape[1]
        position_ids = torch.arange(seen, seen + S)[None]
        position_embeddings = lm.rotary_emb(inputs_embeds, position_ids)
        mask = torch.full((S, S), torch.finfo(inputs_embeds.dtype).min).triu(1)[None, None] if i == 0 else None
        hidden_states, retrieved_features = inputs_embeds, retrieved_emb_aligned
        for idx, layer in enumerate(lm.layers):
            hidden_states, retrieved_features = script_decoder_layer(
                layer, parts.get(idx), states.get(idx), hidden_states, mask, position_embeddings, cache,
                retrieved_features, i, N)
        seen += S
        hidden_states = lm.norm(hidden_states)
        logits = inner.generation_head(hidden_states[:, -1, :])
        recorded.append(logits)
        # CFG, softmax and torch.multinomial: replaced by the library's draw
        next_token = image_tokens[i].view(1, 1)
        next_token = torch.cat([next_token.unsqueeze(dim=1), next_token.unsqueeze(dim=1)], dim=1).view(-1)
        inputs_embeds = inner.generation_aligner(inner.generation_embeddings(next_token)).unsqueeze(dim=1)
    return torch.stack(recorded, dim=1)


def script_logits_batch(model, parts, prompts, tokens, codes):
    """Every image through the script separately, in the library's row order (conditional rows, then
    unconditional)."""
    uncond = uncond_prompts(prompts, model.generation_config.pad_token_id)
    per_image = [script_logits(model, parts, prompts[b], uncond[b], tokens[b], codes[b])
                 for b in range(prompts.shape[0])]
    return torch.cat([torch.stack([x[0] for x in per_image]), torch.stack([x[1] for x in per_image])])


# ---- tests ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hops", [(1,), (1, 2)], ids=["hops1", "hops12"])
def test_logits_equal_inference_script_every_step(model, db, hops):
    """The dynamic loop (host steps) and the static loop (device-tensor steps, what the CUDA graph
    records) under ``semantics="inference-script"``, and the teacher-forced forward, against the
    transcribed script: every step, both CFG rows, 2 blenders, K = 10 with partly and fully padded
    steps and every kind of step without retrieval; the script really differs from training there."""
    prompts = tiny_prompt_ids(2, seed=7)
    parts = official_parts(model, hops, seed=11)
    config = FAiDConfig(k=K, hops=hops, blenders=BLENDERS, semantics="inference-script")
    ours, decoded = {}, {}
    with ak.use_backend("reference"), ak.patched(model, db, config, blender_weights=official_state_dict(parts)) as h:
        pad_some_slots(h.faid.retriever)
        for loop in ("dynamic", "static"):
            decoded[loop], ours[loop] = decode_recording_logits(h, prompts, loop)
        tokens = decoded["dynamic"]
        assert torch.equal(decoded["static"], tokens)
        codes = torch.stack([h.faid.retriever.retrieve(tokens, s)[1] for s in range(tokens.shape[1])], dim=1)
        forward = TeacherForcedFAiD(model, h.db, h.faid.blenders)
        pad_some_slots(forward.retriever)
        with torch.no_grad():
            ours["teacher-forced"] = forward.logits(prompts, tokens)
    padded = codes == -1
    assert (padded.any(-1) & ~padded.all(-1)).any() and padded.all(-1).any(), "want partly and fully padded steps"
    with torch.no_grad():
        want = script_logits_batch(model, parts, prompts, tokens, codes)
        train = official_logits(model, parts, prompts, uncond_prompts(prompts, model.generation_config.pad_token_id),
                                tokens, codes)

    B, N = tokens.shape
    errors = {}
    for name, got in ours.items():
        ref = want if got.shape[0] == 2 * B else want[:B]  # the teacher-forced forward has the conditional rows
        errors[name] = max_errors(got, ref)
        print(f"hops={hops} {name}: max |ours - script| = {errors[name][0]:.3g} (relative {errors[name][1]:.3g})")
        torch.testing.assert_close(got, ref, rtol=RTOL, atol=RTOL * ref.abs().max().item())

    # where the script and the training forward part: steps without retrieval (chained blender) and
    # padded slots at retrieving steps; elsewhere (step 0: nothing chained yet differs) they agree
    W = h.adapter.grid[1]
    gap = (want[:B] - train[:B]).abs().amax(-1)  # (B, N)
    tol = 10 * RTOL * want.abs().max().item()  # ten times this test's tolerance: training would fail it
    print(f"hops={hops}: max |script - training forward| = {gap.max().item():.3g} "
          f"(relative {gap.max().item() / want.abs().max().item():.3g})")
    no_retrieval = [p for p in range(1, N) if p < W or p % W in (0, W - 1)]
    assert gap[:, no_retrieval].min() > tol, "the chained input at steps without retrieval"
    with_padding = padded.any(-1) & torch.tensor([p >= W and 0 < p % W < W - 1 for p in range(N)])
    assert gap[with_padding].min() > tol, "the clamped -1 slots"
    # unconditional rows: no retrieval term in either (cached vs uncached attention: rounding only)
    torch.testing.assert_close(want[B:], train[B:], rtol=RTOL, atol=RTOL * want.abs().max().item())


def test_train_semantics_is_the_default_and_files_keep_semantics(model, tmp_path):
    """Blender files store the semantics; files without it (written before it existed) load as "train"."""
    import json

    from safetensors.torch import load_file, save_file

    parts = official_parts(model, (1, 2), seed=3)
    assert FAiDConfig().semantics == "train"
    for semantics in ("train", "inference-script"):
        config = FAiDConfig(k=K, hops=(1, 2), blenders=BLENDERS, semantics=semantics)
        blenders = ak.faid.load_blenders(official_state_dict(parts), model, config)
        path = ak.faid.save_blenders(blenders, tmp_path / f"{semantics}.safetensors")
        assert ak.faid.load_blenders(path, model).config == config
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    old = json.loads(meta["faid_config"])
    del old["semantics"]
    save_file(load_file(str(path)), str(tmp_path / "old.safetensors"),
              metadata={**meta, "faid_config": json.dumps(old)})
    assert ak.faid.load_blenders(tmp_path / "old.safetensors", model).config.semantics == "train"
    with pytest.raises(ValueError, match=r"FAiDConfig.semantics: expected one of \('train', 'inference-script'\)"):
        FAiDConfig(semantics="inference")
    # blenders built for one semantics are not silently decoded with another
    with pytest.raises(ak.faid.CheckpointError, match="the blenders were built for"):
        ak.faid.load_blenders(blenders, model, dataclasses.replace(blenders.config, semantics="train"))


def test_masked_decoding_refuses_the_inference_script_semantics():
    """The script is an autoregressive decode; masked decoding says so instead of ignoring the setting."""
    from arrag_kernels.faid import FAiDBlenders
    from arrag_kernels.masked import MaskedFAiD, tiny_maskgit

    gen = tiny_maskgit(seed=0)
    blenders = FAiDBlenders(gen.hidden_size, gen.num_layers, FAiDConfig(k=4, semantics="inference-script"))
    with pytest.raises(ValueError, match="masked decoding has no such script"):
        MaskedFAiD(gen, None, blenders)

"""FAiD pinned to the official AR-RAG computation, teacher-forced, fp32, every position, both CFG rows.

The oracle here is a transcription of the official code (PLUM-Lab/AR-RAG, MIT), written line by line
from it and sharing nothing with arrag_kernels.faid:

* ``arrag/Janus/janus/models/janus_retri_conv_ds.py`` ``MultiModalityCausalLM.forward``: retrieved
  codes -> ``gen_embed`` -> ``gen_aligner``; the embeddings of ``-1`` slots are set to 0.
* ``arrag/Janus/janus/models/llama_conv.py`` ``SmoothPatchBlender.forward`` (training branch,
  ``pos_id=None``: every image position, retrieved features zeroed at row 0, column 0 and the last
  column), ``LlamaDecoderLayer.forward`` (blender on ``input_layernorm(h)``, its mean over K added
  after attention at the positions predicting each image token; ``retrieved_features`` returned and
  handed by ``LlamaModel`` to the next layer, so the next blender reads ``retrieval_layernorm`` of the
  previous blender's ``conv_out * w_k``) and ``LlamaRMSNorm``.
* The unconditional CFG rows get no retrieval term: the inference branch of ``LlamaDecoderLayer``
  sets ``retrieved_features[1] = 0`` ("clean the uncondition part") before adding it and passing it on.

The official training branch is transcribed (not the inference branch) where the two differ: the
released weights were trained with it (README "Semantics"). Retrieved ids come from the library's
retriever (retrieval is pinned against the official search elsewhere); a wrapper pads some slots
with -1 so that the official masking of padded slots is exercised. Our logits are recorded from
greedy decodes (each step sees only earlier tokens, so they are teacher-forced on the decoded tokens)
of the dynamic and the static loop; the oracle runs one uncached forward over prompt + all tokens.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import arrag_kernels as ak
from arrag_kernels.faid import FAiDConfig
from arrag_kernels.faid.train import FAiDTrainer
from arrag_kernels.models import tiny_janus, tiny_prompt_ids

K = 10
NUM_LAYERS, BLENDERS = 4, 2  # official placement: layer_idx % (4 // 2) == 0 -> layers 0 and 2 (layer 1 between)
RTOL = 1e-5


# ---- the official modules (llama_conv.py), transcribed -------------------------------------------
class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class SmoothPatchBlender(nn.Module):
    def __init__(self, hidden_size, num_hop, kernel_1=2, kernel_2=3, kernel_3=4, retrieved_key_num=10):
        super().__init__()
        self.hidden_size = hidden_size
        self.retrieved_key_num = retrieved_key_num
        self.blender = num_hop
        self.num_hops = len(self.blender)
        if 1 in self.blender:
            self.conv1 = nn.Conv2d(self.hidden_size, self.hidden_size, kernel_size=kernel_1, stride=1)
            self.conv12 = nn.Conv2d(self.hidden_size, self.hidden_size, kernel_size=kernel_1, stride=1)
        if 2 in self.blender:
            self.conv2 = nn.Conv2d(self.hidden_size, self.hidden_size, kernel_size=kernel_2, stride=1)
            self.conv22 = nn.Conv2d(self.hidden_size, self.hidden_size, kernel_size=kernel_2, stride=1)
        if 3 in self.blender:
            self.conv3 = nn.Conv2d(self.hidden_size, self.hidden_size, kernel_size=kernel_3, stride=1)
            self.conv32 = nn.Conv2d(self.hidden_size, self.hidden_size, kernel_size=kernel_3, stride=1)
        if self.num_hops > 1:
            self.conv_weights = nn.Parameter(torch.ones(self.num_hops))
        self.mlp = nn.Sequential(nn.Linear(self.hidden_size, self.hidden_size), nn.ReLU(),
                                 nn.Linear(self.hidden_size, 1), nn.Sigmoid())

    def forward(self, hidden_states, retrieved_embeds, S_img):
        """Training branch (``pos_id is None``): every one of the S_img image positions."""
        hidden_states = hidden_states[:, -S_img:, :]
        B, S, D = hidden_states.shape
        K = self.retrieved_key_num
        if retrieved_embeds.shape[2] > K:
            retrieved_embeds = retrieved_embeds[:, :, :K, :]
        assert retrieved_embeds.shape == (B, S, K, D)
        H = W = int(math.sqrt(S))
        assert H * W == S
        hidden_map = hidden_states.view(B, H, W, D).permute(0, 3, 1, 2).contiguous()  # [B, D, H, W]
        hidden_map_pad = F.pad(hidden_map, (3, 3, 3, 3), mode="constant", value=0)  # [B, D, H+6, W+6]
        r_grid, c_grid = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
        if 1 in self.blender:
            a = torch.tensor([0, 1, 2])
            patches_1hop = hidden_map_pad[:, :, r_grid[:, :, None, None] + a[None, None, :, None] + 2,
                                          c_grid[:, :, None, None] + a[None, None, None, :] + 2]  # [B, D, H, W, 3, 3]
        if 2 in self.blender:
            a = torch.tensor([0, 1, 2, 3, 4])
            patches_2hop = hidden_map_pad[:, :, r_grid[:, :, None, None] + a[None, None, :, None] + 1,
                                          c_grid[:, :, None, None] + a[None, None, None, :] + 1]  # [B, D, H, W, 5, 5]
        if 3 in self.blender:
            a = torch.tensor([0, 1, 2, 3, 4, 5, 6])
            patches_3hop = hidden_map_pad[:, :, r_grid[:, :, None, None] + a[None, None, :, None],
                                          c_grid[:, :, None, None] + a[None, None, None, :]]  # [B, D, H, W, 7, 7]
        retrieved_embeds_reshaped = retrieved_embeds.permute(0, 2, 3, 1).reshape(B, K, D, H, W).permute(0, 2, 3, 4, 1)
        # no retrieval for the first row, first and last column
        retrieved_embeds_reshaped[:, :, 0, :, :] = 0.0
        retrieved_embeds_reshaped[:, :, :, 0, :] = 0.0
        retrieved_embeds_reshaped[:, :, :, -1, :] = 0.0
        conv_outputs = []
        if 1 in self.blender:
            p = patches_1hop.unsqueeze(4).expand(-1, -1, -1, -1, K, -1, -1).clone()
            p[:, :, :, :, :, 1, 2] = 0.0  # mask future tokens
            p[:, :, :, :, :, 2, :] = 0.0
            p[:, :, :, :, :, 1, 1] = retrieved_embeds_reshaped
            p = p.permute(0, 2, 3, 4, 1, 5, 6).reshape(B * H * W * K, D, 3, 3)
            conv1_out = self.conv12(self.conv1(p)).view(B, H, W, K, D)
            conv_outputs.append(conv1_out)
        if 2 in self.blender:
            p = patches_2hop.unsqueeze(4).expand(-1, -1, -1, -1, K, -1, -1).clone()
            p[:, :, :, :, :, 2, 3:] = 0.0
            p[:, :, :, :, :, 3:, :] = 0.0
            p[:, :, :, :, :, 2, 2] = retrieved_embeds_reshaped
            p = p.permute(0, 2, 3, 4, 1, 5, 6).reshape(B * H * W * K, D, 5, 5)
            conv2_out = self.conv22(self.conv2(p)).view(B, H, W, K, D)
            conv_outputs.append(conv2_out)
        if 3 in self.blender:
            p = patches_3hop.unsqueeze(4).expand(-1, -1, -1, -1, K, -1, -1).clone()
            p[:, :, :, :, :, 3, 4:] = 0.0
            p[:, :, :, :, :, 4:, :] = 0.0
            p[:, :, :, :, :, 3, 3] = retrieved_embeds_reshaped
            p = p.permute(0, 2, 3, 4, 1, 5, 6).reshape(B * H * W * K, D, 7, 7)
            conv3_out = self.conv32(self.conv3(p)).view(B, H, W, K, D)
            conv_outputs.append(conv3_out)
        if self.num_hops > 1:
            conv_outputs_stacked = torch.stack(conv_outputs, dim=0)  # [num_hops, B, H, W, K, D]
            weights = F.softmax(self.conv_weights, dim=0).view(-1, 1, 1, 1, 1, 1)
            conv_out = (weights * conv_outputs_stacked).sum(dim=0)
        elif 1 in self.blender:
            conv_out = conv1_out
        elif 2 in self.blender:
            conv_out = conv2_out
        else:
            conv_out = conv3_out
        w_k = self.mlp(conv_out)  # [B, H, W, K, 1]
        total_feature = conv_out * w_k
        return total_feature.view(B, S, K, D)


class BlenderParts(nn.Module):
    """What ``LlamaDecoderLayer.__init__`` adds when ``layer_idx % config.num_SmoothPatchBlender == 0``."""

    def __init__(self, hidden_size, num_hop, eps):
        super().__init__()
        self.blender = SmoothPatchBlender(hidden_size, num_hop)
        self.retrieval_layernorm = LlamaRMSNorm(hidden_size, eps=eps)


def official_decoder_layer(layer, parts, hidden_states, attention_mask, position_embeddings, retrieved_features,
                           S_img, uncond_rows):
    """``LlamaDecoderLayer.forward`` with ``pos_id=None`` (training), the HF layer's attention / MLP /
    norms; ``parts`` is None for layers without a blender. Unconditional rows: the inference line."""
    residual = hidden_states
    hidden_states = layer.input_layernorm(hidden_states)
    if parts is not None:
        previous_hidden_states = hidden_states
        retrieved_features = parts.retrieval_layernorm(retrieved_features)
        retrieved_features = parts.blender(previous_hidden_states, retrieved_features, S_img=S_img)  # [B, S, K, D]
    hidden_states, _ = layer.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                       position_embeddings=position_embeddings)
    hidden_states = residual + hidden_states
    if parts is not None:
        retrieved_features[uncond_rows] = 0  # clean the uncondition part
        hidden_states[:, -retrieved_features.shape[1] - 1 : -1, :] += retrieved_features.mean(dim=2)
    residual = hidden_states
    hidden_states = layer.post_attention_layernorm(hidden_states)
    hidden_states = layer.mlp(hidden_states)
    hidden_states = residual + hidden_states
    return hidden_states, retrieved_features


def official_logits(model, parts, prompt_ids, uncond_ids, image_tokens, retrieved_codes):
    """(2B, N, V) image-head logits of every image position: conditional rows, then unconditional
    (only the B conditional rows when ``uncond_ids`` is None, as in official training).

    ``parts``: {layer index: BlenderParts}; ``retrieved_codes`` (B, N, K) with -1 for padding.
    """
    inner = model.model
    lm = inner.language_model
    B, N = image_tokens.shape
    P = prompt_ids.shape[1]
    rows = 1 if uncond_ids is None else 2
    text_input_ids = prompt_ids if uncond_ids is None else torch.cat([prompt_ids, uncond_ids])
    ground_truth_image_tokens = image_tokens.repeat(rows, 1)
    retrieved_codes = retrieved_codes.repeat(rows, 1, 1)
    # MultiModalityCausalLM.forward
    text_emb = lm.get_input_embeddings()(text_input_ids)
    final_img_emb = inner.generation_aligner(inner.generation_embeddings(ground_truth_image_tokens))
    retrieved_codes_mask = retrieved_codes == -1
    retrieved_codes_clamped = torch.where(retrieved_codes < 0, torch.zeros_like(retrieved_codes), retrieved_codes)
    retrieved_emb_aligned = inner.generation_aligner(inner.generation_embeddings(retrieved_codes_clamped))
    retrieved_emb_aligned[retrieved_codes_mask, :] = 0.0
    input_embeds = torch.cat([text_emb, final_img_emb], dim=1)
    # LlamaModel.forward: causal attention, rotary positions, retrieved_features handed from layer to layer
    T = input_embeds.shape[1]
    position_embeddings = lm.rotary_emb(input_embeds, torch.arange(T)[None])
    causal = torch.full((T, T), torch.finfo(input_embeds.dtype).min).triu(1)[None, None]
    uncond_rows = torch.arange(rows * B) >= B
    hidden_states, retrieved_features = input_embeds, retrieved_emb_aligned
    for idx, layer in enumerate(lm.layers):
        hidden_states, retrieved_features = official_decoder_layer(
            layer, parts.get(idx), hidden_states, causal, position_embeddings, retrieved_features, N, uncond_rows)
    hidden_states = lm.norm(hidden_states)
    return inner.generation_head(hidden_states[:, P - 1 : P - 1 + N])  # position P-1+j predicts image token j


# ---- set-up -------------------------------------------------------------------------------------------
def official_parts(model, hops, seed):
    """Random official blender modules in every blender layer (all parameters drawn, none left at 1).

    The first blender's scores are small (w_k ~ 3e-4): RMSNorm(w_k hhat_k), what the next blender
    reads, then differs from RMSNorm(hhat_k) far beyond fp32 noise (RMSNorm is scale-invariant only up
    to its epsilon), so the test pins which of the two is chained.
    """
    text = model.config.text_config
    every = NUM_LAYERS // BLENDERS
    torch.manual_seed(seed)
    parts = {}
    for i in range(NUM_LAYERS):
        if i % every == 0:
            p = BlenderParts(text.hidden_size, hops, text.rms_norm_eps)
            with torch.no_grad():
                p.retrieval_layernorm.weight.uniform_(0.5, 1.5)
                if len(hops) > 1:
                    p.blender.conv_weights.normal_()
                for name, t in p.blender.named_parameters():
                    if name.endswith("bias"):
                        t.normal_(0, 0.1)
                if i == 0:
                    p.blender.mlp[2].bias.fill_(-8.0)
            parts[i] = p.eval()
    return parts


def official_state_dict(parts):
    """The released checkpoint's names for the blender tensors."""
    return {f"language_model.model.layers.{i}.{k}": v.detach().clone()
            for i, p in parts.items() for k, v in p.state_dict().items()}


def pad_some_slots(retriever):
    """Give ``retriever`` a view of its database (the caller's database object untouched) whose ``retrieve``
    returns some slots as padding (-1): the last ``id % 4`` slots, and all K where ``id % 13 == 0`` (id:
    the nearest entry's token)."""
    db = retriever.db = retriever.db.to()
    search = db.retrieve

    def retrieve(queries, k):
        dist, ids = search(queries, k)
        first = ids[:, :1]
        pad = (torch.arange(k, device=ids.device) >= k - first % 4) | (first % 13 == 0)
        return dist, ids.masked_fill(pad, -1)

    db.retrieve = retrieve


@pytest.fixture(scope="module")
def model():
    return tiny_janus(seed=0, num_layers=NUM_LAYERS)


@pytest.fixture(scope="module")
def db(model, tiny_images):
    return ak.PatchDatabase.build(tiny_images, model, progress=False)


def decode_recording_logits(handle, prompts, loop):
    """Greedy tokens (B, N) and the raw head logits of every step (2B, N, V) of one decode."""
    adapter = handle.adapter
    head, recorded = adapter.image_logits, []

    def image_logits(hidden):
        recorded.append(head(hidden))
        return recorded[-1]

    adapter.image_logits = image_logits
    try:
        tokens = handle.generate_images(inputs=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                        loop=loop)
    finally:
        del adapter.image_logits
    return tokens, torch.stack(recorded, dim=1)


def uncond_prompts(prompts, pad_token_id):
    """HF Janus CFG rows: the prompt replaced by padding except BOS and begin-of-image."""
    uncond = prompts.clone()
    uncond[:, 1:-1] = pad_token_id
    return uncond


def max_errors(got, want):
    abs_err = (got - want).abs().max().item()
    return abs_err, abs_err / want.abs().max().item()


# The decodes use the reference faid_blend: the Triton kernel interpreted on CPU takes minutes for a
# whole decode; test_faid_blend.py checks it against the reference (blend and weighted candidates).
CASES = [((1,), "dynamic"), ((1,), "static"), ((1, 2), "dynamic"), ((1, 2), "static"), ((3,), "static"),
         ((1, 2, 3), "dynamic")]


@pytest.mark.parametrize("hops,loop", CASES, ids=lambda v: "hops" + "".join(map(str, v)) if isinstance(v, tuple) else v)
def test_logits_equal_official_every_position(model, db, hops, loop):
    """hops (1,), (1, 2), (3,), (1, 2, 3), 2 blenders (layer 1 between them: chaining passes through it), K = 10 with
    partly and fully padded steps, all 64 positions (row 0, column 0, last column), both CFG rows."""
    prompts = tiny_prompt_ids(2, seed=7)
    parts = official_parts(model, hops, seed=11)
    config = FAiDConfig(k=K, hops=hops, blenders=BLENDERS)
    with ak.use_backend("reference"), ak.patched(model, db, config, blender_weights=official_state_dict(parts)) as h:
        pad_some_slots(h.faid.retriever)
        tokens, ours = decode_recording_logits(h, prompts, loop)
        # the ids the official forward gets: the same retrieval, every position (borders included)
        codes = torch.stack([h.faid.retriever.retrieve(tokens, s)[1] for s in range(tokens.shape[1])], dim=1)
    padded = codes == -1
    assert (padded.any(-1) & ~padded.all(-1)).any() and padded.all(-1).any(), "want partly and fully padded steps"
    uncond = uncond_prompts(prompts, model.generation_config.pad_token_id)
    with torch.no_grad():
        want = official_logits(model, parts, prompts, uncond, tokens, codes)
        plain = official_logits(model, {}, prompts, uncond, tokens, codes)

    abs_err, rel_err = max_errors(ours, want)
    print(f"hops={hops} loop={loop}: max |ours - official| = {abs_err:.3g} (relative to max |logit|: {rel_err:.3g})")
    torch.testing.assert_close(ours, want, rtol=RTOL, atol=RTOL * want.abs().max().item())

    # the blend matters at every kind of position, borders included, and only in the conditional rows
    B, (H, W) = tokens.shape[0], h.adapter.grid
    effect = (want - plain).abs().amax(dim=-1)  # (2B, N)
    positions = {"step 0": [0], "row 0": list(range(1, W)), "column 0": list(range(W, H * W, W)),
                 "last column": list(range(2 * W - 1, H * W, W)),
                 "interior": [p for p in range(W, H * W) if 0 < p % W < W - 1]}
    for name, ps in positions.items():
        assert effect[:B, ps].min() > 1e3 * abs_err + 1e-3, f"{name}: the blend does not change the logits"
    assert torch.equal(want[B:], plain[B:])

    # greedy decoding of the official logits gives the same tokens
    guided = want[B:] + model.generation_config.guidance_scale * (want[:B] - want[B:])
    assert torch.equal(guided.argmax(-1), tokens)


@pytest.mark.parametrize("formulation", ["dense", "literal"])
def test_training_loss_and_gradients_equal_official(db, formulation):
    """FAiDTrainer (both formulations) against the official training forward: same CE loss over all image
    positions and the same gradient for every blender parameter (hops (1, 2), 2 blenders, K = 10, padded slots)."""
    model = tiny_janus(seed=0, num_layers=NUM_LAYERS)  # own instance: the trainer freezes the base weights
    parts = official_parts(model, (1, 2), seed=12)
    config = FAiDConfig(k=K, hops=(1, 2), blenders=BLENDERS)
    blenders = ak.faid.load_blenders(official_state_dict(parts), model, config)
    with ak.use_backend("reference"):
        trainer = FAiDTrainer(model, db, blenders, formulation=formulation)
        pad_some_slots(trainer.retriever)
        tokens = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(5))
        codes, valid = trainer.retrieve_all(tokens)
        loss = trainer.loss(tiny_prompt_ids(2, seed=7), tokens, (codes, valid))
    loss.backward()
    padded = codes == -1
    assert (padded.any(-1) & ~padded.all(-1)).any() and padded.all(-1).any()

    logits = official_logits(model, parts, tiny_prompt_ids(2, seed=7), None, tokens, codes)
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))
    want.backward()
    print(f"{formulation}: loss {loss.item():.6f} vs official {want.item():.6f}")
    torch.testing.assert_close(loss, want, rtol=RTOL, atol=0)
    theirs = {f"layers.{i}.{n}": p.grad for i, part in parts.items() for n, p in part.named_parameters()}
    ours = {n: p.grad for n, p in blenders.named_parameters()}
    assert ours.keys() == theirs.keys()
    for n, g in theirs.items():
        assert g.abs().max() > 0, n
        torch.testing.assert_close(ours[n], g, rtol=1e-4, atol=1e-4 * g.abs().max().item(), msg=lambda m: f"{n}: {m}")

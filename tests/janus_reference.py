"""Independent computations on a HF Janus model, for checking the decode loops."""

import torch


def teacher_forced_cfg_probs(model, prompt_ids, image_tokens, guidance_scale=5.0, pad_token_id=0):
    """(B, N, V) float64 softmax of the CFG-combined logits of every image position.

    One uncached forward over prompt + image tokens for the conditional rows and for the
    unconditional rows (prompt replaced by padding except its first (BOS) and last (BOI) token),
    so it shares no code with the library's KV-cached loops.
    """
    B, S = prompt_ids.shape
    N = image_tokens.shape[1]
    uncond = prompt_ids.clone()
    uncond[:, 1:-1] = pad_token_id
    prompt_emb = model.get_input_embeddings()(torch.cat([prompt_ids, uncond]))
    image_emb = model.prepare_embeddings_for_image_generation(torch.cat([image_tokens, image_tokens]))
    with torch.no_grad():
        h = model.model.language_model(inputs_embeds=torch.cat([prompt_emb, image_emb], 1)).last_hidden_state
        logits = model.model.generation_head(h[:, S - 1 : S - 1 + N])  # position S-1+i predicts image token i
    guided = logits[B:] + guidance_scale * (logits[:B] - logits[B:])
    return torch.softmax(guided.double(), -1)

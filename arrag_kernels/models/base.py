"""The contract between the library and an autoregressive image generator.

An adapter tells the library where a model family keeps the pieces AR-RAG needs: the VQ tokenizer
(to build databases and to turn generated tokens into queries) and the decoding pieces (one KV-cached
language-model step, the image head, the next-input embedding). Supporting a new generator means
writing one adapter and registering it (:func:`arrag_kernels.register_adapter`); ops, databases and
the decode loop stay untouched.

Teacher-forced scoring (the evaluation's NLL) needs the prompt side and one cache-free forward
(:class:`TeacherForcingAdapter`); FAiD needs more of the model (:class:`FAiDAdapter`: decoder layers
and hook points, width, dtype, LoRA targets, the image head; :class:`OfficialWeights` for a released
checkpoint's names); families without those members get DAiD only, and NLL or FAiD names what is
missing. The protocols list every member the library calls; :func:`check_protocol` verifies an
object against one and names all missing members in a single error. Any object with these members
works: no base class is needed.

The registered factory (usually the adapter class) may carry what is known without a model:
``load_pretrained(path, device)`` (:class:`PretrainedLoader`: how the CLI loads a checkpoint of the
family) and ``official_weights`` (:class:`OfficialWeights`).
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any, NamedTuple, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F

from ..ops import knn


class MemberUnavailable(ValueError):
    """Raised by an adapter property that exists but has no value without more set-up (Emu3's ``grid``
    when the adapter was built without ``grid=``): :func:`check_protocol` counts the member as present,
    and the message reaches the user when the member is read."""


@runtime_checkable
class ImageTokenizer(Protocol):
    """What database building, query construction and DAiD need from a model's VQ tokenizer."""

    grid: tuple[int, int]  # (H, W) image tokens per image
    codebook_size: int
    embed_dim: int  # width of one codebook vector
    image_size: int  # pixels per side expected by the encoder
    device: torch.device  # where the codebook and the encoder live (default device of retrieval)

    def codebook(self) -> torch.Tensor:
        """(V, d) L2-normalised codebook rows: what a generated token contributes to a query."""

    def fingerprint(self) -> str:
        """Short hash of the codebook (see :func:`codebook_fingerprint`), stored in databases."""

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) in [-1, 1] -> (latents (B, H, W, d) L2-normalised per cell, tokens (B, H, W))."""


@runtime_checkable
class GridPerCall(Protocol):
    """An :class:`ImageTokenizer` of a family that picks its image grid per call (Emu3, GLM-Image): built
    from the model alone, its ``grid`` raises :class:`MemberUnavailable`; :meth:`arrag_kernels.PatchDatabase.build`
    then reads the grid from the images' size (``pixels_per_token`` pixels per token) through ``at_grid``."""

    pixels_per_token: int  # pixels of the encoder's input per image token, along each side

    def at_grid(self, grid: tuple[int, int]) -> ImageTokenizer:
        """The tokenizer for images of ``grid`` = (H, W) tokens."""


@runtime_checkable
class ImageDecoder(Protocol):
    """What the KV-cached decode loops need from a model (CFG rows doubled: [cond; uncond])."""

    grid: tuple[int, int]  # (H, W): the loop generates H * W tokens in raster order

    def cfg_inputs(self, input_ids: torch.Tensor, generation_config: Any) -> torch.Tensor:
        """(B, S) prompt ids -> (2B, S, D) input embeddings: conditional rows, then the unconditional ones.

        ``generation_config`` is HF's prepared ``GenerationConfig`` (special token ids, kwargs).
        """

    def check_image_generation(self) -> None:
        """Raise (one clear line) if this model cannot generate images; called when image generation is
        patched in, so text-only use of a model with an inconsistent image config is unaffected."""

    def new_cache(self) -> Any:
        """A fresh KV cache for :meth:`step` (dynamic loop)."""

    def step(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, cache: Any,
             position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run the language model on new input embeddings; return the last hidden state (2B, D).

        ``attention_mask`` is 2-D (2B, seen + new) for the library's dynamic cache, or a prepared
        4-D additive mask with explicit ``position_ids`` for its static cache.
        """

    def kv_spec(self) -> tuple[int, int, int]:
        """(layers, key/value heads, head dim): the shape of a pre-allocated KV cache."""

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(2B, D) -> (2B, V) image-token logits."""

    def embed_image_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(2B, 1) token ids -> (2B, 1, D) next-step input embeddings."""

    def decode_pixels(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, H*W) image token ids -> (B, S, S, 3) pixels, nominally in [-1, 1] (the family's VQ decoder's own
        output, unclamped: HF Janus's overshoots slightly; clamp before writing images)."""


@runtime_checkable
class ModelAdapter(ImageTokenizer, ImageDecoder, Protocol):
    """A full adapter, what :func:`arrag_kernels.register_adapter` factories return: both protocols."""


@runtime_checkable
class TeacherForcingAdapter(ModelAdapter, Protocol):
    """What teacher-forced scoring (:func:`arrag_kernels.eval.image_nll`) and training need beyond
    :class:`ModelAdapter`: the sequence is ``embed_prompt(prompt)`` then ``embed_image_tokens`` of the
    ground-truth tokens, run through ``hidden_states``; ``image_logits`` reads the result."""

    def embed_prompt(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, P) prompt ids -> (B, P, D) input embeddings (``cfg_inputs``' conditional rows)."""

    def unconditional_prompt(self, prompt_ids: torch.Tensor, generation_config: Any) -> torch.Tensor:
        """(B, P) prompt ids -> (B, P) ids of their unconditional CFG rows (``cfg_inputs``' second half),
        the special token ids read from ``generation_config``."""

    def empty_prompt(self, generation_config: Any) -> torch.Tensor:
        """(1, P) ids of an image prompt without text (Janus: BOS, begin-of-image): what ``train-faid``
        trains on unless given prompt ids."""

    def hidden_states(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """(B, S, D) input embeddings -> (B, S, D) final hidden states of one causal forward without a
        cache (training, teacher forcing); ``image_logits`` applies to them."""


def teacher_forced_logits(adapter: TeacherForcingAdapter, prompt_ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, P) prompts and (B, N) ground-truth image tokens -> (B, N, V) image-head logits: the prompt, then
    image tokens 0..N-2 as next-step inputs, one causal forward; the hidden state at sequence position
    P-1+j predicts token j. The one teacher-forced forward of the package (NLL, training; FAiD runs it
    with its blender hooks installed)."""
    P, N = prompt_ids.shape[1], tokens.shape[1]
    embeds = torch.cat([adapter.embed_prompt(prompt_ids), adapter.embed_image_tokens(tokens[:, :-1])], dim=1)
    return adapter.image_logits(adapter.hidden_states(embeds)[:, P - 1 : P - 1 + N])


@runtime_checkable
class FAiDAdapter(TeacherForcingAdapter, Protocol):
    """What FAiD (decode-time blenders, training, blender checkpoints) needs beyond :class:`TeacherForcingAdapter`.

    The retrieved token ids become the blenders' input through ``embed_image_tokens`` (the
    next-input embedding, official: ``generation_aligner(generation_embeddings(ids))``).
    """

    hidden_size: int  # D: width of the decoder layers (and of the blenders)
    rms_norm_eps: float  # epsilon of the blenders' RMSNorm (the model's own)
    dtype: torch.dtype  # dtype of the blenders and of their context buffers
    lora_targets: tuple[str, ...]  # module names LoRA adapts in lora_module() (official: q_proj, v_proj)

    def decoder_layers(self) -> Sequence[torch.nn.Module]:
        """The decoder layers in order; blenders sit in ``layer_idx % (L // blenders) == 0``."""

    def blender_sites(self, layer: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(norm, attention) submodules of one decoder layer: a forward hook on ``norm`` sees the layer's
        normalised input (the blender's context), one on ``attention`` may add the blend to its output
        (the residual after attention, before the FFN). The attention output is a tensor or a tuple
        whose first entry is the (rows, S, D) tensor."""

    def lora_module(self) -> torch.nn.Module:
        """The module LoRA adapters are injected into (the decoder stack)."""

    def image_head(self) -> torch.nn.Module:
        """The image-token head (what ``image_logits`` runs), trained with ``train_head``."""


class ImageStream(NamedTuple):
    """Where a family's own ``generate`` writes the image in its token sequence (vocabulary ids)."""

    start_token_id: int  # the image tokens start right after the last occurrence of this id
    code_token_ids: torch.Tensor  # (V_img,) vocabulary id of each image code, in code order
    eol_token_id: int | None  # id closing each row of W image tokens, or None when rows follow each other
    offset: int = 0  # tokens between the start token and the grid's first cell (GLM-Image: its preview grid)


@runtime_checkable
class LogitsProcessorAdapter(ImageTokenizer, Protocol):
    """An adapter whose family decodes images in its own HF ``generate`` (Emu3): it sets
    ``generate_mode = "logits_processor"`` and :func:`arrag_kernels.patch_model` then wraps that
    ``generate``, adding DAiD as a logits processor to each image-generation call, instead of
    routing it through the library's decode loop (:class:`ModelAdapter`). The adapter supplies
    facts only (the call's grid, the image stream's vocabulary ids, the tokenizer's codebook); the
    library builds the processor from them (:meth:`arrag_kernels.DAiDLogitsProcessor.for_adapter`)."""

    generate_mode: str  # "logits_processor"
    no_loop_reason: str  # one line: why the library's loops and FAiD do not apply (shown when asked for)

    def generation_grid(self, input_ids: torch.Tensor | None, grid: tuple[int, int] | None = None,
                        **generate_kwargs):
        """(H, W) an image-generation call's prompt ids ask for (``grid``: the call's explicit one), None
        for any other call (passed through untouched); raises one line if the size cannot be read.
        ``generate_kwargs``: the call's other ``generate`` arguments (GLM-Image reads ``image_grid_thw``)."""

    def image_stream(self, **generate_kwargs) -> ImageStream:
        """The vocabulary ids of the image stream an image-generation call (its ``generate`` arguments)
        writes: its start, one id per image code, the end-of-line token, the offset of the grid after the
        start; raises one line if the model's vocabulary lacks them."""


@runtime_checkable
class PipelineAdapter(ImageTokenizer, Protocol):
    """An adapter whose family samples a masked token grid inside its own pipeline call (diffusers'
    ``AmusedPipeline``), through one sampler-step function of one of the pipeline's parts: it sets
    ``generate_mode = "pipeline"`` and :func:`arrag_kernels.patch_model` then replaces that function on that
    part's instance (``patch_target()``) by the same step with masked DAiD applied to its logits
    (:func:`arrag_kernels.masked.step_with_daid`), restored on unpatch; the pipeline call itself is
    unchanged. The adapter supplies facts only. The registry finds a pipeline by its class name (a
    diffusers pipeline's config records no ``model_type``)."""

    generate_mode: str  # "pipeline"
    no_loop_reason: str  # one line: why the library's loops and FAiD do not apply (shown when asked for)
    mask_token_id: int  # the id of unknown cells in the step's token grid (outside [0, codebook_size))
    start_fraction: float  # steps t >= ceil(start_fraction * T) of a T-step call retrieve

    def patch_target(self) -> tuple[Any, str]:
        """(object, attribute name) of the step function, called as ``step(logits, timestep, grid, *args,
        **kwargs)`` with guided logits (B, V, H, W) and a (B, H, W) grid, or (B, H*W, V) and (B, H*W); it
        draws the grid's unknown cells from ``softmax(logits)`` and returns what the pipeline expects."""

    def step_index(self, timestep) -> tuple[int, int]:
        """(t, T): the 0-based index of a step call's ``timestep`` in its pipeline call, and the number of steps."""


@runtime_checkable
class OfficialWeights(Protocol):
    """Names of a released FAiD checkpoint (base model + blenders) for one family (Janus: the official
    AR-RAG release in DeepSeek names). Adapters of families with such a release expose one as
    ``official_weights``."""

    blender_prefix: str  # what precedes ``layers.{i}.blender.*`` in the release

    def base_names(self, key: str, value: torch.Tensor) -> dict | None:
        """One released base tensor -> {model state-dict name: tensor} (several for a fused tensor), None if unknown."""

    def dropped(self, key: str) -> bool:
        """True for released tensors with no place in the model by design (never loaded nor reported)."""


@runtime_checkable
class PretrainedLoader(Protocol):
    """What the CLI needs from a registered factory to load ``--model DIR`` checkpoints of its family
    (found through ``config.json``'s ``model_type``; see :func:`arrag_kernels.models.load_pretrained`)."""

    def load_pretrained(self, path, device) -> tuple[torch.nn.Module, Any]:
        """-> (model on ``device`` in eval mode, ``encode_prompts`` or None). ``encode_prompts(texts)``
        turns a list of text prompts into ``(input_ids, attention_mask)`` for image generation; None
        when the checkpoint has no tokenizer (prompts are then given as ids). Raises OSError or
        ValueError for a checkpoint that cannot be loaded."""


def protocol_members(protocol: type) -> dict[str, bool]:
    """{member name: is it a method} for a protocol class and the protocols it extends."""
    members: dict[str, bool] = {}
    for cls in protocol.__mro__:
        if cls in (object, Protocol) or not getattr(cls, "_is_protocol", False):
            continue
        for name in vars(cls).get("__annotations__", {}):
            members.setdefault(name, False)
        for name, value in vars(cls).items():
            if not name.startswith("_") and callable(value):
                members.setdefault(name, True)
    return members


_ABSENT = object()  # getattr_static's default: the member is not defined at all


def check_protocol(obj, protocol: type, what: str | None = None):
    """Return ``obj`` if it has every member of ``protocol``; otherwise raise one TypeError naming them all:
    the missing members, those that are not callable and those whose reading raised (with the error).

    A property raising :class:`MemberUnavailable` is present (its value needs set-up the caller may not
    need); it raises again, with its own message, where it is read."""
    missing, not_callable, raised = [], [], []
    for name, is_method in protocol_members(protocol).items():
        try:
            value = getattr(obj, name)
        except MemberUnavailable:
            continue
        except Exception as e:  # every failure is reported below, none is swallowed
            if isinstance(e, AttributeError) and inspect.getattr_static(obj, name, _ABSENT) is _ABSENT:
                missing.append(name + ("()" if is_method else ""))
            else:  # defined, but reading it failed (e.g. a property reaching a part the model lacks)
                lines = str(e).strip().splitlines()
                raised.append(f"{name} ({type(e).__name__}: {lines[0] if lines else 'no message'})")
            continue
        if is_method and not callable(value):
            not_callable.append(name)
    if missing or not_callable or raised:
        problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"not callable: {', '.join(not_callable)}"] if not_callable else []) + (
            [f"reading raised: {'; '.join(raised)}"] if raised else [])
        raise TypeError(
            f"{what or type(obj).__name__} does not implement arrag_kernels.models.{protocol.__name__}: "
            f"{'; '.join(problems)}. Add or fix these members (see the {protocol.__name__} docstrings)"
        )
    return obj


def codebook_fingerprint(codebook: torch.Tensor) -> str:
    """Short hash identifying a VQ codebook, stored in databases to catch a mismatched model."""
    data = codebook.detach().float().cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


# On the CPU, images whose first-level encoder activations (channels x H x W x element size) take at
# least this many bytes go through a convolutional VQ encoder one at a time in channels-last layout.
_ENCODER_CPU_PER_IMAGE_BYTES = 4 << 20


def encoder_batches(pixels: torch.Tensor, channels: int) -> tuple[torch.Tensor, ...]:
    """Sub-batches in which to run a 2-D convolutional VQ encoder whose first level has ``channels``
    channels. On the CPU, large images one at a time in channels-last layout: oneDNN's convolutions
    then need no layout reorders and one image's activations stay near the caches (measured on 2
    cores against a batch of 16 in the default layout: 1.8-2x the throughput for a 384-px, 32-channel
    Janus VQ encoder, 1.15x for Janus-Pro's own, compute-bound VQ), and an image's latents do not
    depend on the batch it came in (multi-threaded channels-last kernels round differently for
    different batch sizes, which would make a database depend on ``batch_size`` and chunking). Small
    images (one per call was 2.4x slower for 32-px images) and other devices: the batch as it is."""
    per_image = channels * pixels.shape[-2] * pixels.shape[-1] * pixels.element_size()
    if pixels.device.type != "cpu" or per_image < _ENCODER_CPU_PER_IMAGE_BYTES:
        return (pixels,)
    return tuple(image.contiguous(memory_format=torch.channels_last) for image in pixels.split(1))


class VQCodebook:
    """``codebook()`` / ``fingerprint()`` / ``nearest_codes()`` for adapters whose VQ model (``self.vq``)
    keeps its codebook in ``quantize.embedding`` (HF Janus, Emu3): rows L2-normalised as HF's lookups
    see them; the fingerprint hashes the raw rows."""

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.vq.quantize.embedding.weight.detach(), p=2, dim=-1)

    def fingerprint(self) -> str:
        return codebook_fingerprint(self.vq.quantize.embedding.weight)

    @torch.no_grad()
    def nearest_codes(self, cells: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """HF's quantizer ids for (N, d) latent cells: argmin of the squared L2 distance to the raw
        codebook rows, first minimum. Through the library's exact search, so no (cells x codebook)
        distance matrix is built (HF's: 3.6 GB for 64 Janus-Pro images), and ``chunk`` cells at a time
        bound the reference backend's memory. Returns (N,) int64."""
        codebook = self.vq.quantize.embedding.weight.detach()
        return torch.cat([knn(part, codebook, 1)[1][:, 0] for part in cells.float().split(chunk)])

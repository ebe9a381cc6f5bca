"""Per-instance, reversible patching of a model's ``generate`` for retrieval-augmented image generation.

``patch_model`` binds a ``generate`` on the model *instance* (the class and the transformers
modules are never touched) that routes ``generation_mode="image"`` through the library's decode
loop and leaves every other mode to the original method. Families whose own HF ``generate`` decodes
images (their adapter's ``generate_mode`` is ``"logits_processor"``: Emu3) instead keep that
``generate`` and get DAiD as a logits processor added to each image-generation call, built here from
the adapter's facts (:meth:`arrag_kernels.DAiDLogitsProcessor.for_adapter`). Pipelines that sample
a masked grid in their own call (the adapter's ``generate_mode`` is ``"pipeline"``: diffusers'
``AmusedPipeline``) keep that call; the sampler step the adapter names (``patch_target()``: its
scheduler's ``step``) is bound on that part's instance with masked DAiD applied to its logits
(:func:`arrag_kernels.masked.step_with_daid`). The database is moved to the retrieval device once
per patch: DAiD and FAiD share that copy.
``unpatch_model`` / ``handle.remove()`` / leaving ``with patched(...)`` delete that binding again,
restoring the original behaviour exactly.
"""

from __future__ import annotations

import contextlib
import os

from .config import DAiDConfig
from .decoding import DAiDSampler, DecodeStats, FAiDRuntime, hf_image_generate
from .faid import FAiDConfig, load_blenders
from .masked import MaskedDAiD, step_with_daid
from .models import ImageTokenizer, LogitsProcessorAdapter, PipelineAdapter, check_protocol, get_adapter
from .retrieval import DistributedDatabase, PatchDatabase
from .retrieval.query import on_device

# The live handle sits in the instance's __dict__ beside the bound generate (a reference cycle the
# garbage collector frees with the model).
_HANDLE_ATTR = "_arrag_kernels_patch"
_MISSING = object()


def _handle_of(model):
    return model.__dict__.get(_HANDLE_ATTR)


# generate_mode of an adapter whose family samples in its own call -> the protocol it then implements
_OWN_CALL_MODES = {"logits_processor": LogitsProcessorAdapter, "pipeline": PipelineAdapter}


def _patch_adapter(model):
    """The family's adapter: a ModelAdapter (library decode loop) or, when it says so, a LogitsProcessorAdapter
    or a PipelineAdapter."""
    try:
        return get_adapter(model)
    except TypeError as error:
        loop_error = error
    try:
        adapter = get_adapter(model, ImageTokenizer)
    except TypeError:
        raise loop_error from None
    protocol = _OWN_CALL_MODES.get(getattr(adapter, "generate_mode", None))
    if protocol is None:
        raise loop_error
    return check_protocol(adapter, protocol, f"the adapter for {type(model).__name__}")


class PatchHandle:
    """The live patch of one model. ``remove()`` undoes it; ``generate_images`` exposes timings; ``daid`` is the
    DAiD state (the loop's ``DAiDSampler``; a pipeline's ``MaskedDAiD``; None for a logits-processor family)."""

    def __init__(self, model, db, config, device=None, blender_weights=None):
        self.adapter = _patch_adapter(model)
        self.db = db
        self.config = config
        self.daid = None
        self.faid = None
        configs = config if isinstance(config, tuple) else (() if config is None else (config,))
        for c in configs:
            if not isinstance(c, (DAiDConfig, FAiDConfig)):
                raise TypeError(
                    f"config: expected an arrag_kernels.DAiDConfig, FAiDConfig or a tuple of both, got {type(c).__name__}"
                )
        if len({type(c) for c in configs}) != len(configs):
            raise ValueError("config: give at most one DAiDConfig and one FAiDConfig")
        if configs and db is None:
            raise ValueError("DAiD and FAiD need a PatchDatabase: patch_model(model, db, config)")
        if db is not None and not isinstance(db, (PatchDatabase, DistributedDatabase)):
            hint = f"; load it first: arrag_kernels.PatchDatabase.load({db!r})" if isinstance(db, (str, os.PathLike)) else ""
            raise TypeError(f"db: expected an arrag_kernels.PatchDatabase, got {type(db).__name__}{hint}")
        if db is not None and not configs:
            raise ValueError("a database was given without a config; pass e.g. arrag_kernels.DAiDConfig()")
        faid_config = next((c for c in configs if isinstance(c, FAiDConfig)), None)
        if (faid_config is None) != (blender_weights is None):
            raise ValueError("blender_weights are needed with a FAiDConfig, and only with one")
        self.model = model
        if self._processor_mode or self._pipeline_mode:
            if faid_config is not None or not configs or device is not None:
                what = "FAiD" if faid_config else "device=" if configs else "patching without a config"
                raise ValueError(f"{what} is not available for "
                                 f"{type(model).__name__}: {self.adapter.no_loop_reason}; patch with an "
                                 "arrag_kernels.DAiDConfig only")
            self.db = on_device(db, self.adapter.device)  # where the family's logits are: one copy for every call
        if self._pipeline_mode:
            owner, name = self.adapter.patch_target()
            self._target = (owner, name, owner.__dict__.get(name, _MISSING))
            # the retriever (and its checks of the database against the adapter) is built now, once
            self.daid = MaskedDAiD(self.db, configs[0], self.adapter)
            self._patched_step = step_with_daid(getattr(owner, name), self.adapter, self.daid)
            return
        self._saved_generate = model.__dict__.get("generate", _MISSING)
        self._original_generate = model.generate  # bound method (or the instance's own override)
        if self._processor_mode:
            self._processor_config = configs[0]
            self._processor()  # checks the adapter's facts and the database against the model now
            return
        if configs:  # retrieval only serves image generation; text-only patches never need the image grid
            self.adapter.check_image_generation()
        if db is not None:  # the one device copy of this patch, shared by DAiD and FAiD
            db = self.db = on_device(db, device if device is not None else self.adapter.device)
        daid_config = next((c for c in configs if isinstance(c, DAiDConfig)), None)
        if daid_config is not None:
            self.daid = DAiDSampler(db, daid_config, self.adapter, device=device)
        if faid_config is not None:  # last: its forward hooks are the only side effect of a failed patch
            self.faid = FAiDRuntime(model, self.adapter, db, load_blenders(blender_weights, self.adapter, faid_config),
                                    device=device)

    def generate_images(self, inputs=None, attention_mask=None, logits_processor=None, stats: DecodeStats | None = None,
                        progress: bool = False, **kwargs):
        """Image generation with HF ``generate`` arguments; fills ``stats`` with timings if given."""
        if self._processor_mode or self._pipeline_mode:
            call = "the pipeline" if self._pipeline_mode else "model.generate(...)"
            raise ValueError(f"generate_images runs the library's decode loop, which {type(self.model).__name__} does "
                             f"not use ({self.adapter.no_loop_reason}); call {call} (patched) instead")
        self.adapter.check_image_generation()
        return hf_image_generate(
            self.model, self.adapter, daid=self.daid, faid=self.faid, inputs=inputs, attention_mask=attention_mask,
            logits_processor=logits_processor, stats=stats, progress=progress, **kwargs,
        )

    def _generate(self, inputs=None, attention_mask=None, logits_processor=None, **kwargs):
        if kwargs.get("generation_mode", "text") != "image":
            return self._original_generate(inputs, attention_mask=attention_mask, logits_processor=logits_processor, **kwargs)
        return self.generate_images(inputs, attention_mask, logits_processor, **kwargs)

    @property
    def _processor_mode(self) -> bool:
        return getattr(self.adapter, "generate_mode", None) == "logits_processor"

    @property
    def _pipeline_mode(self) -> bool:
        return getattr(self.adapter, "generate_mode", None) == "pipeline"

    def _generate_with_processor(self, inputs=None, generation_config=None, logits_processor=None, *args, grid=None,
                                 **kwargs):
        """The family's own ``generate`` with DAiD appended to ``logits_processor`` on image-generation calls.

        HF runs user processors after its own (CFG, ``prefix_allowed_tokens_fn``) and before its
        sampling warpers; the call's ``temperature`` / ``top_k`` / ``top_p`` therefore move into the
        DAiD processor (applied before the merge, as in the fused sampler) and ``generate`` gets neutral ones.
        """
        for key in ("loop", "overlap_retrieval"):
            if key in kwargs:
                raise ValueError(f"generate({key}=...) is not available for {type(self.model).__name__}: "
                                 f"{self.adapter.no_loop_reason}")
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        call_grid = self.adapter.generation_grid(input_ids, grid, **kwargs)
        if call_grid is None:  # not an image-generation call: untouched
            return self._original_generate(inputs, generation_config, logits_processor, *args, **kwargs)
        if call_grid != tuple(self.db.meta.grid):
            raise ValueError(f"the call generates a {call_grid[0]}x{call_grid[1]} token grid but the database was built "
                             f"for {self.db.meta.grid[0]}x{self.db.meta.grid[1]}; generate at the database's size "
                             "or patch with a database of this size")
        from transformers import LogitsProcessorList

        resolved, _ = self.model._prepare_generation_config(generation_config, **kwargs)  # HF's defaults + the call's
        filters = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
        if resolved.do_sample:
            daid_filters = {k: getattr(resolved, k) if getattr(resolved, k) is not None else v for k, v in filters.items()}
            kwargs.update(filters)
        else:  # greedy: HF applies no warpers
            daid_filters = filters
        daid = self._processor({**kwargs, "input_ids": input_ids}, **daid_filters)
        processors = LogitsProcessorList([*(logits_processor or []), daid])
        return self._original_generate(inputs, generation_config, processors, *args, **kwargs)

    def _processor(self, generate_kwargs=None, **filters):
        from .decoding.logits import DAiDLogitsProcessor  # loads transformers' generation module

        return DAiDLogitsProcessor.for_adapter(self.adapter, self.db, self._processor_config,
                                               generate_kwargs=generate_kwargs, **filters)

    def _install(self):
        if self._pipeline_mode:
            owner, name, _ = self._target
            owner.__dict__[name] = self._patched_step
        else:
            self.model.__dict__["generate"] = self._generate_with_processor if self._processor_mode else self._generate
        self.model.__dict__[_HANDLE_ATTR] = self

    def remove(self) -> None:
        """Restore the model's original ``generate`` (a pipeline: its sampler step). Idempotent."""
        model = self.model
        if _handle_of(model) is not self:
            return
        if self.faid is not None:
            self.faid.remove()
        owner, name, saved = self._target if self._pipeline_mode else (model, "generate", self._saved_generate)
        if saved is _MISSING:
            owner.__dict__.pop(name, None)
        else:
            owner.__dict__[name] = saved
        del model.__dict__[_HANDLE_ATTR]


def patch_model(model, db=None, config=None, device=None, blender_weights=None) -> PatchHandle:
    """Make ``model.generate(..., generation_mode="image")`` generate with AR-RAG.

    Families whose own ``generate`` decodes images (HF Emu3) keep it: the patched ``generate`` adds
    DAiD as a logits processor to each image-generation call (the grid read from the prompt, or
    ``grid=(H, W)``), with every HF feature of that call; only a ``DAiDConfig`` applies there.
    A pipeline that samples a masked grid in its own call (diffusers' ``AmusedPipeline``) keeps that call:
    DAiD joins its scheduler step (``pipe(prompt, ...)`` unchanged); only a ``DAiDConfig`` applies.

    Args:
        model: a supported model instance (HF ``JanusForConditionalGeneration``, ``Emu3ForConditionalGeneration``)
            or pipeline (diffusers ``AmusedPipeline``).
        db: the :class:`arrag_kernels.PatchDatabase` to retrieve from (or a
            :class:`arrag_kernels.retrieval.DistributedDatabase` split over processes); it must have been
            built for this model's codebook size and grid.
        config: :class:`arrag_kernels.DAiDConfig`, :class:`arrag_kernels.FAiDConfig` or a tuple of
            both; ``None`` runs the library's decode loop without retrieval.
        device: where retrieval runs (default: the model's device; Emu3: the logits' device, not settable).
        blender_weights: FAiD only: a path (ours or the official naming), a state dict or a
            :class:`arrag_kernels.faid.FAiDBlenders`; its hooks are removed on unpatch.

    Returns:
        A :class:`PatchHandle`; ``handle.remove()`` or :func:`unpatch_model` undoes the patch.
    """
    if _handle_of(model) is not None:
        raise RuntimeError(
            f"{type(model).__name__} instance is already patched by arrag_kernels; "
            "call arrag_kernels.unpatch_model(model) before patching it again"
        )
    handle = PatchHandle(model, db, config, device=device, blender_weights=blender_weights)
    handle._install()
    return handle


def unpatch_model(model) -> None:
    """Undo :func:`patch_model` on ``model``; raises if it is not patched."""
    handle = _handle_of(model)
    if handle is None:
        raise RuntimeError(f"{type(model).__name__} instance is not patched by arrag_kernels")
    handle.remove()


def is_patched(model) -> bool:
    return _handle_of(model) is not None


@contextlib.contextmanager
def patched(model, db=None, config=None, device=None, blender_weights=None):
    """``with patched(model, db, cfg) as handle:`` patch for the block, restore on exit (also on error)."""
    handle = patch_model(model, db, config, device=device, blender_weights=blender_weights)
    try:
        yield handle
    finally:
        handle.remove()

"""Per-instance, reversible patching of a model's ``generate`` for retrieval-augmented image generation.

``patch_model`` binds a ``generate`` on the model *instance* (the class and the transformers
modules are never touched) that routes ``generation_mode="image"`` through the library's decode
loop and leaves every other mode to the original method. ``unpatch_model`` / ``handle.remove()`` /
leaving ``with patched(...)`` delete that binding again, restoring the original behaviour exactly.
"""

from __future__ import annotations

import contextlib

from .config import DAiDConfig
from .decoding import DAiDSampler, DecodeStats, hf_image_generate
from .models import get_adapter

# The live handle sits in the instance's __dict__ beside the bound generate (a reference cycle the
# garbage collector frees with the model).
_HANDLE_ATTR = "_arrag_kernels_patch"
_MISSING = object()


def _handle_of(model):
    return model.__dict__.get(_HANDLE_ATTR)


class PatchHandle:
    """The live patch of one model. ``remove()`` undoes it; ``generate_images`` exposes timings."""

    def __init__(self, model, db, config: DAiDConfig | None, device=None):
        self.adapter = get_adapter(model)
        self.db = db
        self.config = config
        self.daid = None
        if config is not None:
            if not isinstance(config, DAiDConfig):
                raise TypeError(f"config: expected an arrag_kernels.DAiDConfig, got {type(config).__name__}")
            if db is None:
                raise ValueError("DAiD needs a PatchDatabase: patch_model(model, db, DAiDConfig(...))")
            self.daid = DAiDSampler(db, config, self.adapter, device=device)
        elif db is not None:
            raise ValueError("a database was given without a config; pass e.g. arrag_kernels.DAiDConfig()")
        self.model = model
        self._saved_generate = model.__dict__.get("generate", _MISSING)
        self._original_generate = model.generate  # bound method (or the instance's own override)

    def generate_images(self, inputs=None, attention_mask=None, logits_processor=None, stats: DecodeStats | None = None,
                        progress: bool = False, **kwargs):
        """Image generation with HF ``generate`` arguments; fills ``stats`` with timings if given."""
        return hf_image_generate(
            self.model, self.adapter, daid=self.daid, inputs=inputs, attention_mask=attention_mask,
            logits_processor=logits_processor, stats=stats, progress=progress, **kwargs,
        )

    def _generate(self, inputs=None, attention_mask=None, logits_processor=None, **kwargs):
        if kwargs.get("generation_mode", "text") != "image":
            return self._original_generate(inputs, attention_mask=attention_mask, logits_processor=logits_processor, **kwargs)
        return self.generate_images(inputs, attention_mask, logits_processor, **kwargs)

    def _install(self):
        self.model.__dict__["generate"] = self._generate
        self.model.__dict__[_HANDLE_ATTR] = self

    def remove(self) -> None:
        """Restore the model's original ``generate``. Idempotent."""
        model = self.model
        if _handle_of(model) is not self:
            return
        if self._saved_generate is _MISSING:
            model.__dict__.pop("generate", None)
        else:
            model.__dict__["generate"] = self._saved_generate
        del model.__dict__[_HANDLE_ATTR]


def patch_model(model, db=None, config: DAiDConfig | None = None, device=None) -> PatchHandle:
    """Make ``model.generate(..., generation_mode="image")`` generate with AR-RAG.

    Args:
        model: a supported model instance (HF ``JanusForConditionalGeneration``).
        db: the :class:`arrag_kernels.PatchDatabase` to retrieve from; it must have been built for
            this model's codebook size and grid.
        config: :class:`arrag_kernels.DAiDConfig`; ``None`` runs the library's decode loop without
            retrieval.
        device: where retrieval runs (default: the model's device).

    Returns:
        A :class:`PatchHandle`; ``handle.remove()`` or :func:`unpatch_model` undoes the patch.
    """
    if _handle_of(model) is not None:
        raise RuntimeError(
            f"{type(model).__name__} instance is already patched by arrag_kernels; "
            "call arrag_kernels.unpatch_model(model) before patching it again"
        )
    handle = PatchHandle(model, db, config, device=device)
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
def patched(model, db=None, config: DAiDConfig | None = None, device=None):
    """``with patched(model, db, cfg) as handle:`` patch for the block, restore on exit (also on error)."""
    handle = patch_model(model, db, config, device=device)
    try:
        yield handle
    finally:
        handle.remove()

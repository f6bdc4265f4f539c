"""Batched generation over a Hugging Face Qwen3 / Qwen3-MoE model on CPU, with a KV cache.

Scheduling is step-level batching: the engine thread takes every waiting sequence (up to
``max_batch_size``), prefills them together (left padding), then decodes one token per step for the
whole batch, dropping finished rows from the KV cache as it goes. Sequences that arrive while a batch
runs wait for the next batch. Simple and exact: each row sees only its own tokens (attention mask
and per-row positions), so log-probs match a teacher-forced forward of the same weights.

Weight updates take ``model_lock``, which every forward step also holds, so an update never lands
in the middle of a forward pass. They are all-or-nothing: every tensor is checked against the model
(and converted) first, and the model is written only when all of them are valid, so a failed update
leaves the served weights and ``weight_version`` exactly as they were.

A failure while running a batch fails only the sequences that cause it: sampling isolates rows
(``sample_tokens(..., errors=)``), a prefill that fails is retried one sequence at a time, and any
other step failure re-prefills every running sequence on its own (as a retraction does, from its
tokens so far); a sequence that still fails alone is finished as ``abort`` with ``engine error: ...``.
No sequence outgrows the model's context (``context_length``): prompt plus output tokens stop there.

Memory occupation follows SGLang's memory saver (``engine_api``'s MEMORY_TAGS, :meth:`CpuEngine.release_memory`):
releasing ``weights`` drops every parameter's storage and the spare receive buffers and hands the freed pages
back to the OS, so the process's resident memory falls by the model's size; resuming them allocates the
parameters again (zeros, not the model: like SGLang without a CPU backup), and they serve again once a weight
update that completes a version (a disk update, or the update carrying ``weight_version``) has loaded them.
While anything is released, or the resumed weights are not loaded yet, the engine runs no step and
:meth:`CpuEngine.serving_refusal` tells /generate why it refuses (SGLang itself would touch unmapped memory).

Pausing follows SGLang's modes: ``abort`` finishes everything in flight as aborted; ``in_place`` holds
the running rows with their KV cache; ``retract`` moves them back to the front of the queue, keeping
their tokens, log-probs, routed experts and sampling generator, and drops their KV, which the next
prefill recomputes (with whatever weights are loaded by then). :meth:`CpuEngine.pause` returns once
the generation thread has stopped between two steps.
"""
from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterable, Optional

import numpy as np
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from rollout_sglang.cpu_server.sampling import SamplingParams, sample_tokens
from rollout_sglang.cpu_server.weights import commit_staged, iter_safetensors_dir, stage_hf_named_tensors, \
    weight_destination
from rollout_sglang.engine_api import MEMORY_TAGS, MEMORY_WEIGHTS
from rollout_sglang.types import FinishReason

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's ``malloc_trim``): glibc keeps freed blocks below its
    mmap threshold mapped for reuse, so without this a released model would still count as resident."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


@dataclass(eq=False)
class Sequence:
    """One sample being generated (a request with n > 1 becomes n sequences sharing ``rid``)."""

    rid: str
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    return_routed_experts: bool = False
    on_done: Optional[Callable[["Sequence"], None]] = None
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    routed: list[np.ndarray] = field(default_factory=list)  # chunks of (tokens, layers, topk)
    generator: Optional[torch.Generator] = None  # seeded at the first prefill, kept across a retraction
    finish: Optional[FinishReason] = None
    weight_version: str = ""
    abort_message: Optional[str] = None  # set by abort(); honoured at the next step boundary
    created: float = field(default_factory=time.monotonic)
    finished_at: float = 0.0


class CpuEngine:
    """Owns the model, the waiting queue and the generation thread (``threads`` torch threads;
    default: ``OMP_NUM_THREADS`` or 1)."""

    def __init__(self, model_path: str, dtype: str = "float32", max_batch_size: int = 256,
                 weight_version: str = "default", threads: Optional[int] = None,
                 context_length: Optional[int] = None):
        if dtype not in DTYPES:
            raise ValueError(f"--dtype: expected one of {sorted(DTYPES)}; got {dtype!r}")
        self.model_path = model_path
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.weight_version = weight_version
        self.threads = threads or int(os.environ.get("OMP_NUM_THREADS", "1"))
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[dtype]).eval()
        self.config = self.model.config
        self.context_length = self._context_length(context_length)
        self._params = dict(self.model.named_parameters())
        self.model_lock = threading.RLock()
        # Buffers the last update freed, by name (a parameter's retired storage, or the received
        # slice of a fused parameter once copied): the next update of that name is received into
        # them (no allocation, pages already mapped). Costs one more copy of the weights in memory.
        self._spare: dict[str, torch.Tensor] = {}
        self._spare_lock = threading.Lock()
        self._released: set[str] = set()  # memory regions released (engine_api.MEMORY_TAGS)
        self._weights_loaded = True  # false from a weights release until an update completes a version
        self._weight_shapes: dict[str, tuple[torch.Size, torch.dtype]] = {}  # what a released model had
        eos = getattr(self.config, "eos_token_id", None)
        self.eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
        self._routers = self._find_routers()
        self._captured: list[torch.Tensor] = []
        self._capture = False
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._paused = False
        self._retract = False  # a retract pause not yet carried out by the generation thread
        self._pause_acked = False  # the generation thread has seen the pause (it is between steps)
        self._stopping = False
        self.total_generated_tokens = 0
        self._thread = threading.Thread(target=self._loop, name="cpu-engine", daemon=True)
        self._thread.start()

    # ---- model facts -------------------------------------------------------------------------
    def _context_length(self, requested: Optional[int]) -> int:
        """The model's context (``max_position_embeddings``), or a shorter ``--context-length``; like
        SGLang, a longer one is refused (positions past the trained range give garbage, not errors)."""
        derived = int(getattr(self.config, "max_position_embeddings", 0) or 0)
        if requested is None:
            if derived <= 0:
                raise ValueError("the model config has no max_position_embeddings; pass --context-length")
            return derived
        if requested < 2 or (derived > 0 and requested > derived):
            raise ValueError(f"--context-length: expected 2..{derived} (the model's max_position_embeddings); "
                             f"got {requested}")
        return requested

    @property
    def max_update_numel(self) -> int:
        """A bound on the elements one distributed update may declare, checked before anything is
        allocated: twice the model (a valid update carries each parameter at most once, plus a tied
        lm_head), so a wrong but plausible update is still received and then refused by name (the sender
        is not left waiting), while an absurd shape cannot allocate without bound."""
        # The model's sizes, also while its weights are released (an update then is received and refused by cause).
        sizes = {name: self._weight_shapes[name][0].numel() if MEMORY_WEIGHTS in self._released else p.numel()
                 for name, p in self._params.items()}
        total = sum(sizes.values())
        if getattr(self.config, "tie_word_embeddings", False):
            total += sizes.get("model.embed_tokens.weight", 0)
        return 2 * total

    def budget(self, seq: "Sequence") -> int:
        """How many tokens ``seq`` may generate: its max_new_tokens (None: no limit of its own), never
        past the context length."""
        room = max(0, self.context_length - len(seq.prompt_ids))
        limit = seq.params.max_new_tokens
        return room if limit is None else min(limit, room)

    def _find_routers(self) -> list[torch.nn.Module]:
        routers = []
        for layer in self.model.model.layers:
            gate = getattr(getattr(layer, "mlp", None), "gate", None)
            if gate is not None and hasattr(gate, "top_k") and hasattr(gate, "num_experts"):
                gate.register_forward_hook(self._capture_hook)
                routers.append(gate)
        return routers

    def _capture_hook(self, module, inputs, output) -> None:
        if self._capture:
            self._captured.append(output[2].detach())  # (tokens, top_k) expert ids

    @property
    def is_moe(self) -> bool:
        return bool(self._routers)

    @property
    def routed_experts_shape(self) -> tuple[int, int]:
        return (len(self._routers), self._routers[0].top_k if self._routers else 0)

    # ---- request interface (thread-safe) -------------------------------------------------------
    def submit(self, sequences: Iterable[Sequence]) -> None:
        with self._cond:
            if self._stopping:
                raise RuntimeError("engine is shutting down")
            self._waiting.extend(sequences)
            self._cond.notify_all()

    def abort(self, rid: Optional[str] = None, message: str = "Abort requested") -> int:
        """Abort sequences with ``rid`` (all if None). Waiting ones finish now, running ones at the next step."""
        return self._abort_matching(lambda seq: rid is None or seq.rid == rid, message)

    def abort_sequences(self, sequences: Iterable[Sequence], message: str) -> int:
        """Abort exactly these sequences (e.g. those of one HTTP request whose client went away)."""
        targets = {id(s) for s in sequences}
        return self._abort_matching(lambda seq: id(seq) in targets, message)

    def _abort_matching(self, match: Callable[[Sequence], bool], message: str) -> int:
        finished: list[Sequence] = []
        count = 0
        with self._cond:
            keep: deque[Sequence] = deque()
            for seq in self._waiting:
                if match(seq):
                    seq.finish = FinishReason("abort", message=message)
                    finished.append(seq)
                else:
                    keep.append(seq)
            self._waiting = keep
            for seq in self._running:
                if seq.finish is None and match(seq):
                    seq.abort_message = message
                    count += 1
            self._cond.notify_all()
        for seq in finished:
            self._finish(seq, seq.finish)
        return count + len(finished)

    def pause(self, mode: str = "abort", timeout_s: float = 60.0) -> None:
        """SGLang's pause_generation (see the module docstring); returns once generation has stopped."""
        if mode not in ("abort", "in_place", "retract"):
            raise ValueError(f"mode: expected 'abort', 'in_place' or 'retract'; got {mode!r}")
        with self._cond:
            self._paused = True
            self._retract = mode == "retract"
            self._pause_acked = False
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._pause_acked or self._stopping, timeout=timeout_s)
        if mode == "abort":
            self.abort(None, message="Aborted by pause_generation")

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    def load(self) -> dict:
        with self._cond:
            return {"num_waiting_reqs": len(self._waiting),
                    "num_running_reqs": sum(1 for s in self._running if s.finish is None)}

    def can_flush(self) -> bool:
        """SGLang flushes only with no running request, and no waiting one unless generation is paused."""
        with self._cond:
            running = any(s.finish is None for s in self._running)
            return not running and (self._paused or not self._waiting)

    # ---- memory occupation (SGLang's memory saver) -------------------------------------------
    @property
    def released(self) -> list[str]:
        """The memory regions released now, in ``MEMORY_TAGS`` order."""
        return [t for t in MEMORY_TAGS if t in self._released]

    def serving_refusal(self) -> Optional[str]:
        """Why generation cannot be served now (memory released, or resumed weights not loaded); None if it can."""
        if self._released:
            return (f"memory released ({', '.join(self.released)}) by /release_memory_occupation; "
                    "/resume_memory_occupation (and a weight update, after weights) before generating")
        if not self._weights_loaded:
            return ("the weights were resumed after a release but no weight update has loaded them yet; "
                    "update the weights before generating")
        return None

    def _check_tags(self, tags: Collection[str], released: bool) -> None:
        for tag in tags:
            if tag not in MEMORY_TAGS:
                raise ValueError(f"tags: unknown memory region {tag!r}; expected some of {list(MEMORY_TAGS)}")
            if (tag in self._released) != released:
                raise ValueError(f"tags: {tag!r} is {'not ' if released else 'already '}released")

    def release_memory(self, tags: Collection[str]) -> None:
        """SGLang's release_memory_occupation (see the module docstring). Like SGLang, only on an idle engine:
        nothing running and nothing waiting unless generation is paused (SGLang asserts it, killing its
        scheduler; here a ValueError). ``kv_cache``: the KV cache lives with running batches, and none may
        exist; ``cuda_graph``: there are none. Raises ValueError (the engine unchanged) for a tag that is
        unknown or already released."""
        with self._cond:
            self._check_tags(tags, released=False)
            busy = any(s.finish is None for s in self._running) or (self._waiting and not self._paused)
            if busy:
                raise ValueError("release_memory_occupation needs an idle engine (SGLang asserts it): requests are "
                                 "running or queued; pause generation (retract or abort) first")
            self._released.update(tags)  # from here the generation thread takes no step
        if MEMORY_WEIGHTS in tags:
            with self.model_lock:
                self._weight_shapes = {name: (p.shape, p.dtype) for name, p in self._params.items()}
                for p in self._params.values():  # the Parameter objects stay: tied weights and references hold
                    p.data = torch.empty(0, dtype=p.dtype)
                self._weights_loaded = False
            with self._spare_lock:
                self._spare.clear()
            return_freed_memory()

    def resume_memory(self, tags: Collection[str]) -> None:
        """SGLang's resume_memory_occupation: ``weights`` get their memory back (zeros: the model comes with the
        next weight update). Raises ValueError for a tag that is unknown or not released."""
        with self._cond:
            self._check_tags(tags, released=True)
        if MEMORY_WEIGHTS in tags:
            with self.model_lock:
                for name, p in self._params.items():
                    shape, dtype = self._weight_shapes[name]
                    p.data = torch.zeros(shape, dtype=dtype)  # written: resident now, as SGLang's remapped pages
        with self._cond:
            self._released.difference_update(tags)
            self._cond.notify_all()

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self.abort(None, message="Server shutting down")

    # ---- weights ---------------------------------------------------------------------------
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: Optional[str],
                       model_path: Optional[str] = None) -> int:
        """Load (HF name, tensor) pairs all-or-nothing: everything is read and checked before the model is
        written (generation goes on meanwhile); on any error the model, ``weight_version`` and
        ``model_path`` are untouched. Returns how many tensors were loaded. The engine takes the
        tensors over (a whole parameter adopts its tensor's storage): callers pass tensors they no
        longer use."""
        if MEMORY_WEIGHTS in self._released:
            raise ValueError("the weights are released (/release_memory_occupation); resume them before updating")
        staged, count = stage_hf_named_tensors(self.model, named_tensors, self._params)
        with self.model_lock:  # the swap, between two forward steps: storages adopted or same-shape copies
            retired = commit_staged(staged, adopt=True)
        with self._spare_lock:
            self._spare.update(retired)
            if weight_version is not None:
                self.weight_version = str(weight_version)
            if model_path is not None:
                self.model_path = model_path
        if weight_version is not None or model_path is not None:  # a version is complete: resumed weights serve
            with self._cond:
                self._weights_loaded = True
                self._cond.notify_all()
        return count

    def receive_buffer(self, name: str, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        """Where to receive tensor ``name`` of an update: the buffer its last update freed when that
        fits, else a new one (the served weights are never received into)."""
        with self._spare_lock:
            spare = self._spare.pop(name, None)
        if spare is not None and list(spare.shape) == list(shape) and spare.dtype == dtype:
            return spare
        return torch.empty(shape, dtype=dtype)

    def weight_destination(self, name: str) -> Optional[torch.Tensor]:
        """Where checkpoint tensor ``name`` lives in the model (hold ``model_lock`` while writing it)."""
        return weight_destination(self.model, name, self._params)

    def update_weights_from_disk(self, model_path: str, weight_version: Optional[str]) -> int:
        return self.update_weights(iter_safetensors_dir(model_path), weight_version, model_path=model_path)

    # ---- generation thread -------------------------------------------------------------------
    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.finish = reason
        seq.weight_version = self.weight_version
        seq.finished_at = time.monotonic()
        if seq.on_done is not None:
            try:
                seq.on_done(seq)
            except Exception:  # e.g. the event loop closed at shutdown: never let it reach other sequences
                logger.exception("completion callback of %s failed", seq.rid)

    def _loop(self) -> None:
        torch.set_num_threads(self.threads)
        batch: Optional[_Batch] = None
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    if self._paused:
                        if self._retract and batch is not None:
                            # Back to the front of the queue, in order; their KV is recomputed on the next prefill.
                            self._waiting.extendleft(reversed([s for s in batch.rows if s.finish is None]))
                            batch = None
                            self._running = []
                        self._retract = False
                        self._pause_acked = True
                        self._cond.notify_all()
                    if self._has_work(batch):
                        break
                    self._cond.wait()
                new: list[Sequence] = []
                if not self._paused:  # admit waiting sequences into the running batch (continuous batching)
                    room = self.max_batch_size - (len(batch.rows) if batch else 0)
                    while self._waiting and room > 0:
                        new.append(self._waiting.popleft())
                        room -= 1
                self._running = (batch.rows if batch else []) + new
            try:
                batch = self._step(batch, new)
            except Exception:  # a bug or bad input must not kill the server, nor fail the other rows
                logger.exception("generation step failed; re-running its sequences one by one to find the cause")
                rows, seen = [], set()
                for seq in (batch.rows if batch else []) + new:
                    if seq.finish is None and id(seq) not in seen:
                        seen.add(id(seq))
                        rows.append(seq)
                # The batch's KV cache may be half-written: rebuild each row's from its own tokens.
                batch = self._prefill_isolated(rows)
            finally:
                with self._cond:
                    self._running = list(batch.rows) if batch else []
                    self._cond.notify_all()

    def _has_work(self, batch: Optional["_Batch"]) -> bool:
        if self._released or not self._weights_loaded:
            return False  # no model or no KV memory to run on: requests wait (see serving_refusal)
        if batch is not None and any(s.abort_message for s in batch.rows):
            return True  # aborts finish even while paused
        if self._paused:
            return False
        return bool(self._waiting) or (batch is not None and bool(batch.rows))

    def _forward(self, input_ids, attention_mask, position_ids, cache, capture: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Run one forward; returns (last-position logits [B, V], routed experts [layers, B, S, topk] or None)."""
        with self.model_lock, torch.inference_mode():
            self._captured = []
            self._capture = capture
            try:
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 past_key_values=cache, use_cache=True, logits_to_keep=1)
            finally:
                self._capture = False
        experts = None
        if capture and self._captured:
            b, s = input_ids.shape
            experts = torch.stack(self._captured).reshape(len(self._captured), b, s, -1)
        return out.logits[:, -1, :], experts

    def _prefill_isolated(self, rows: list[Sequence]) -> Optional["_Batch"]:
        """Prefill ``rows`` together; if that fails, each alone, finishing as ``abort`` only the rows
        that fail on their own."""
        if not rows:
            return None
        try:
            return self._prefill(rows)
        except Exception as exc:
            if len(rows) == 1:
                logger.warning("sequence %s failed alone: %s", rows[0].rid, exc)
                self._finish(rows[0], FinishReason("abort", message=f"engine error: {type(exc).__name__}: {exc}"))
                return None
            logger.warning("prefill of %d sequences failed (%s); retrying each alone", len(rows), exc)
        batch: Optional[_Batch] = None
        for seq in rows:
            one = self._prefill_isolated([seq])
            if one is not None:
                batch = one if batch is None else batch.merge(one)
        return batch

    def _prefill(self, rows: list[Sequence]) -> "_Batch":
        """Prefill new (or retracted) sequences together: prompt plus the tokens generated so far, left
        padded so each row's last token is in the last column."""
        contexts = [s.prompt_ids + s.output_ids for s in rows]
        lengths = [len(c) for c in contexts]
        width = max(lengths)
        input_ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, context in enumerate(contexts):
            input_ids[r, width - lengths[r]:] = torch.tensor(context, dtype=torch.long)
            mask[r, width - lengths[r]:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.config)
        capture = self.is_moe and any(s.return_routed_experts for s in rows)
        logits, experts = self._forward(input_ids, mask, positions, cache, capture)
        if experts is not None:
            for r, s in enumerate(rows):
                if s.return_routed_experts:  # a retracted row keeps the rows it has; only new positions are added
                    known = sum(len(chunk) for chunk in s.routed)
                    s.routed.append(experts[:, r, width - lengths[r] + known:, :].permute(1, 0, 2).to(torch.int32).numpy())
        for s in rows:
            if s.generator is None:
                s.generator = torch.Generator().manual_seed(s.seed)
        return _Batch(rows=list(rows), generators=[s.generator for s in rows],
                      cache=cache, mask=mask, next_pos=positions[:, -1] + 1, logits=logits)

    def _step(self, batch: Optional["_Batch"], new: list[Sequence]) -> Optional["_Batch"]:
        """Finish aborts, admit ``new``, sample one token for every row, then run one decode forward."""
        if batch is not None:
            keep = []
            for r, s in enumerate(batch.rows):
                if s.abort_message is not None:  # aborted: return the partial output as it is
                    self._finish(s, FinishReason("abort", message=s.abort_message))
                else:
                    keep.append(r)
            batch = batch.select(keep)
        for seq in new:
            if seq.finish is None and self.budget(seq) <= len(seq.output_ids):
                self._finish(seq, FinishReason("length", length=self.budget(seq)))
        new = [s for s in new if s.finish is None]
        if new:
            fresh = self._prefill_isolated(new)  # a row that cannot be prefilled fails alone
            if fresh is not None:
                batch = fresh if batch is None else batch.merge(fresh)
        if batch is None or self._paused:
            return batch  # paused in place: hold the KV cache and the pending logits

        errors: dict[int, str] = {}
        tokens, logprobs = sample_tokens(batch.logits, [s.params for s in batch.rows], batch.generators, errors)
        keep = []
        for r, s in enumerate(batch.rows):
            if r in errors:  # this row's numbers broke sampling; the others are unaffected
                logger.warning("sequence %s failed: %s", s.rid, errors[r])
                self._finish(s, FinishReason("abort", message=f"engine error: {errors[r]}"))
                continue
            tok = int(tokens[r])
            s.output_ids.append(tok)
            s.logprobs.append(float(logprobs[r]))
            self.total_generated_tokens += 1
            if tok in s.params.stop_token_ids or (not s.params.ignore_eos and tok in self.eos_ids):
                self._finish(s, FinishReason("stop", matched=tok))
            elif len(s.output_ids) >= self.budget(s):
                self._finish(s, FinishReason("length", length=self.budget(s)))
            else:
                keep.append(r)
        batch = batch.select(keep, tokens=tokens)
        if batch is None:
            return None
        batch.mask = torch.cat([batch.mask, torch.ones(len(batch.rows), 1, dtype=torch.long)], dim=1)
        capture = self.is_moe and any(s.return_routed_experts for s in batch.rows)
        batch.logits, experts = self._forward(batch.tokens[:, None], batch.mask, batch.next_pos[:, None], batch.cache, capture)
        if experts is not None:
            for r, s in enumerate(batch.rows):
                if s.return_routed_experts:
                    s.routed.append(experts[:, r, :, :].permute(1, 0, 2).to(torch.int32).numpy())
        batch.next_pos = batch.next_pos + 1
        return batch


@dataclass(eq=False)
class _Batch:
    """The running rows and their KV cache; row r of every tensor belongs to ``rows[r]``."""

    rows: list[Sequence]
    generators: list[torch.Generator]
    cache: DynamicCache
    mask: torch.Tensor  # [B, S] 1 where the cache holds a real token
    next_pos: torch.Tensor  # [B] position id of the next token to feed
    logits: torch.Tensor  # [B, V] next-token logits not yet sampled
    tokens: Optional[torch.Tensor] = None  # [B] tokens just sampled (to feed next)

    def select(self, keep: list[int], tokens: Optional[torch.Tensor] = None) -> Optional["_Batch"]:
        """Keep only rows ``keep`` (None if empty); drops cache columns no remaining row uses."""
        if not keep:
            return None
        if tokens is not None:
            self.tokens = tokens
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, dtype=torch.long)
            self.cache.batch_select_indices(index)
            self.mask, self.next_pos, self.logits = self.mask[index], self.next_pos[index], self.logits[index]
            if self.tokens is not None:
                self.tokens = self.tokens[index]
            self.rows = [self.rows[r] for r in keep]
            self.generators = [self.generators[r] for r in keep]
            used = (self.mask.sum(0) > 0).nonzero()
            first = int(used[0]) if len(used) else 0
            if first > 0:  # left padding nobody needs any more
                for layer in self.cache.layers:
                    layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
                self.mask = self.mask[:, first:]
        return self

    def merge(self, other: "_Batch") -> "_Batch":
        """Append ``other``'s rows; both caches are left-padded to a common length first."""
        width = max(self.mask.shape[1], other.mask.shape[1])

        def pad_left(t: torch.Tensor, dim_from_end: int) -> torch.Tensor:
            missing = width - t.shape[-dim_from_end]
            if missing == 0:
                return t
            pad = [0, 0] * (dim_from_end - 1) + [missing, 0]
            return torch.nn.functional.pad(t, pad)

        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([pad_left(mine.keys, 2), pad_left(theirs.keys, 2)])
            mine.values = torch.cat([pad_left(mine.values, 2), pad_left(theirs.values, 2)])
        self.mask = torch.cat([pad_left(self.mask, 1), pad_left(other.mask, 1)])
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
        self.logits = torch.cat([self.logits, other.logits])
        self.rows += other.rows
        self.generators += other.generators
        self.tokens = None
        return self

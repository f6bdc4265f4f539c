"""HTTP layer of the CPU rollout server (not SGLang): the subset of SGLang 0.5.23's native API we use,
in its dialect, so that CPU runs exercise the protocol a GPU run uses:

- ``/model_info`` carries ``weight_version`` (there is no ``/get_weight_version``); ``/server_info``
  reports the SGLang version whose API it speaks;
- distributed updates are refused outside a ``/begin_weight_update`` .. ``/end_weight_update`` session;
  an update flushes the cache afterwards unless ``flush_cache: false``, and fails if the flush is refused;
- ``/flush_cache`` is refused while a request runs (or waits, unless generation is paused);
- ``/health`` waits while generation is paused (SGLang's runs a one-token generation) and gives up
  after 20 s; otherwise it answers at once (SGLang's generation is skipped: it would change batches);
- ``/release_memory_occupation`` and ``/resume_memory_occupation`` take SGLang's ``tags`` (weights, kv_cache,
  cuda_graph; null or empty: all) and answer 200 with a null body; a release needs an idle engine (pause
  first) and frees the weights for real (the engine docstring). Where SGLang would crash its scheduler (a
  busy engine, resuming what is not released) or touch unmapped memory (generation while released), this
  server answers 400 naming the problem; ``/server_info`` lists what is released (``memory_released``;
  SGLang reports nothing of it);
- a request with ``n > 1`` becomes n samples with ids ``rid_0 .. rid_{n-1}`` (an abort must name
  those); with ``--enable-deterministic-inference`` all of them are sampled with the request's one
  ``sampling_seed``, as SGLang does (identical samples), and ``/server_info`` says so. Without it each
  sample gets a seed of its own derived from the request's (SGLang then samples without a seed; the
  CPU server stays reproducible), and without a seed each sample draws fresh randomness.

Every handler validates its body and answers 400 with a message naming the bad field; the engine
does the generation, the weight receiver the distributed updates. Blocking work (weight loading,
process-group rendezvous, broadcasts, and /generate's body parsing and response building) runs in
worker threads so /health keeps answering.

One bad request or update never hurts anybody else:

- sampling_params are checked with SGLang 0.5.23's rules (finite, in range, right type) before
  anything is queued, so nothing invalid reaches the shared batch (and the engine isolates the rows
  that fail anyway);
- limits: a body over ``max_body_bytes`` is refused with 413 from its Content-Length, before it is
  read (a chunked one when it passes the limit); a request over ``max_request_samples`` samples
  (prompts x n) is refused; as SGLang does, a prompt of ``context_length`` tokens or more is refused,
  an explicit max_new_tokens that overflows the context is refused, and the default or null one is
  clipped to it;
- weight updates are all-or-nothing (see the engine): a failed one leaves the served weights and
  ``weight_version`` as they were;
- an aborted sample says so: ``meta_info.finish_reason`` is SGLang's abort, ``{"type": "abort",
  "message", "status_code", "err_type"}``.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from aiohttp import web

from rollout_sglang.cpu_server import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_REQUEST_SAMPLES
from rollout_sglang.cpu_server.engine import CpuEngine, Sequence
from rollout_sglang.cpu_server.sampling import SamplingParams
from rollout_sglang.cpu_server.weight_receiver import WeightReceiver
from rollout_sglang.engine_api import MEMORY_TAGS, TESTED_SGLANG

logger = logging.getLogger(__name__)
SERVER_NAME = "CPU rollout server (not SGLang)"
HEALTH_CHECK_TIMEOUT_S = 20.0  # SGLang's default (SGLANG_HEALTH_CHECK_TIMEOUT)
NOT_FLUSHED = ("Weights were updated, but the cache was not flushed because requests are still running or queued. "
               "Retract or finish them, then call /flush_cache.")


class BadRequest(ValueError):
    """A request body problem; becomes HTTP 400 with the message."""


def _seed(sampling_seed: Optional[int], prompt_index: int, sample_index: int, shared: bool) -> int:
    """A sample's generator seed: from the request's ``sampling_seed``, the same for all its samples when
    ``shared`` (SGLang's deterministic inference), else distinct per (prompt, sample); fresh randomness
    without a seed."""
    if sampling_seed is None:
        return int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)
    key = str(sampling_seed) if shared else f"{sampling_seed}:{prompt_index}:{sample_index}"
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _sample_rid(rids: list[str], single_rid: bool, prompt: int, sample: int, prompts: int, n: int) -> str:
    """SGLang's id for sample ``sample`` of prompt ``prompt``: with one request id for all, the expanded
    inputs (every prompt, then every prompt again per further sample) are numbered ``rid_<k>``."""
    if n == 1:
        return rids[prompt]
    if single_rid:
        return f"{rids[0]}_{sample * prompts + prompt}"
    return f"{rids[prompt]}_{sample}"


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}, "success": False, "message": message}, status=status)


def _decode_json(raw: bytes) -> dict:
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested arrays
        raise BadRequest(f"body: not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(body, dict):
        raise BadRequest("body: expected a JSON object")
    return body


async def _json_body(request: web.Request) -> dict:
    """A small control body, parsed on the event loop (its size is capped by the app)."""
    if not request.can_read_body:
        return {}
    return _decode_json(await request.read())


def _field(body: dict, key: str, kind: type | tuple, required: bool = True, default: Any = None) -> Any:
    if key not in body or body[key] is None:
        if required:
            raise BadRequest(f"{key}: required")
        return default
    value = body[key]
    if isinstance(value, bool) and kind is not bool and not (isinstance(kind, tuple) and bool in kind):
        raise BadRequest(f"{key}: expected {kind}; got {value!r}")
    if not isinstance(value, kind):
        raise BadRequest(f"{key}: expected {getattr(kind, '__name__', kind)}; got {value!r:.80}")
    return value


@dataclass
class _Generation:
    """One /generate request, parsed and validated (off the event loop)."""

    sequences: list[Sequence]
    batched: bool
    n: int
    return_logprob: bool
    return_experts: bool


class CpuRolloutApp:
    """Binds a :class:`CpuEngine` and a :class:`WeightReceiver` to aiohttp routes."""

    def __init__(self, engine: CpuEngine, log_requests: bool = False, deterministic_inference: bool = False,
                 max_request_samples: int = DEFAULT_MAX_REQUEST_SAMPLES, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        if max_request_samples < 1 or max_body_bytes < 1024:
            raise ValueError(f"limits: max_request_samples >= 1 and max_body_bytes >= 1024; "
                             f"got {max_request_samples}, {max_body_bytes}")
        self.engine = engine
        self.log_requests = log_requests
        self.deterministic_inference = deterministic_inference
        self.max_request_samples = max_request_samples
        self.max_body_bytes = max_body_bytes
        self.receiver = WeightReceiver()
        self.session_open = False  # SGLang's weight-update session (begin_weight_update .. end_weight_update)
        self.tokenizer = self._load_tokenizer(engine.model_path)
        # client_max_size stops a chunked body at the limit (413); a declared one is refused earlier (_errors).
        self.app = web.Application(client_max_size=max_body_bytes, middlewares=[self._errors])
        routes = [
            ("POST", "/generate", self.generate),
            ("GET", "/health", self.health), ("GET", "/health_generate", self.health_generate),
            ("GET", "/get_server_info", self.server_info), ("GET", "/server_info", self.server_info),
            ("GET", "/get_model_info", self.model_info), ("GET", "/model_info", self.model_info),
            ("GET", "/get_load", self.get_load),
            ("POST", "/flush_cache", self.flush_cache), ("GET", "/flush_cache", self.flush_cache),
            ("POST", "/pause_generation", self.pause), ("POST", "/continue_generation", self.resume),
            ("POST", "/abort_request", self.abort),
            ("POST", "/begin_weight_update", self.begin_weight_update),
            ("POST", "/end_weight_update", self.end_weight_update),
            ("POST", "/update_weights_from_disk", self.update_from_disk),
            ("POST", "/init_weights_update_group", self.init_group),
            ("POST", "/update_weights_from_distributed", self.update_from_distributed),
            ("POST", "/destroy_weights_update_group", self.destroy_group),
            ("POST", "/update_weight_version", self.update_weight_version),
        ]
        for method, path, handler in routes:
            self.app.router.add_route(method, path, handler)
        for method in ("GET", "POST"):  # SGLang registers these with api_route: both methods
            self.app.router.add_route(method, "/get_weights_by_name", self.get_weights_by_name)
            self.app.router.add_route(method, "/release_memory_occupation", self.release_memory_occupation)
            self.app.router.add_route(method, "/resume_memory_occupation", self.resume_memory_occupation)
        self.app.on_shutdown.append(self._on_shutdown)

    @staticmethod
    def _load_tokenizer(path: str):
        try:
            from transformers import AutoTokenizer
            return AutoTokenizer.from_pretrained(path)
        except Exception:  # tests use models without a tokenizer: text stays empty, ids are the API
            return None

    async def _on_shutdown(self, app: web.Application) -> None:
        self.engine.shutdown()
        self.receiver.destroy_all()

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        if self.log_requests and request.path not in ("/generate", "/health"):
            logger.info("request %s %s", request.method, request.path)
        size = request.content_length
        if size is not None and size > self.max_body_bytes:  # refused from the header: nothing is read
            return _error(413, f"body: {size} bytes is over this server's limit of {self.max_body_bytes} bytes "
                               f"(--max-body-bytes)")
        try:
            return await handler(request)
        except BadRequest as exc:
            return _error(400, str(exc))
        except web.HTTPException:
            raise
        except Exception as exc:  # report, do not hide: the client sees a 500 naming the problem
            logger.exception("%s %s failed", request.method, request.path)
            return _error(500, f"{type(exc).__name__}: {exc}")

    # ---- generation ----------------------------------------------------------------------------
    def _parse_prompts(self, body: dict) -> tuple[list[list[int]], bool]:
        raw = body.get("input_ids")
        if "text" in body and raw is None:
            raise BadRequest("text: the CPU rollout server takes input_ids only")
        if not isinstance(raw, list) or not raw:
            raise BadRequest("input_ids: expected a non-empty list of token ids or of lists")
        batched = isinstance(raw[0], list)
        prompts = raw if batched else [raw]
        vocab = self.engine.config.vocab_size
        context = self.engine.context_length
        for i, prompt in enumerate(prompts):
            where = f"input_ids[{i}]" if batched else "input_ids"
            if not isinstance(prompt, list) or not prompt:
                raise BadRequest(f"{where}: expected a non-empty list of token ids")
            if len(prompt) >= context:  # SGLang's check and words (tokenizer manager), before the O(len) one
                raise BadRequest(f"{where}: The input ({len(prompt)} tokens) is longer than the model's context "
                                 f"length ({context} tokens).")
            for t in prompt:
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                    raise BadRequest(f"{where}: token {t!r:.40} is not an id in [0, {vocab})")
        return prompts, batched

    def _check_budget(self, prompt: list[int], params: SamplingParams, where: str) -> None:
        """SGLang refuses an explicit max_new_tokens that overflows the context (its default and null
        budgets are clipped instead: :meth:`CpuEngine.budget`)."""
        context = self.engine.context_length
        if params.max_new_tokens_explicit and len(prompt) + params.max_new_tokens > context:
            raise BadRequest(
                f"{where}.max_new_tokens: Requested token count exceeds the model's maximum context length of "
                f"{context} tokens. You requested a total of {len(prompt) + params.max_new_tokens} tokens: "
                f"{len(prompt)} tokens from the input messages and {params.max_new_tokens} tokens for the "
                f"completion. Please reduce the number of tokens in the input messages or the completion to fit "
                f"within the limit.")

    def _plan(self, raw: bytes) -> _Generation:
        """Parse and validate a /generate body and build its sequences; raises BadRequest. Runs in a worker
        thread: its cost grows with the body, which must not stall the event loop."""
        body = _decode_json(raw)
        if body.get("stream"):
            raise BadRequest("stream: streaming is not supported by the CPU rollout server")
        raw_params = body.get("sampling_params")
        # The sample count is checked before anything of its size is built.
        first = raw_params[0] if isinstance(raw_params, list) and raw_params else raw_params
        n = first.get("n") if isinstance(first, dict) else None
        if isinstance(n, int) and not isinstance(n, bool) and n > self.max_request_samples:
            raise BadRequest(f"sampling_params.n: at most {self.max_request_samples} samples per request "
                             f"(--max-request-samples); got {n}")
        prompts, batched = self._parse_prompts(body)
        if isinstance(raw_params, list):  # one per prompt of a batch (SGLang: all with the same n)
            if not batched or len(raw_params) != len(prompts):
                raise BadRequest(f"sampling_params: a list needs a batch of input_ids of the same length "
                                 f"({len(prompts)} prompt(s); got {len(raw_params)})")
            try:
                per_prompt = [SamplingParams.from_json(p, f"sampling_params[{i}]") for i, p in enumerate(raw_params)]
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
        else:
            try:
                per_prompt = [SamplingParams.from_json(raw_params)] * len(prompts)  # never mutated: shared
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
        if len({p.n for p in per_prompt}) != 1:
            raise BadRequest("sampling_params: n must be the same for every prompt of a batch")
        n = per_prompt[0].n
        if len(prompts) * n > self.max_request_samples:
            raise BadRequest(f"input_ids: {len(prompts)} prompts x n={n} is over {self.max_request_samples} samples "
                             f"per request (--max-request-samples)")
        for i, (prompt, params) in enumerate(zip(prompts, per_prompt)):
            self._check_budget(prompt, params, f"sampling_params[{i}]" if isinstance(raw_params, list) else "sampling_params")
        return_logprob = bool(body.get("return_logprob", False))
        return_experts = bool(body.get("return_routed_experts", False))
        if return_experts and not self.engine.is_moe:
            raise BadRequest("return_routed_experts: the model has no experts")
        rid = body.get("rid")
        if isinstance(rid, list):
            if len(rid) != len(prompts) or not all(isinstance(r, str) for r in rid):
                raise BadRequest(f"rid: expected {len(prompts)} strings (one per prompt)")
            rids, single = rid, False
        elif rid is None or isinstance(rid, str):
            base = rid or uuid.uuid4().hex
            if batched and n == 1:
                rids, single = [f"{base}_{i}" for i in range(len(prompts))], False
            else:
                rids, single = [base], True
        else:
            raise BadRequest(f"rid: expected a string or a list of strings; got {rid!r:.60}")
        sequences = [
            Sequence(rid=_sample_rid(rids, single, i, j, len(prompts), n), index=j, prompt_ids=prompt, params=params,
                     seed=_seed(params.sampling_seed, i, j, shared=self.deterministic_inference),
                     return_routed_experts=return_experts)
            for i, (prompt, params) in enumerate(zip(prompts, per_prompt)) for j in range(n)
        ]
        return _Generation(sequences, batched, n, return_logprob, return_experts)

    async def generate(self, request: web.Request) -> web.Response:
        start = time.monotonic()
        refusal = self.engine.serving_refusal()
        if refusal is not None:  # a client error, not an outage: no retry can help until the caller resumes
            return _error(400, f"generate: {refusal}")
        raw = await request.read() if request.can_read_body else b""  # capped at max_body_bytes
        plan = await asyncio.to_thread(self._plan, raw)
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        remaining = [len(plan.sequences)]
        lock = threading.Lock()

        def on_done(seq: Sequence) -> None:  # engine thread: one wake-up of the loop per request, not per sample
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                loop.call_soon_threadsafe(_resolve, done, None)

        for seq in plan.sequences:
            seq.on_done = on_done
        self.engine.submit(plan.sequences)
        while not done.done():
            await asyncio.wait([done], timeout=0.25)
            transport = request.transport
            if not done.done() and (transport is None or transport.is_closing()):
                # The client went away (timeout or retry elsewhere): stop spending compute on it.
                self.engine.abort_sequences(plan.sequences, message="client disconnected")
        body = await asyncio.to_thread(self._render, plan, start)
        return web.Response(body=body, content_type="application/json")

    def _render(self, plan: _Generation, start: float) -> bytes:
        items = [self._item(seq, plan.return_logprob, plan.return_experts, start) for seq in plan.sequences]
        return json.dumps(items[0] if not plan.batched and plan.n == 1 else items).encode()

    def _item(self, seq: Sequence, return_logprob: bool, return_experts: bool, start: float) -> dict:
        ids = list(seq.output_ids)
        text = ""
        if self.tokenizer is not None:
            text_ids = ids
            if not seq.params.no_stop_trim and seq.finish.type == "stop" and ids:
                text_ids = ids[:-1]  # like SGLang, the matched stop token is trimmed from the text only
            text = self.tokenizer.decode(text_ids, skip_special_tokens=seq.params.skip_special_tokens)
        finish = seq.finish.to_json()
        if finish["type"] == "abort":  # SGLang's FINISH_ABORT carries these two as well (null unless an HTTP error)
            finish.setdefault("status_code", None)
            finish.setdefault("err_type", None)
        meta: dict[str, Any] = {
            "id": seq.rid,
            "finish_reason": finish,
            "prompt_tokens": len(seq.prompt_ids),
            "completion_tokens": len(ids),
            "cached_tokens": 0,
            "e2e_latency": seq.finished_at - start,
            "weight_version": seq.weight_version,
        }
        if return_logprob:
            meta["output_token_logprobs"] = [[lp, tok, None] for lp, tok in zip(seq.logprobs, ids)]
            meta["input_token_logprobs"] = None
        if return_experts:
            layers, topk = self.engine.routed_experts_shape
            tokens = len(seq.prompt_ids) + len(ids) - 1  # the last sampled token is never fed forward
            routed = np.concatenate(seq.routed, axis=0) if seq.routed else np.zeros((0, layers, topk), np.int32)
            meta["routed_experts"] = base64.b64encode(np.ascontiguousarray(routed[:tokens], dtype=np.int32).tobytes()).decode()
        return {"text": text, "output_ids": ids, "meta_info": meta}

    # ---- status ---------------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        deadline = time.monotonic() + HEALTH_CHECK_TIMEOUT_S
        while self.engine.paused:  # SGLang's health generation would wait for the pause to end
            if time.monotonic() > deadline:
                return web.Response(status=503)
            await asyncio.sleep(0.05)
        return web.Response(text="OK")

    async def health_generate(self, request: web.Request) -> web.Response:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        seq = Sequence(rid=f"health-{uuid.uuid4().hex}", index=0, prompt_ids=[0],
                       params=SamplingParams(max_new_tokens=1), seed=0,
                       on_done=lambda s: loop.call_soon_threadsafe(_resolve, fut, s))
        self.engine.submit([seq])
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout=30)
        except asyncio.TimeoutError:
            self.engine.abort(seq.rid)
            return _error(503, "health_generate: no token within 30 s")
        return web.Response(text="OK")

    async def server_info(self, request: web.Request) -> web.Response:
        e = self.engine
        return web.json_response({
            "engine": SERVER_NAME, "version": TESTED_SGLANG, "model_path": e.model_path,
            "dtype": e.dtype, "weight_version": e.weight_version, "max_batch_size": e.max_batch_size,
            "context_length": e.context_length, "max_request_samples": self.max_request_samples,
            "max_body_bytes": self.max_body_bytes,
            "tp_size": 1, "dp_size": 1, "paused": e.paused, "enable_deterministic_inference": self.deterministic_inference,
            "memory_released": e.released,
            **e.load(),
        })

    async def model_info(self, request: web.Request) -> web.Response:
        e = self.engine
        info = {"model_path": e.model_path, "tokenizer_path": e.model_path, "is_generation": True,
                "weight_version": e.weight_version, "architectures": list(e.config.architectures or []),
                "vocab_size": e.config.vocab_size}
        if e.is_moe:
            info["routed_experts_shape"] = list(e.routed_experts_shape)
        return web.json_response(info)

    async def get_load(self, request: web.Request) -> web.Response:
        load = self.engine.load()
        return web.json_response([{"dp_rank": 0, "num_reqs": load["num_running_reqs"] + load["num_waiting_reqs"], **load}])

    # ---- control --------------------------------------------------------------------------------
    async def flush_cache(self, request: web.Request) -> web.Response:
        if not self.engine.can_flush():
            return web.Response(status=400, text="Flush cache failed.\n")
        return web.Response(text="Cache flushed.\n")

    async def pause(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        mode = body.get("mode", "abort")
        if mode not in ("abort", "in_place", "retract"):
            raise BadRequest(f"mode: expected 'abort', 'in_place' or 'retract'; got {mode!r}")
        await asyncio.to_thread(self.engine.pause, mode)
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def resume(self, request: web.Request) -> web.Response:
        self.engine.resume()
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

    async def abort(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        if body.get("abort_all"):
            self.engine.abort(None)
        else:  # an exact sample id: the id of an n > 1 request names none of its samples (SGLang ignores it too)
            self.engine.abort(_field(body, "rid", str))
        return web.Response(status=200)

    @staticmethod
    def _memory_tags(body: dict) -> list[str]:
        """SGLang's ``tags`` (``ReleaseMemoryOccupationReqInput``): null or empty means every region."""
        tags = _field(body, "tags", list, required=False, default=None)
        if not tags:
            return list(MEMORY_TAGS)
        if not all(isinstance(t, str) for t in tags):
            raise BadRequest(f"tags: expected a list of strings; got {tags!r:.80}")
        return tags

    async def release_memory_occupation(self, request: web.Request) -> web.Response:
        return await self._memory_occupation(request, self.engine.release_memory, "release_memory_occupation")

    async def resume_memory_occupation(self, request: web.Request) -> web.Response:
        return await self._memory_occupation(request, self.engine.resume_memory, "resume_memory_occupation")

    async def _memory_occupation(self, request: web.Request, change, name: str) -> web.Response:
        """A release or resume of the body's tags; SGLang answers 200 with a null body."""
        tags = self._memory_tags(await _json_body(request))
        try:
            await asyncio.to_thread(change, tags)
        except ValueError as exc:
            raise BadRequest(f"{name}: {exc}") from None
        return web.json_response(None)

    def _session_response(self, opening: bool) -> web.Response:
        if opening == self.session_open:
            message = ("a weight-update session is already open; call end_weight_update() first" if opening else
                       "no weight-update session is open; call begin_weight_update() first")
            return web.json_response({"success": False, "message": message}, status=400)
        self.session_open = opening
        return web.json_response({"success": True, "message": "Success"})

    async def begin_weight_update(self, request: web.Request) -> web.Response:
        await _json_body(request)
        return self._session_response(opening=True)

    async def end_weight_update(self, request: web.Request) -> web.Response:
        await _json_body(request)
        return self._session_response(opening=False)

    def _updated(self, body: dict, message: str) -> web.Response:
        """An update's answer: with ``flush_cache`` (SGLang's default) the cache is flushed, and a refused
        flush fails the call although the weights changed."""
        if _field(body, "flush_cache", bool, required=False, default=True) and not self.engine.can_flush():
            return web.json_response({"success": False, "message": NOT_FLUSHED}, status=400)
        return web.json_response({"success": True, "message": message, "weight_version": self.engine.weight_version})

    # ---- weights --------------------------------------------------------------------------------
    async def update_from_disk(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        path = _field(body, "model_path", str)
        version = _field(body, "weight_version", (str, int), required=False)
        if not os.path.isdir(path):
            raise BadRequest(f"model_path: {path!r} is not a directory")
        try:  # all-or-nothing: on any error the served weights and weight_version are the old ones
            count = await asyncio.to_thread(self.engine.update_weights_from_disk, path, version)
        except Exception as exc:  # a bad tensor, a missing or corrupt file: the update's fault, not the server's
            logger.warning("update_weights_from_disk(%s) failed, weights unchanged: %s", path, exc)
            return web.json_response({"success": False, "message": f"Failed to update weights: {type(exc).__name__}: "
                                      f"{exc}. The weights were not changed."}, status=400)
        return self._updated(body, f"Succeeded to update {count} weights from {path}")

    async def init_group(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        kwargs = dict(
            master_address=_field(body, "master_address", str), master_port=_field(body, "master_port", int),
            rank_offset=_field(body, "rank_offset", int), world_size=_field(body, "world_size", int),
            group_name=_field(body, "group_name", str, required=False, default="weight_update_group"),
            backend=_field(body, "backend", str, required=False, default="gloo"),
        )
        try:
            await asyncio.to_thread(lambda: self.receiver.init_group(**kwargs))
        except Exception as exc:
            return web.json_response({"success": False, "message": f"Failed to init group: {exc}"}, status=400)
        return web.json_response({"success": True, "message": f"joined {kwargs['group_name']}"})

    async def update_from_distributed(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        if not self.session_open:
            return web.json_response({"success": False, "message": "update_weights_from_distributed must run between "
                                      "begin_weight_update() and end_weight_update()"}, status=400)
        names = _field(body, "names", list)
        dtypes = _field(body, "dtypes", list)
        shapes = _field(body, "shapes", list)
        group_name = _field(body, "group_name", str, required=False, default="weight_update_group")
        version = _field(body, "weight_version", (str, int), required=False)
        load_format = body.get("load_format")

        def receive_and_load() -> int:
            # Received into staging buffers (generation goes on meanwhile; last update's retired storages
            # when they fit), then swapped in all-or-nothing.
            tensors = self.receiver.receive(names=names, dtypes=dtypes, shapes=shapes, group_name=group_name,
                                            load_format=load_format, max_numel=self.engine.max_update_numel,
                                            buffer=self.engine.receive_buffer)
            return self.engine.update_weights(tensors, version)

        try:
            count = await asyncio.to_thread(receive_and_load)
        except Exception as exc:
            msg = f"Failed to update parameter online: {type(exc).__name__}: {exc}. The weights were not changed."
            return web.json_response({"success": False, "message": msg}, status=400)
        return self._updated(body, f"Succeeded to update {count} tensors")

    async def destroy_group(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        name = _field(body, "group_name", str, required=False, default="weight_update_group")
        try:
            await asyncio.to_thread(self.receiver.destroy_group, name)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        return web.json_response({"success": True, "message": f"destroyed {name}"})

    async def update_weight_version(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        if body.get("abort_all_requests", False):
            self.engine.abort(None)
        self.engine.weight_version = str(_field(body, "new_version", (str, int)))
        return web.json_response({"success": True, "message": "updated", "weight_version": self.engine.weight_version})

    async def get_weights_by_name(self, request: web.Request) -> web.Response:
        """SGLang's ``/get_weights_by_name`` (``GetWeightsByNameReqInput``: ``name``, ``truncate_size`` = 100):
        the checkpoint-named tensor as float32 values, its first ``truncate_size`` rows (a tied lm_head is
        the embedding). For tests: fp32 values survive JSON exactly, so weights can be compared bitwise."""
        body = await _json_body(request)
        name = _field(body, "name", str)
        truncate = _field(body, "truncate_size", int, required=False, default=100)

        def read() -> list:
            with self.engine.model_lock:
                dst = self.engine.weight_destination(name)
                if dst is None:  # tied lm_head.weight
                    dst = self.engine.weight_destination("model.embed_tokens.weight")
                return dst.detach().to(torch.float32).numpy().tolist()[:truncate]

        try:
            values = await asyncio.to_thread(read)
        except ValueError as exc:
            return _error(400, f"Get parameter by name failed: {exc}")
        return web.json_response(values)


def _resolve(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)

"""Every call this project makes to an SGLang server, in one place: SGLang 0.5.23's native HTTP API.

Each :class:`Route` is a path and method registered in SGLang's HTTP server; each ``*_body``
function builds the JSON body of one call exactly as it is sent. The asynchronous client (generation,
``client.py``) and the blocking control plane (``fleet.py``, ``weight_sync/``) send nothing else, and
the contract suite (``tests/sglang_contract/``) checks every route against SGLang's own route table
and every body against the request class SGLang parses it into, with SGLang's code.

The weight-update protocol (SGLang's order): ``pause_generation`` -> ``begin_weight_update`` ->
``update_weights_from_distributed`` / ``update_weights_from_tensor`` (one call per bucket; the last
one carries the new version) -> ``end_weight_update`` -> ``flush_cache`` -> ``continue_generation``.
Distributed and tensor updates are refused outside a begin/end session; a disk update needs none.
Updates never flush on their own (``flush_cache: false``): a flush the server refuses while requests
are still held would fail the whole update call, so the fleet flushes afterwards and retries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from rollout_sglang.errors import RolloutError

# SGLang versions whose API this module speaks (the contract suite pins the first).
TESTED_SGLANG = "0.5.23"
SUPPORTED_SGLANG = ((0, 5, 23), (0, 6, 0))  # [lowest, first unsupported)
SUPPORTED_SGLANG_TEXT = ">=0.5.23,<0.6"


@dataclass(frozen=True)
class Route:
    method: str
    path: str


GENERATE = Route("POST", "/generate")
HEALTH = Route("GET", "/health")
MODEL_INFO = Route("GET", "/model_info")
SERVER_INFO = Route("GET", "/server_info")
ABORT_REQUEST = Route("POST", "/abort_request")
PAUSE_GENERATION = Route("POST", "/pause_generation")
CONTINUE_GENERATION = Route("POST", "/continue_generation")
FLUSH_CACHE = Route("POST", "/flush_cache")
BEGIN_WEIGHT_UPDATE = Route("POST", "/begin_weight_update")
END_WEIGHT_UPDATE = Route("POST", "/end_weight_update")
UPDATE_WEIGHTS_FROM_DISK = Route("POST", "/update_weights_from_disk")
INIT_WEIGHTS_UPDATE_GROUP = Route("POST", "/init_weights_update_group")
UPDATE_WEIGHTS_FROM_DISTRIBUTED = Route("POST", "/update_weights_from_distributed")
UPDATE_WEIGHTS_FROM_TENSOR = Route("POST", "/update_weights_from_tensor")
DESTROY_WEIGHTS_UPDATE_GROUP = Route("POST", "/destroy_weights_update_group")
GET_WEIGHTS_BY_NAME = Route("POST", "/get_weights_by_name")  # tests only: read a parameter back
RELEASE_MEMORY_OCCUPATION = Route("POST", "/release_memory_occupation")
RESUME_MEMORY_OCCUPATION = Route("POST", "/resume_memory_occupation")

ROUTES = (GENERATE, HEALTH, MODEL_INFO, SERVER_INFO, ABORT_REQUEST, PAUSE_GENERATION, CONTINUE_GENERATION,
          FLUSH_CACHE, BEGIN_WEIGHT_UPDATE, END_WEIGHT_UPDATE, UPDATE_WEIGHTS_FROM_DISK, INIT_WEIGHTS_UPDATE_GROUP,
          UPDATE_WEIGHTS_FROM_DISTRIBUTED, UPDATE_WEIGHTS_FROM_TENSOR, DESTROY_WEIGHTS_UPDATE_GROUP,
          GET_WEIGHTS_BY_NAME, RELEASE_MEMORY_OCCUPATION, RESUME_MEMORY_OCCUPATION)


# ---- generation ------------------------------------------------------------------------------------
def sample_rids(rid: str, n: int) -> list[str]:
    """The request ids SGLang gives the n samples of a request ``rid`` (``rid_0 .. rid_{n-1}``; ``rid``
    itself when n is 1). Aborting needs these: SGLang ignores an abort naming the unexpanded id."""
    return [rid] if n == 1 else [f"{rid}_{i}" for i in range(n)]


def samples_share_request_seed(server_info: Any) -> bool:
    """Whether a server (its ``/server_info``) samples every copy of an ``n > 1`` request with the request's
    one ``sampling_seed``: SGLang does under ``--enable-deterministic-inference`` (identical samples, zero
    advantages). The client then sends each sample as its own request with its own seed."""
    return isinstance(server_info, dict) and server_info.get("enable_deterministic_inference") is True


def generate_body(input_ids: Sequence[int], sampling_params: dict, *, rid: str, return_logprob: bool,
                  return_routed_experts: bool = False) -> dict:
    """The samples of one prompt (``sampling_params["n"]``, default 1), seeded by ``sampling_seed``."""
    body = {"input_ids": list(input_ids), "sampling_params": dict(sampling_params), "rid": rid,
            "return_logprob": return_logprob, "stream": False}
    if return_routed_experts:
        body["return_routed_experts"] = True
    return body


def abort_body(rid: Optional[str] = None) -> dict:
    """Abort one request id (an expanded sample id, see :func:`sample_rids`), or all when None."""
    return {"abort_all": True} if rid is None else {"rid": rid}


# ---- generation control ----------------------------------------------------------------------------
def pause_body(mode: str) -> dict:
    """``abort`` returns everything in flight; ``retract`` moves running requests back to the queue (their
    KV is recomputed with the new weights after continue, and the cache can be flushed); ``in_place``
    holds them with their KV cache, and a flush is refused until they finish."""
    return {"mode": mode}


def continue_body() -> dict:
    return {}


# ---- weight updates --------------------------------------------------------------------------------
def begin_weight_update_body() -> dict:
    return {}


def end_weight_update_body() -> dict:
    return {}


def disk_update_body(model_path: str, weight_version: str) -> dict:
    return {"model_path": model_path, "weight_version": str(weight_version), "flush_cache": False}


def init_group_body(*, master_address: str, master_port: int, rank_offset: int, world_size: int, group_name: str,
                    backend: str) -> dict:
    return {"master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
            "world_size": world_size, "group_name": group_name, "backend": backend}


def distributed_update_body(*, names: list[str], dtypes: list[str], shapes: list[list[int]], group_name: str,
                            weight_version: Optional[str] = None, flattened: bool = False) -> dict:
    body: dict[str, Any] = {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name,
                            "flush_cache": False}
    if flattened:
        body["load_format"] = "flattened_bucket"
    if weight_version is not None:
        body["weight_version"] = str(weight_version)
    return body


def tensor_update_body(serialized_per_rank: list[str], *, flattened: bool, weight_version: Optional[str] = None) -> dict:
    """``serialized_per_rank``: one payload per TP rank of the engine, each serialized on its own (rank r
    deserializes entry r only; a shared payload would break the producer's CUDA-IPC reference counts)."""
    body: dict[str, Any] = {"serialized_named_tensors": list(serialized_per_rank),
                            "load_format": "flattened_bucket" if flattened else None, "flush_cache": False}
    if weight_version is not None:
        body["weight_version"] = str(weight_version)
    return body


def destroy_group_body(group_name: str) -> dict:
    return {"group_name": group_name}


def get_weights_body(name: str, truncate_size: int = 100) -> dict:
    """A checkpoint-named parameter's first ``truncate_size`` rows, as float32 values (SGLang: tests only)."""
    return {"name": name, "truncate_size": truncate_size}


# ---- memory occupation (colocated engines) ---------------------------------------------------------
# SGLang's memory regions, the ``tags`` of ``/release_memory_occupation`` and ``/resume_memory_occupation``
# (``sglang/srt/constants.py``: GPU_MEMORY_TYPE_KV_CACHE, _WEIGHTS, _CUDA_GRAPH; GPU_MEMORY_ALL_TYPES is
# this order). What SGLang 0.5.23 does with them (``managers/scheduler_components/weight_updater.py``:
# ``release_memory_occupation`` / ``resume_memory_occupation``; bodies ``ReleaseMemoryOccupationReqInput`` /
# ``ResumeMemoryOccupationReqInput`` in ``managers/io_struct.py``, ``tags: Optional[List[str]]``, null or
# empty meaning all three):
#
# - release *asserts* that the engine is idle (running batch empty; waiting requests allowed only while
#   generation is paused): the assertion fails inside the scheduler process, so calling it on a busy engine
#   kills the engine rather than answering an error. Pause first (``retract`` leaves nothing running).
# - release ``kv_cache`` pauses that memory region and flushes the cache; ``weights`` stashes the model's
#   buffers (not its parameters) and pauses the weights region, whose contents are *lost* unless the server
#   runs ``--enable-weights-cpu-backup``: after resume they are garbage until a weight update loads them;
#   ``cuda_graph`` pauses the graph pool. Only with ``--enable-memory-saver`` does a pause free anything
#   (without it the adapter is a no-op and the call still succeeds).
# - resume reverses it in the order cuda_graph, weights (buffers restored), kv_cache; resuming a tag that is
#   not released raises KeyError in the scheduler (``offload_tags.remove``): never resume twice.
# - nothing guards generation meanwhile: a request scheduled while memory is released touches unmapped
#   memory. Generation must stay paused until every tag is resumed. No endpoint reports what is released:
#   the fleet keeps track itself. The HTTP answer is 200 with an empty (null) body, or 400
#   ``{"error": {"message"}}`` when the call raised before reaching the scheduler.
MEMORY_KV_CACHE = "kv_cache"
MEMORY_WEIGHTS = "weights"
MEMORY_CUDA_GRAPH = "cuda_graph"
MEMORY_TAGS = (MEMORY_KV_CACHE, MEMORY_WEIGHTS, MEMORY_CUDA_GRAPH)


def memory_occupation_body(tags: Sequence[str]) -> dict:
    """The body of a release or resume of the memory regions ``tags`` (always named: SGLang reads null as all)."""
    unknown = [t for t in tags if t not in MEMORY_TAGS]
    if unknown or not tags:
        raise ValueError(f"tags: expected a non-empty subset of {list(MEMORY_TAGS)}; got {list(tags)}")
    return {"tags": list(tags)}


# ---- answers ---------------------------------------------------------------------------------------
def weight_version_of(model_info: Any) -> Optional[str]:
    """The ``weight_version`` of a ``/model_info`` answer (None when it has none)."""
    if isinstance(model_info, dict) and model_info.get("weight_version") is not None:
        return str(model_info["weight_version"])
    return None


def parse_version(text: str) -> tuple[int, ...]:
    """``"0.5.23"`` / ``"0.5.23.post1"`` / ``"0.5.23rc0"`` -> ``(0, 5, 23)``."""
    parts = []
    for piece in str(text).split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def check_sglang_version(server: str, version: Any) -> None:
    """Refuse a server whose SGLang version (``/server_info``'s ``version``) this API does not speak."""
    parsed = parse_version(version) if isinstance(version, str) else ()
    low, high = SUPPORTED_SGLANG
    if len(parsed) < 3 or not low <= parsed < high:
        raise RolloutError(f"{server} runs SGLang {version!r}; this project speaks the API of SGLang "
                           f"{SUPPORTED_SGLANG_TEXT} (contract-tested against {TESTED_SGLANG})")

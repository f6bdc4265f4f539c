"""The SGLang side of the contract suite: runs SGLang's own code (the pinned wheel in the overlay, no
GPU) and answers questions about it, one JSON object per line on stdin -> one per line on stdout.

Started by ``conftest.py`` with the overlay first on ``PYTHONPATH``; never imported by the test
process (SGLang patches torch globally on import). Questions (``{"op": ..., ...}``):

- ``routes``: SGLang's HTTP routes, their methods and the request class each one's body parses into;
- ``post``: one request through SGLang's real FastAPI app (its body validation and contract checks
  run; the handler then fails for want of an engine, which tells an accepted body from a refused one);
- ``construct``: a body built into its request class strictly (an unknown field is an error);
  ``GenerateReqInput`` is normalised as SGLang's tokenizer manager does, and its request ids returned;
- ``parse_args``: an argv through ``ServerArgs.add_cli_args`` (no abbreviations), with the deprecation
  warnings it prints;
- ``tensor_payload``: a ``/update_weights_from_tensor`` payload through SGLang's deserializer and,
  when flattened, ``FlattenedTensorBucket``, as TP rank ``tp_rank`` reads it;
- ``flattened_receive``: a flattened broadcast bucket received as SGLang's distributed updater does;
- ``encode_routed_experts``: routed experts encoded as SGLang's detokenizer encodes them;
- ``verify_sampling``: each of a list of sampling_params dicts through ``SamplingParams(**params)``
  (its ``__post_init__`` normalisation) and ``verify(vocab_size)``, as SGLang's tokenizer manager
  checks a request: accepted or the error, and whether it samples greedily (top_k 1 after normalising).

Tensors cross as ``{"dtype", "shape", "b64"}`` (raw bytes).

torchvision: SGLang imports it at module level for multimodal preprocessing, which nothing here
touches; its compiled ops exist only for a CUDA build of torch, so registering their fake kernels
fails on the CPU build. That one registration failure is tolerated while torchvision imports.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import inspect
import io
import json
import os
import sys
import traceback
import typing
import warnings

# Answers go to the original stdout; anything SGLang prints (Python or C) goes to stderr instead.
ANSWERS = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
sys.stdout = sys.stderr

import torch  # noqa: E402
import torch.library  # noqa: E402


def _import_torchvision_without_its_compiled_ops() -> None:
    register_fake = torch.library.register_fake

    def tolerant(op, *args, **kwargs):
        registration = register_fake(op, *args, **kwargs)
        if not callable(registration):
            return registration

        def apply(fn):
            try:
                return registration(fn)
            except RuntimeError as exc:
                if "does not exist" not in str(exc):
                    raise
                return fn
        return apply

    torch.library.register_fake = tolerant
    try:
        import torchvision  # noqa: F401
    finally:
        torch.library.register_fake = register_fake


_import_torchvision_without_its_compiled_ops()
warnings.filterwarnings("ignore")

import msgspec  # noqa: E402
import sglang  # noqa: E402
from fastapi.params import Body  # noqa: E402
from sglang.srt.entrypoints.http_server import app  # noqa: E402
from sglang.srt.managers import io_struct  # noqa: E402
from sglang.srt.managers.detokenizer_manager import DetokenizerManager  # noqa: E402
from sglang.srt.server_args import ServerArgs  # noqa: E402
from sglang.srt.utils.common import MultiprocessingSerializer  # noqa: E402
from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket, FlattenedTensorMetadata  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

CLIENT = TestClient(app, raise_server_exceptions=False)


def tensor_out(t: torch.Tensor) -> dict:
    t = t.detach().contiguous().cpu()
    raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "b64": base64.b64encode(raw).decode()}


def _body_class(endpoint) -> str | None:
    """The request class an endpoint's JSON body is parsed into (its non-Request parameter)."""
    for name, param in inspect.signature(endpoint).parameters.items():
        annotation = param.annotation
        if isinstance(annotation, str):
            annotation = typing.get_type_hints(endpoint, include_extras=True).get(name)
        if typing.get_origin(annotation) is typing.Annotated:
            base, *extras = typing.get_args(annotation)
            if any(isinstance(e, Body) for e in extras):
                return base.__name__
        elif inspect.isclass(annotation) and hasattr(io_struct, annotation.__name__) and name == "obj":
            return annotation.__name__
    return None


def op_routes(_: dict) -> dict:
    routes = []
    for route in app.routes:
        if not hasattr(route, "path"):  # an included sub-router (OpenAI-style APIs): not ours
            continue
        methods = sorted(getattr(route, "methods", None) or [])
        endpoint = getattr(route, "endpoint", None)
        routes.append({"path": route.path, "methods": methods, "body_class": _body_class(endpoint) if endpoint else None})
    return {"routes": routes, "version": sglang.__version__}


def op_post(q: dict) -> dict:
    response = CLIENT.request(q["method"], q["path"], json=q.get("body"))
    text = response.text
    try:
        error = response.json().get("error") if text.strip() else None
    except (ValueError, AttributeError):
        error = None
    # A body SGLang refuses never reaches the handler: 404/405 (no such route), 422 or 400 naming
    # validation errors (FastAPI), or 400 {"error": "<what>"} from /generate's contract check. A
    # handler that ran fails for want of an engine instead ({"error": {"message": ...}} or a 500).
    refused = response.status_code in (404, 405, 422) or (
        response.status_code == 400 and ("validation error" in text or isinstance(error, str)))
    return {"status": response.status_code, "text": text[:2000], "refused": refused}


def op_construct(q: dict) -> dict:
    cls = getattr(io_struct, q["class"])
    body = q["body"]
    if isinstance(cls, type) and issubclass(cls, msgspec.Struct):
        fields = {f.name for f in msgspec.structs.fields(cls)}
    else:
        fields = {f.name for f in __import__("dataclasses").fields(cls)}
    unknown = sorted(set(body) - fields)
    if unknown:
        return {"ok": False, "error": f"unknown field(s) of {cls.__name__}: {unknown}"}
    obj = cls(**body)
    out: dict = {"ok": True}
    if cls is io_struct.GenerateReqInput:
        obj.normalize_batch_and_arguments()
        out["rid"] = obj.rid
        out["n"] = obj.parallel_sample_num
        params = obj.sampling_params if isinstance(obj.sampling_params, dict) else obj.sampling_params[0]
        from sglang.srt.sampling.sampling_params import SamplingParams

        SamplingParams(**{k: v for k, v in params.items() if k != "n"}).verify(1 << 20)
    if hasattr(obj, "tags"):
        out["tags"] = obj.tags
    return out


def op_memory_tags(_: dict) -> dict:
    from sglang.srt import constants

    return {"all": list(constants.GPU_MEMORY_ALL_TYPES)}


def op_parse_args(q: dict) -> dict:
    from sglang.srt.arg_groups import argparse_actions

    printed: list[str] = []
    original = argparse_actions.print_deprecated_warning
    argparse_actions.print_deprecated_warning = lambda message: printed.append(str(message))
    try:
        parser = argparse.ArgumentParser(allow_abbrev=False)
        ServerArgs.add_cli_args(parser)
        with contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                args = parser.parse_args(q["argv"])
            except SystemExit:
                return {"ok": False, "error": err.getvalue()[-2000:]}
    finally:
        argparse_actions.print_deprecated_warning = original
    values = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}
    return {"ok": True, "values": values, "deprecated": printed}


def op_tensor_payload(q: dict) -> dict:
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

    monkey_patch_torch_reductions()  # as SGLang's tp worker does before deserializing
    obj = MultiprocessingSerializer.deserialize(q["serialized_named_tensors"][q["tp_rank"]])
    if q["flattened"]:
        metadata = [FlattenedTensorMetadata(name=m.name, shape=m.shape, dtype=m.dtype, start_idx=m.start_idx,
                                            end_idx=m.end_idx, numel=m.numel) for m in obj["metadata"]]
        named = FlattenedTensorBucket(flattened_tensor=obj["flattened_tensor"], metadata=metadata).reconstruct_tensors()
    else:
        named = list(obj)
    return {"tensors": [[name, tensor_out(t)] for name, t in named]}


def op_flattened_receive(q: dict) -> dict:
    bucket = FlattenedTensorBucket.empty(q["names"], q["dtypes"], q["shapes"], "cpu")
    flat = bucket.get_flattened_tensor()
    data = torch.frombuffer(bytearray(base64.b64decode(q["b64"])), dtype=torch.uint8)
    if data.numel() != flat.numel():
        raise ValueError(f"{data.numel()} bytes sent, {flat.numel()} expected")
    flat.copy_(data)
    return {"tensors": [[name, tensor_out(t)] for name, t in bucket.reconstruct_tensors()]}


def op_encode_routed_experts(q: dict) -> dict:
    raw = base64.b64decode(q["b64"])
    experts = torch.frombuffer(bytearray(raw), dtype=getattr(torch, q["dtype"])).reshape(q["shape"])
    (encoded,) = DetokenizerManager._b64_encode_per_request([experts])
    return {"encoded": encoded}


def op_verify_sampling(q: dict) -> dict:
    from sglang.srt.sampling import sampling_params as sp

    results = []
    for params in q["cases"]:
        try:
            built = sp.SamplingParams(**params)
            built.verify(q["vocab_size"])
        except Exception as exc:  # TypeError (a string where a number goes) refuses a request as well
            results.append({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        else:
            results.append({"ok": True, "greedy": built.top_k == 1, "max_new_tokens": built.max_new_tokens})
    return {"results": results, "sampling_eps": sp._SAMPLING_EPS, "top_k_all": sp.TOP_K_ALL}


OPS = {name.removeprefix("op_"): fn for name, fn in globals().items() if name.startswith("op_")}


def main(answers: typing.TextIO) -> None:
    # CPU tensors are pickled as shared-memory file descriptors that this process fetches from the test
    # process through multiprocessing's resource sharer, which authenticates with the sender's key.
    import multiprocessing

    multiprocessing.current_process().authkey = bytes.fromhex(os.environ["SGLANG_SIDE_AUTHKEY"])
    answers.write(json.dumps({"ready": True, "version": sglang.__version__}) + "\n")
    answers.flush()
    for line in sys.stdin:
        question = json.loads(line)
        try:
            answer = OPS[question["op"]](question)
        except Exception as exc:  # the test reads it; the probe keeps serving
            answer = {"exception": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=5)}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


if __name__ == "__main__":
    main(ANSWERS)

"""``python -m rollout_sglang.cpu_server --model-path DIR [--port P] [--host H] [--dtype bf16]``."""
from __future__ import annotations

import argparse
import logging
import os

from aiohttp import web

from rollout_sglang.cpu_server import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_REQUEST_SAMPLES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rollout_sglang.cpu_server",
                                     description="CPU rollout server (not SGLang) speaking SGLang's native HTTP API")
    parser.add_argument("--model-path", required=True, help="Hugging Face model directory (config + safetensors)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "fp32", "bfloat16", "bf16"])
    parser.add_argument("--max-batch-size", type=int, default=256, help="sequences decoded together")
    parser.add_argument("--weight-version", default="default", help="version reported before any update")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS or 1)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--enable-deterministic-inference", action="store_true",
                        help="as SGLang's: every sample of a request is sampled with the request's sampling_seed")
    parser.add_argument("--log-requests", action="store_true",
                        help="log the method and path of every request except /generate and /health (the protocol)")
    # Limits: one request must not be able to stall or starve the others.
    parser.add_argument("--context-length", type=int, default=None,
                        help="as SGLang's: the longest prompt + output in tokens (default and maximum: the model's "
                             "max_position_embeddings)")
    parser.add_argument("--max-request-samples", type=int, default=DEFAULT_MAX_REQUEST_SAMPLES,
                        help=f"most samples (prompts x n) one /generate request may ask for "
                             f"(default {DEFAULT_MAX_REQUEST_SAMPLES})")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help=f"largest request body; larger ones get 413 before being read "
                             f"(default {DEFAULT_MAX_BODY_BYTES >> 20} MiB)")
    return parser.parse_args(argv)


def _drop_http2_probes(record: logging.LogRecord) -> bool:
    """sglang-router probes each worker for gRPC (HTTP/2) first; aiohttp logs that as an error. Drop it."""
    exc = record.exc_info[1] if record.exc_info else None
    return not (exc is not None and type(exc).__name__ == "BadHttpMessage" and "PRI" in str(exc))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "1"))
    import torch

    torch.set_num_threads(threads)
    from rollout_sglang.cpu_server.app import SERVER_NAME, CpuRolloutApp
    from rollout_sglang.cpu_server.engine import CpuEngine

    log = logging.getLogger("rollout_sglang.cpu_server")
    logging.getLogger("aiohttp.server").addFilter(_drop_http2_probes)
    log.info("%s starting: model %s, dtype %s, %s:%d", SERVER_NAME, args.model_path, args.dtype, args.host, args.port)
    engine = CpuEngine(args.model_path, dtype=args.dtype, max_batch_size=args.max_batch_size,
                       weight_version=args.weight_version, threads=threads, context_length=args.context_length)
    app = CpuRolloutApp(engine, log_requests=args.log_requests,
                        deterministic_inference=args.enable_deterministic_inference,
                        max_request_samples=args.max_request_samples, max_body_bytes=args.max_body_bytes)
    log.info("limits: context %d tokens, %d samples per request, %d-byte bodies", engine.context_length,
             args.max_request_samples, args.max_body_bytes)
    log.info("%s ready on http://%s:%d", SERVER_NAME, args.host, args.port)
    web.run_app(app.app, host=args.host, port=args.port, print=None, access_log=None, shutdown_timeout=2)


if __name__ == "__main__":
    main()

"""A stand-in for an SGLang server of an unsupported version: it answers /health and reports its
version in /server_info, nothing else (``python old_sglang_server.py PORT VERSION``)."""
from __future__ import annotations

import sys

from aiohttp import web


def main() -> None:
    port, version = int(sys.argv[1]), sys.argv[2]
    app = web.Application()
    app.router.add_get("/health", lambda request: web.Response(text="OK"))
    app.router.add_get("/server_info", lambda request: web.json_response({"version": version}))
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    main()

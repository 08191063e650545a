"""`python -m engine.serve --model PATH|HUB_ID ...`: the OpenAI-compatible engine server.

A hub id (`org/name`, `org/name/file.gguf`) is fetched into the hub cache first (engine.hub).

The HTTP port opens at once; the model loads in the background (/health is 503 until it is
ready). SIGTERM / Ctrl-C drain in-flight requests for --shutdown-timeout seconds, then abort
the rest.

The API key comes from, first found: --api-key-file, --api-key (which any local user can read
with `ps`), the SKYBROKER_API_KEY environment variable, the file SKYBROKER_API_KEY_FILE names.
Off loopback the server refuses to start without a key unless --allow-unauthenticated.

--ssl-certfile and --ssl-keyfile (PEM; uvicorn's) serve HTTPS instead of HTTP; the pair is
loaded before the port opens, so a missing or mismatched file is an error at once.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import logging
import os
import ssl
import sys
from pathlib import Path

import uvicorn

from engine.hub import resolve_model
from engine.server.app import ServerConfig, create_app
from engine.server.tool_calls import TOOL_PARSERS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.serve", description=__doc__.split("\n")[0])
    p.add_argument(
        "--model",
        required=True,
        help="HF model directory, .gguf file, or hub id (org/name[/file.gguf])",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help="name clients use in 'model' (default: the model's directory/file name)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY'; visible to `ps`: prefer ${KEY_ENV} or "
        "--api-key-file",
    )
    p.add_argument(
        "--api-key-file",
        default=None,
        help=f"read the API key from this file (or from the file ${KEY_FILE_ENV} names)",
    )
    p.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="serve off loopback (--host other than 127.0.0.1/::1/localhost) without an API key",
    )
    p.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate (PEM)")
    p.add_argument(
        "--ssl-keyfile", default=None, help="the certificate's private key (PEM; keep it 0600)"
    )
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=4 * 2**20,
        help="larger request bodies get 413 before they are parsed (default 4 MiB)",
    )
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--kv-cache-gib", type=float, default=None, help="KV cache size (CPU)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--no-enable-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
        default=None,
    )
    p.add_argument(
        "--max-waiting-requests",
        type=int,
        default=1024,
        help="requests waiting for a first token before new ones get 503 + Retry-After",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests may finish after SIGTERM",
    )
    p.add_argument(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the engine in a child process (default), or on a thread of the server "
        "process (--no-engine-process), where the HTTP work slows its steps",
    )
    p.add_argument(
        "--step-log",
        default=None,
        help="append one JSON line per engine step to this file (start on the monotonic "
        "clock, seconds, batch shape): to check a performance model against real serving",
    )
    p.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the model eager (default: torch.compile on CUDA, eager on CPU; "
        "--no-enforce-eager compiles on CPU too)",
    )
    p.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='let the model decide to call tools (tool_choice "auto"); needs --tool-call-parser',
    )
    p.add_argument(
        "--tool-call-parser",
        choices=TOOL_PARSERS,
        default=None,
        help="how the model writes tool calls: llama3_json (Llama 3.x) or hermes "
        "(<tool_call> tags: Hermes, Qwen)",
    )
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    return p.parse_args(argv)


ENGINE_FLAGS = (
    "max_model_len",
    "tensor_parallel_size",
    "kv_cache_gib",
    "gpu_memory_utilization",
    "max_num_seqs",
    "max_num_batched_tokens",
    "block_size",
    "device",
    "dtype",
    "seed",
    "enable_prefix_caching",
    "step_log",
    "enforce_eager",
)


KEY_ENV = "SKYBROKER_API_KEY"
KEY_FILE_ENV = "SKYBROKER_API_KEY_FILE"


def read_api_key(args: argparse.Namespace) -> str | None:
    """The key: --api-key-file, else --api-key, else $SKYBROKER_API_KEY, else the file named by
    $SKYBROKER_API_KEY_FILE (the broker's order for its token). Raises ValueError for a key
    file that cannot be read or holds no key."""
    if args.api_key_file:
        return _key_from_file(args.api_key_file)
    if args.api_key:
        return args.api_key
    if os.environ.get(KEY_ENV, "").strip():
        return os.environ[KEY_ENV].strip()
    if os.environ.get(KEY_FILE_ENV):
        return _key_from_file(os.environ[KEY_FILE_ENV])
    return None


def _key_from_file(path: str) -> str:
    file = Path(path).expanduser()
    try:
        key = file.read_text().strip()
    except OSError as e:
        raise ValueError(f"cannot read the API key file {file}: {e.strerror}") from None
    if not key:
        raise ValueError(f"the API key file {file} is empty")
    return key


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None, allow_unauthenticated: bool) -> None:
    if api_key or allow_unauthenticated or is_loopback(host):
        return
    raise ValueError(
        f"--host {host} serves beyond this machine and needs an API key: set ${KEY_ENV}, "
        f"${KEY_FILE_ENV} or --api-key-file (or bind 127.0.0.1, or pass "
        "--allow-unauthenticated to serve anyone who can reach the port)"
    )


def check_tls(certfile: str | None, keyfile: str | None) -> None:
    """Raise ValueError unless both files are given and hold a matching pair, or neither."""
    if not certfile and not keyfile:
        return
    if not (certfile and keyfile):
        given, missing = ("--ssl-certfile", "--ssl-keyfile")
        if keyfile:
            given, missing = missing, given
        raise ValueError(f"{given} needs {missing} too (HTTPS wants the certificate and its key)")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except ssl.SSLError as e:  # before OSError, which it is
        raise ValueError(
            f"--ssl-certfile {certfile} and --ssl-keyfile {keyfile} are not a PEM certificate "
            f"and its private key ({e.reason or e})"
        ) from None
    except OSError as e:
        raise ValueError(f"cannot read the TLS files: {e.strerror}: {e.filename}") from None


def default_model_name(model: str) -> str:
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.name


def build_app(args: argparse.Namespace):
    from engine.config import EngineArgs

    engine_kwargs = {k: getattr(args, k) for k in ENGINE_FLAGS if getattr(args, k) is not None}
    name = args.served_model_name or default_model_name(args.model)
    # Validate the engine arguments now, so a bad flag fails before the port opens.
    engine_args = EngineArgs(model=args.model, served_model_name=name, **engine_kwargs)

    def load():
        from engine.llm_engine import LLMEngine, freeze_heap

        engine = LLMEngine.from_args(engine_args)
        freeze_heap()
        return engine

    api_key = read_api_key(args)
    check_bind(args.host, api_key, args.allow_unauthenticated)
    check_tls(args.ssl_certfile, args.ssl_keyfile)
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (llama3_json, hermes)")
    if args.max_request_bytes < 1:
        raise ValueError(f"--max-request-bytes must be >= 1, got {args.max_request_bytes}")
    config = ServerConfig(
        served_model_name=name,
        api_key=api_key,
        max_pending=args.max_waiting_requests,
        max_request_bytes=args.max_request_bytes,
        drain_timeout_s=args.shutdown_timeout,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=args.tool_call_parser,
    )
    if args.engine_process:
        return create_app(config, engine_args=engine_args)
    return create_app(config, load)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        args.served_model_name = args.served_model_name or default_model_name(args.model)
        args.model = resolve_model(args.model)
        app = build_app(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log = logging.getLogger("engine.serve")
    if args.api_key and not args.api_key_file:
        log.warning(
            "--api-key is readable by any local user (ps): prefer $%s or a key file", KEY_ENV
        )
    if app.state.server.config.api_key is None and not is_loopback(args.host):
        log.warning("serving %s without an API key (--allow-unauthenticated)", args.host)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=int(args.shutdown_timeout) + 1,
            ssl_certfile=args.ssl_certfile,
            ssl_keyfile=args.ssl_keyfile,
        )
    )

    def on_load_failure(_: BaseException) -> None:
        server.should_exit = True

    app.state.server.on_load_failure = on_load_failure
    server.run()
    gc.unfreeze()  # the engine's frozen heap (freeze_heap) collectable again at exit
    return 1 if app.state.server.status == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())

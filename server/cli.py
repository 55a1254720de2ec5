"""`nanoserve serve|pull|convert-gguf|generate`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger("nanoserve")

MiB = 1 << 20
GiB = 1 << 30


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1.5G', '1000000' -> bytes."""
    units = {"k": 1 << 10, "m": MiB, "g": GiB, "t": 1 << 40}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(float(t))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 2GiB or 512MiB)") from None


def field_default(cls: type, name: str) -> Any:
    """The default of dataclass field `name`: flags read their defaults from the configs."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    assert field.default is not dataclasses.MISSING, f"{cls.__name__}.{name} has no default"
    return field.default


def add_config_flag(parser: argparse.ArgumentParser, flag: str, cls: type, name: str, **kw) -> None:
    """A flag that sets field `name` of config class `cls`; its default is the field's."""
    kw.setdefault("default", field_default(cls, name))
    if "action" not in kw and "choices" not in kw:
        kw.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
    parser.add_argument(flag, dest=f"{cls.__name__}.{name}", **kw)


def config_from_args(args: argparse.Namespace, cls: type, **values: Any) -> Any:
    """`cls` built from the flags added for it by add_config_flag (plus `values`)."""
    prefix = f"{cls.__name__}."
    for dest, value in vars(args).items():
        if dest.startswith(prefix):
            values[dest.removeprefix(prefix)] = value
    return cls(**values)


def _key_or_none(text: str) -> str | None:
    return text or None


def comma_list(text: str) -> tuple[str, ...]:
    """'a, b,c' -> ('a', 'b', 'c'): list flags take one comma-separated value."""
    values = tuple(part.strip() for part in text.split(",") if part.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return values


def add_quantization_flag(parser: argparse.ArgumentParser) -> None:
    """--quantization, shared by serve and generate; resolve_quantization() settles "auto"."""
    from model.engine.config import QUANTIZATIONS, EngineConfig

    add_config_flag(
        parser,
        "--quantization",
        EngineConfig,
        "quantization",
        default="auto",
        choices=["auto", *QUANTIZATIONS],
        help="CPU: weight-only int8 (per channel) or int4 (group 32) linear layers; "
        "auto: a GGUF's own precision (Q4 -> int4, Q5-Q8 -> int8) and the default model's "
        "(int4), none for a folder given",
    )


def add_serve_flags(serve: argparse.ArgumentParser) -> None:
    from model.engine.config import DTYPES, EngineConfig
    from server.api.handlers import APIState
    from server.http.config import ServerConfig

    serve.add_argument(
        "model_dir",
        nargs="?",
        help="Hugging Face model folder or a .gguf file (default: the default model)",
    )
    add_config_flag(serve, "--host", ServerConfig, "host")
    add_config_flag(serve, "--port", ServerConfig, "port", type=int)
    serve.add_argument("--served-model-name", help="model id in the API (default: the folder name)")
    add_config_flag(
        serve,
        "--api-key",
        ServerConfig,
        "api_key",
        type=_key_or_none,
        default=os.environ.get("NANOSERVE_API_KEY"),
        help="require this Bearer key (env NANOSERVE_API_KEY)",
    )
    engine_flags = [
        ("--max-model-len", "max_model_len", int, "context length (default: the model's)"),
        ("--max-num-seqs", "max_num_seqs", int, "sequences in one batch"),
        (
            "--max-num-batched-tokens",
            "max_num_batched_tokens",
            int,
            "tokens in one step (default: 512 CPU, 2048 CUDA)",
        ),
        ("--kv-cache-memory", "kv_cache_memory_bytes", parse_bytes, "KV pool size on the CPU"),
        (
            "--gpu-memory-utilization",
            "gpu_memory_utilization",
            float,
            "share of GPU memory to use",
        ),
        ("--device", "device", str, "auto, cpu, cuda or cuda:N"),
        ("--block-size", "block_size", int, None),
        ("--max-queued-requests", "max_queued_requests", int, None),
    ]
    for flag, name, kind, help_text in engine_flags:
        add_config_flag(serve, flag, EngineConfig, name, type=kind, help=help_text)
    add_config_flag(serve, "--dtype", EngineConfig, "dtype", choices=["auto", *DTYPES])
    add_config_flag(
        serve,
        "--enforce-eager",
        EngineConfig,
        "enforce_eager",
        action="store_true",
        help="CUDA: no CUDA graphs for decode; CPU: the decode step of one sequence is not "
        "compiled (it is for quantized weights)",
    )
    add_config_flag(
        serve,
        "--attention-backend",
        EngineConfig,
        "attn_backend",
        choices=["auto", "torch", "triton"],
    )
    add_config_flag(
        serve, "--no-prefix-caching", EngineConfig, "enable_prefix_caching", action="store_false"
    )
    add_quantization_flag(serve)
    add_config_flag(
        serve,
        "--tensor-parallel-size",
        EngineConfig,
        "tensor_parallel_size",
        type=int,
        help="shard the model over N processes (NCCL on CUDA, gloo on the CPU)",
    )
    add_config_flag(
        serve,
        "--distributed-init-method",
        EngineConfig,
        "distributed_init_method",
        help="torch.distributed rendezvous for tensor parallelism (default: a free local tcp:// port)",
    )
    add_config_flag(
        serve, "--max-n", APIState, "max_n", type=int, help="largest n a request may ask for"
    )
    add_config_flag(
        serve,
        "--tool-prompt",
        APIState,
        "tool_prompt",
        choices=["auto", "hermes", "none"],
        help="tools in a Hermes system prompt: auto (when the chat template ignores them)",
    )
    server_flags = [
        ("--max-body-bytes", "max_body_bytes", parse_bytes),
        ("--max-connections", "max_connections", int),
        ("--header-timeout", "header_timeout_s", float),
        ("--body-timeout", "body_timeout_s", float),
        ("--timeout-keep-alive", "timeout_keep_alive_s", float),
        ("--shutdown-timeout", "shutdown_timeout_s", float),
        ("--sse-ping-interval", "sse_ping_interval_s", float),
    ]
    for flag, name, kind in server_flags:
        add_config_flag(serve, flag, ServerConfig, name, type=kind)
    cors_flags = [
        ("--allowed-origins", "allowed_origins", "CORS: origins allowed, comma-separated"),
        ("--allowed-methods", "allowed_methods", "CORS: methods a preflight may ask for"),
        ("--allowed-headers", "allowed_headers", "CORS: request headers a preflight may ask for"),
    ]
    for flag, name, help_text in cors_flags:
        add_config_flag(serve, flag, ServerConfig, name, type=comma_list, help=help_text)
    serve.add_argument(
        "--no-webui", dest="webui", action="store_false", help="no chat page at / (it is a 404)"
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def build_parser() -> argparse.ArgumentParser:
    from model.engine.config import DTYPES, EngineConfig

    parser = argparse.ArgumentParser(
        prog="nanoserve", description="A small OpenAI-compatible LLM server"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_flags(
        sub.add_parser(
            "serve",
            help="serve a model over the OpenAI API",
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
    )

    pull = sub.add_parser("pull", help="download and convert the default model")
    pull.add_argument("--force", action="store_true", help="convert again even if present")

    convert = sub.add_parser(
        "convert-gguf", help="convert a Llama-architecture GGUF to a HF folder"
    )
    convert.add_argument("gguf_file")
    convert.add_argument("out_dir")

    gen = sub.add_parser("generate", help="one chat turn, printed as it is generated")
    gen.add_argument("prompt")
    gen.add_argument("--model", help="model folder or GGUF file (default: the default model)")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--system", help="system prompt")
    add_config_flag(gen, "--device", EngineConfig, "device")
    add_config_flag(gen, "--dtype", EngineConfig, "dtype", choices=["auto", *DTYPES])
    add_quantization_flag(gen)
    return parser


def fail(message: str, code: int) -> int:
    print(f"nanoserve: error: {message}", file=sys.stderr)
    return code


def resolve_model_dir(model_dir: str | None) -> Path:
    """The model folder: the one given, the default model's, or a GGUF file's conversion."""
    if model_dir and is_gguf(model_dir):
        from model.hub.default_model import gguf_model_dir

        return gguf_model_dir(model_dir)
    if model_dir:
        return Path(model_dir)
    from model.hub.default_model import ensure_default_model

    return ensure_default_model()


def is_gguf(path: str) -> bool:
    return Path(path).suffix.lower() == ".gguf" and Path(path).is_file()


def resolve_quantization(
    requested: str, model_arg: str | None, model_dir: Path, device: str
) -> str:
    """--quantization auto: on the CPU (the quantized kernels are CPU ones), the precision the
    weights ship in: a GGUF file's own, and the default model's (no model given), which ships as
    a Q4_1 GGUF; none for a model folder given and on CUDA."""
    if requested != "auto":
        return requested
    import torch

    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if (not model_arg or is_gguf(model_arg)) and not on_cuda:
        from model.hub.default_model import gguf_source

        return (gguf_source(model_dir) or {}).get("quantization", "none")
    return "none"


def settle_quantization(args: argparse.Namespace, model_arg: str | None, model_dir: Path) -> None:
    """Replace the parsed --quantization by what resolve_quantization() makes of it."""
    dest = "EngineConfig.quantization"
    device = getattr(args, "EngineConfig.device")
    setattr(args, dest, resolve_quantization(getattr(args, dest), model_arg, model_dir, device))


def cmd_pull(args: argparse.Namespace) -> int:
    from model.hub.default_model import ensure_default_model, pull_default_model

    path = pull_default_model() if args.force else ensure_default_model()
    print(f"default model ready: {path}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from model.hub.default_model import convert_gguf

    convert_gguf(Path(args.gguf_file), Path(args.out_dir))
    print(f"converted {args.gguf_file} -> {args.out_dir}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from model.engine.config import EngineConfig
    from model.engine.llm_engine import LLMEngine
    from model.sampling_params import SamplingParams

    model_dir = resolve_model_dir(args.model)
    settle_quantization(args, args.model, model_dir)
    try:
        config = config_from_args(
            args,
            EngineConfig,
            model_dir=str(model_dir),
            max_num_seqs=1,
            kv_cache_memory_bytes=256 * MiB,
            enforce_eager=True,  # one turn does not pay back compiling the decode step
        )
    except ValueError as exc:
        return fail(str(exc), 2)
    engine = LLMEngine(config)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.prompt})
    text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    prompt_ids = engine.tokenizer.encode(text)
    max_tokens = min(args.max_tokens, engine.max_model_len - len(prompt_ids))
    params = SamplingParams(max_tokens=max_tokens, temperature=args.temperature, seed=args.seed)
    engine.add_request("generate", prompt_ids, params)
    while engine.has_unfinished():
        for _, delta in engine.step():
            if isinstance(delta, Exception):
                raise delta
            sys.stdout.write(delta.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from model.config import ModelConfig
    from model.engine.config import EngineConfig
    from model.models.weights import checkpoint_files
    from model.text.tokenizer import Tokenizer
    from server.api.handlers import APIState
    from server.http.config import ServerConfig
    from server.serve import serve

    model_dir = resolve_model_dir(args.model_dir)
    # Cheap checks first, so a broken folder fails in a second with one line (exit 2).
    ModelConfig.from_dir(model_dir)
    Tokenizer.from_dir(model_dir)
    checkpoint_files(model_dir)
    default_name = Path(args.model_dir).stem if args.model_dir and is_gguf(args.model_dir) else None
    model_name = args.served_model_name or default_name or model_dir.resolve().name
    settle_quantization(args, args.model_dir, model_dir)
    try:
        engine_config = config_from_args(args, EngineConfig, model_dir=str(model_dir))
        server_config = config_from_args(args, ServerConfig)
        state = config_from_args(args, APIState, served_model_names=[model_name])
    except ValueError as exc:
        return fail(str(exc), 2)
    return serve(engine_config, server_config, state, webui=args.webui)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from model.hub.default_model import inductor_cache_dir

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache_dir()))
    level = getattr(args, "log_level", "warning")
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from model.errors import ModelLoadError, TemplateError

    try:
        if args.command == "pull":
            return cmd_pull(args)
        if args.command == "convert-gguf":
            return cmd_convert(args)
        if args.command == "generate":
            return cmd_generate(args)
        return cmd_serve(args)
    except ModelLoadError as exc:
        return fail(str(exc), 2)
    except TemplateError as exc:
        return fail(f"chat template: {exc}", 2)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from model.errors import PullError

        if isinstance(exc, PullError):
            return fail(str(exc), 1)
        raise


if __name__ == "__main__":
    sys.exit(main())

"""`nanoserve serve|pull|convert-gguf|generate`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanoserve", description="A small OpenAI-compatible LLM server"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a model over the OpenAI API")
    serve.add_argument(
        "model_dir", nargs="?", help="Hugging Face model folder (default: the default model)"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", help="model id in the API (default: the folder name)")
    serve.add_argument(
        "--api-key",
        default=os.environ.get("NANOSERVE_API_KEY"),
        help="require this Bearer key (env NANOSERVE_API_KEY)",
    )
    serve.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    serve.add_argument("--max-num-seqs", type=int, default=256, help="sequences in one batch")
    serve.add_argument(
        "--max-num-batched-tokens",
        type=int,
        help="tokens in one step (default: 512 CPU, 2048 CUDA)",
    )
    serve.add_argument(
        "--kv-cache-memory",
        type=parse_bytes,
        default=2 * GiB,
        help="KV pool size on the CPU (default 2GiB)",
    )
    serve.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="share of GPU memory to use (default 0.9)",
    )
    serve.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    serve.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"]
    )
    serve.add_argument("--block-size", type=int, default=16)
    serve.add_argument(
        "--enforce-eager", action="store_true", help="CUDA: no CUDA graphs for decode"
    )
    serve.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])
    serve.add_argument("--no-prefix-caching", action="store_true")
    serve.add_argument("--max-queued-requests", type=int, default=1024)
    serve.add_argument("--max-n", type=int, default=16, help="largest n a request may ask for")
    serve.add_argument("--max-body-bytes", type=parse_bytes, default=16 * MiB)
    serve.add_argument("--max-connections", type=int, default=2048)
    serve.add_argument("--header-timeout", type=float, default=10.0)
    serve.add_argument("--body-timeout", type=float, default=30.0)
    serve.add_argument("--timeout-keep-alive", type=float, default=5.0)
    serve.add_argument("--shutdown-timeout", type=float, default=30.0)
    serve.add_argument("--sse-ping-interval", type=float, default=15.0)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    pull = sub.add_parser("pull", help="download and convert the default model")
    pull.add_argument("--force", action="store_true", help="convert again even if present")

    convert = sub.add_parser(
        "convert-gguf", help="convert a Llama-architecture GGUF to a HF folder"
    )
    convert.add_argument("gguf_file")
    convert.add_argument("out_dir")

    gen = sub.add_parser("generate", help="one chat turn, printed as it is generated")
    gen.add_argument("prompt")
    gen.add_argument("--model", help="model folder (default: the default model)")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--system", help="system prompt")
    gen.add_argument("--device", default="auto")
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    return parser


def fail(message: str, code: int) -> int:
    print(f"nanoserve: error: {message}", file=sys.stderr)
    return code


def resolve_model_dir(model_dir: str | None) -> Path:
    if model_dir:
        return Path(model_dir)
    from model.hub.default_model import ensure_default_model

    return ensure_default_model()


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
    engine = LLMEngine(
        EngineConfig(
            model_dir=str(model_dir),
            device=args.device,
            dtype=args.dtype,
            max_num_seqs=1,
            kv_cache_memory_bytes=256 * MiB,
        )
    )
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
        from server.serve import serve

        return serve(args, resolve_model_dir(args.model_dir))
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

"""``fusekit serve``: serve models, merged outputs, ensembles and routers over OpenAI's HTTP API."""

from __future__ import annotations

from typing import Annotated

import typer

from fusekit.cli.app import app
from fusekit.cli.options import Device, ThreadsOpt, set_threads
from fusekit.errors import FusekitError

_EPILOG = ("Example: fusekit serve configs/serve/demo.yaml\n"
           "fusekit serve ./merged ./router --port 8000 --api-key secret")

TargetsArg = Annotated[list[str], typer.Argument(
    help="A serve config (YAML), or what to serve: model folders (merged outputs too), Hub ids, "
         "BASE+ADAPTER, ensemble recipes, router folders.", show_default=False)]
NameOpt = Annotated[list[str] | None, typer.Option(
    "--name", help="Served name of each model given, in order (default: its folder or recipe name).",
    show_default=False)]
_LIMIT = "Overrides the config's limits."


def _opt(flag: str, help_text: str, **kwargs: object) -> typer.models.OptionInfo:
    return typer.Option(flag, help=help_text, show_default=False, **kwargs)  # type: ignore[arg-type]


HostOpt = Annotated[str | None, _opt("--host", "Address to listen on [default: 127.0.0.1; 0.0.0.0 listens "
                                     "on every interface].")]
PortOpt = Annotated[int | None, _opt("--port", "Port to listen on [default: 8000; 0: any free port].",
                                     min=0, max=65535)]
ApiKeyOpt = Annotated[str | None, _opt("--api-key", "Require Authorization: Bearer KEY on every route but "
                                       "/health.", envvar="FUSEKIT_API_KEY", show_envvar=True)]
ServeDeviceOpt = Annotated[Device | None, typer.Option(
    "--device", help="Where tensors are computed: cpu, cuda, or auto (CUDA when available).",
    show_default="the config's, else cpu")]
MaxBatchOpt = Annotated[int | None, _opt("--max-batch", f"Most requests one model decodes together "
                                         f"[default: 16]. {_LIMIT}", min=1)]
MaxQueueOpt = Annotated[int | None, _opt("--max-queue", f"Most requests waiting per model; more get 429 "
                                         f"[default: 64]. {_LIMIT}", min=1)]
MaxPromptOpt = Annotated[int | None, _opt("--max-prompt-tokens", f"Longest prompt, in tokens "
                                          f"[default: 4096]. {_LIMIT}", min=1)]
MaxTokensOpt = Annotated[int | None, _opt("--max-tokens-limit", f"Largest max_tokens a request may ask for "
                                          f"[default: 1024]. {_LIMIT}", min=1)]
MaxBodyOpt = Annotated[int | None, _opt("--max-body-bytes", f"Largest request body; more get 413 "
                                        f"[default: 1000000]. {_LIMIT}", min=1024)]
GraceOpt = Annotated[float | None, _opt("--grace-seconds", f"On SIGTERM, how long requests in flight may "
                                        f"still run [default: 30]. {_LIMIT}", min=0)]


@app.command("serve", epilog=_EPILOG)
def serve(
    targets: TargetsArg,
    name: NameOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    api_key: ApiKeyOpt = None,
    device: ServeDeviceOpt = None,
    max_batch: MaxBatchOpt = None,
    max_queue: MaxQueueOpt = None,
    max_prompt_tokens: MaxPromptOpt = None,
    max_tokens_limit: MaxTokensOpt = None,
    max_body_bytes: MaxBodyOpt = None,
    grace_seconds: GraceOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Serve each model under a name with OpenAI's API: /v1/models, /v1/completions,
    /v1/chat/completions (streamed with stream: true), /health and /metrics.

    Give one serve config, or the models themselves for a quick start. Every model loads before the
    port is bound; SIGTERM stops taking requests, lets those in flight finish and exits 0."""
    from fusekit.serve.config import is_serve_config, load_serve_config, quick_config, with_overrides

    _require_extra()
    if api_key is not None and not api_key.strip():
        raise FusekitError("--api-key (or FUSEKIT_API_KEY) is empty; give the key clients must send")
    limits = {"max_batch": max_batch, "max_queue": max_queue, "max_prompt_tokens": max_prompt_tokens,
              "max_tokens_limit": max_tokens_limit, "max_body_bytes": max_body_bytes,
              "grace_seconds": grace_seconds}
    if len(targets) == 1 and is_serve_config(targets[0]):
        if name:
            raise FusekitError(f"--name names the models of a quick start; {targets[0]} is a serve config, "
                               "whose models: entries carry their names")
        config = load_serve_config(targets[0])
    else:
        config = quick_config(targets, name or ())
    config = with_overrides(config, limits=limits, host=host, port=port,
                            device=device.value if device is not None else None)
    if api_key is None and config.host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"fusekit: warning: listening on {config.host} without --api-key; anyone who can reach "
                   "this machine can use the models", err=True)
    from fusekit.serve.server import serve as run_server

    set_threads(threads)
    run_server(config, api_key=api_key)


def _require_extra() -> None:
    """One line naming the install command when FastAPI or uvicorn is missing."""
    import importlib.util

    from fusekit.extras import install_hint

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise FusekitError(f"fusekit serve needs {' and '.join(missing)}; {install_hint('serve')}")

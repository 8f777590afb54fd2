"""`personascope serve`: an OpenAI-compatible chat server for a local model, optionally steered."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any

import typer

from personascope.errors import PersonascopeError


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    model: Annotated[
        str, typer.Option("--model", "-m", help="Bundled alias, hub id, model directory or .gguf file.")
    ] = "smollm2-135m-instruct",
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default; there is no authentication).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    model_id: Annotated[str | None, typer.Option(help="Model name clients use (default: the --model value).")] = None,
    vector: Annotated[
        Path | None, typer.Option(help="PersonaVector file (.safetensors) to steer every request with.")
    ] = None,
    layer: Annotated[int | None, typer.Option(help="Steering layer (default: the vector's chosen layer).")] = None,
    coef: Annotated[
        float | None,
        typer.Option(help="Steering coefficient (default: the vector's chosen one); requests may override it."),
    ] = None,
    positions: Annotated[str, typer.Option(help="all | prompt | response | last_prompt_and_response")] = "all",
    max_tokens_limit: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")] = 2048,
    device: Annotated[str | None, typer.Option(help="torch device (default: cuda if available, else cpu).")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve a model with OpenAI's chat-completions API (GET /v1/models, POST /v1/chat/completions).

    With --vector every request is steered (coef · vector at --layer); a request can override the coefficient with
    the extension field {"personascope": {"coef": C}}.
    """
    import personascope as ps
    from personascope.residual.positions import check_positions
    from personascope.residual.steering import Steering, check_choices
    from personascope.server import serve as run_server

    check_positions(positions)
    if vector is None and (layer is not None or coef is not None):
        raise PersonascopeError("--layer and --coef need --vector")
    if not 0 <= port <= 65535:
        raise PersonascopeError(f"--port must be between 0 and 65535, got {port}")
    if max_tokens_limit < 1:
        raise PersonascopeError(f"--max-tokens-limit must be at least 1, got {max_tokens_limit}")
    steer_vec = ps.PersonaVector.load(vector) if vector is not None else None
    if steer_vec is not None:
        check_choices(steer_vec, layer, coef, source=str(vector))
    m = ps.load_model(model, device=device)
    steering = None
    if steer_vec is not None:
        steering = Steering.from_vector(m, steer_vec, layer, coef, positions, source=str(vector))
    if not _is_loopback(host):
        typer.echo(
            f"warning: listening on {host} makes the model reachable from the network without authentication",
            err=True,
        )
    served = model_id or model
    steer_note = f", steered with {_describe(steering)}" if steering else ""
    typer.echo(f"serving {served} on http://{host}:{port}/v1{steer_note}", err=True)
    run_server(
        m,
        host=host,
        port=port,
        model_id=served,
        steering=steering,
        max_tokens_limit=max_tokens_limit,
        log_level=log_level,
    )


def _describe(steering: Any) -> str:
    d = steering.describe()
    if "layer" in d:
        return f"coef {d['coef']:g} at layer {d['layer']}"
    return f"coefs {d['coefs']} at layers {d['layers']}"

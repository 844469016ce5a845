"""`fragment serve`: the model behind an OpenAI-compatible HTTP API and a chat page."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

import click

from fragment_llm.cli.common import (
    FlagValue,
    FragmentCommand,
    checkpoint_option,
    config_option,
    model_paths,
    show,
    use_threads,
)

if TYPE_CHECKING:
    from fragment_llm.config import ServeConfig
    from fragment_llm.serve.run import ServeRequest


@click.command(cls=FragmentCommand)
@checkpoint_option
@click.option("--host", help="Address to listen on [127.0.0.1]; anything but loopback needs "
                             "an API key.")
@click.option("--port", type=int, help="TCP port [8000]; 0 picks a free one.")
@click.option("--api-key-file", type=click.Path(path_type=Path, dir_okay=False),
              help="File whose first line is the API key (or set FRAGMENT_API_KEY). "
                   "Never pass the key itself on the command line.")
@click.option("--slots", type=int, help="Answers generated at once [2].")
@click.option("--queue", type=int, help="Requests that may wait for a slot [8]; more get 429.")
@click.option("--max-tokens", "max_new_tokens", type=int,
              help="Cap on a request's max_tokens, and its default [256].")
@click.option("--timeout", "max_time_s", type=float,
              help="Seconds a request may take, queueing included [60].")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              callback=lambda ctx, param, value: value or None,
              help="Let web pages from this origin call the API (repeatable) [none].")
@click.option("--model-name", help="The model id the API lists [the checkpoint folder's name].")
@click.option("--threads", type=int, help="torch threads [1].")
@click.option("--dry-run", is_flag=True,
              help="Check everything (settings, key, model, port), print the banner, and exit "
                   "without serving.")
@config_option
def serve(checkpoint_path: Path | None, adapter_path: Path | None, dry_run: bool,
          config_path: Path | None, **flags: FlagValue) -> None:
    """Serve a model over HTTP: an OpenAI-compatible API and a chat page.

    \b
    Endpoints: GET / (the chat page), GET /v1/models, POST /v1/chat/completions,
    POST /v1/completions (both with "stream": true), GET /health. Any OpenAI
    client works: point its base URL at http://127.0.0.1:8000/v1. Listens on
    loopback only unless --host says otherwise, which needs an API key. Stop with
    Ctrl-C. Sampling defaults and every limit are in the [serve] config table
    (docs/serve.md).

    \b
    Examples:
      fragment serve                                     # checkpoints/, latest step
      fragment serve --checkpoint checkpoints-merged --port 8080
      fragment serve --adapter checkpoints-chat --slots 1 --max-tokens 128
      fragment serve --host 0.0.0.0 --api-key-file key.txt    # reachable from the network
      fragment serve --config serve.toml --dry-run       # check a set-up, serve nothing
    """
    from fragment_llm.cli.display import summary_table
    from fragment_llm.config import ServeConfig, load_stage_config
    from fragment_llm.serve import run
    from fragment_llm.serve.guard import load_api_key

    # Everything that can be refused without the model first (settings, key, host,
    # origins, the extra, the port): a refusal is one line at once, not after the
    # seconds that importing torch and loading a checkpoint take.
    settings = load_stage_config(ServeConfig, "serve", config_path, flags)
    api_key = load_api_key(settings.api_key_file)
    run.check_settings(settings, api_key)
    run.require_serve_extra()
    with contextlib.closing(run.bind(settings.host, settings.port)) as sock:
        request, step = _load(checkpoint_path, adapter_path, settings, api_key,
                              worker_processes=not dry_run)

        def listening(url: str) -> None:
            show(summary_table("fragment serve", [
                ("model", f"{run.model_id_for(settings, request.checkpoint_path)} "
                          f"(step {step:,})"),
                ("chat page", f"{url}/"), ("API base URL", f"{url}/v1"),
                ("API key", "required" if api_key else "none (loopback only)"),
                ("slots / queue", f"{settings.slots} / {settings.queue}"),
                ("max tokens / timeout",
                 f"{settings.max_new_tokens} / {settings.max_time_s:g} s"),
                ("stop", "dry run: nothing served" if dry_run else "Ctrl-C")]))

        if dry_run:
            listening(run.dry_run(request, sock))
        else:
            run.serve(request, listening, sock)


def _load(checkpoint_path: Path | None, adapter_path: Path | None, settings: ServeConfig,
          api_key: bytes | None, worker_processes: bool) -> tuple[ServeRequest, int]:
    """The model to serve (an adapter folded in), as a ServeRequest; and its step. A real
    server decodes in worker processes (one per slot); a dry run starts none."""
    from fragment_llm.finetune.adapters import merge_adapters
    from fragment_llm.finetune.artifact import load_tuned
    from fragment_llm.serve.run import ServeRequest

    use_threads(settings.threads)
    trained = load_tuned(model_paths(checkpoint_path, adapter_path), adapter_path)
    if trained.adapter is not None:
        # Folded in once (W + s·B·A): every token is then as fast as the base's.
        merge_adapters(trained.model)
    trained.model.eval()
    request = ServeRequest(trained.model, trained.tokenizer, trained.chat_format,
                           trained.checkpoint.path, _written_at(trained.checkpoint.path),
                           settings, api_key, worker_processes=worker_processes)
    return request, trained.step


def _written_at(step_folder: Path) -> int:
    try:
        return int((step_folder / "manifest.json").stat().st_mtime)
    except OSError:
        return 0

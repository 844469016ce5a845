"""`fragment generate`: one prompt in, its continuation streamed to stdout."""

from __future__ import annotations

import json
from pathlib import Path

import click

from fragment_llm.cli.common import (
    FlagValue,
    FragmentCommand,
    checkpoint_option,
    config_option,
    model_paths,
    sampling_options,
    use_threads,
    write_stdout,
)


@click.command(cls=FragmentCommand)
@checkpoint_option
@click.option("--prompt", "prompt_text", help="The text to continue; `-` reads standard input.")
@click.option("--prompt-file", type=click.Path(path_type=Path, dir_okay=False),
              help="Read the prompt from a UTF-8 file.")
@sampling_options
@click.option("--raw", is_flag=True,
              help="Continue the prompt as plain text even when the model was tuned to chat "
                   "(by default a chat model answers it as a user's message).")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"text", "new_tokens", "prompt_tokens", "tokens_per_s", '
                   '"time_to_first_token_s"} instead of the text.')
@config_option
def generate(checkpoint_path: Path | None, adapter_path: Path | None, prompt_text: str | None,
             prompt_file: Path | None, raw: bool, as_json: bool, config_path: Path | None,
             **flags: FlagValue) -> None:
    """Continue a prompt with a trained model; the text goes to stdout.

    \b
    The prompt is cleaned like chat input (control characters and escape sequences
    removed, NFC) and capped in characters and tokens (exit 1 past a cap). The
    completion is streamed to stdout, sanitised, and nothing else is written there.
    A model tuned to chat (`fragment finetune`, or --adapter) answers the prompt as
    a user's message and stops at the end of its answer; --raw continues it instead.

    \b
    Examples:
      fragment generate --prompt "ROMEO:" --max-new-tokens 100
      fragment generate --prompt-file start.txt --temperature 0 --json
      echo "To be" | fragment generate --prompt - --seed 1
      fragment generate --adapter checkpoints-chat --prompt "Who are you?"
    """
    from fragment_llm.config import GenerateConfig, load_stage_config
    from fragment_llm.finetune.artifact import load_tuned
    from fragment_llm.inference.text import complete, read_prompt

    if (prompt_text is None) == (prompt_file is None):
        raise click.UsageError("give exactly one of --prompt TEXT, --prompt - or --prompt-file")
    settings = load_stage_config(GenerateConfig, "generate", config_path, flags)
    prompt = read_prompt(prompt_text, prompt_file, settings)
    use_threads(settings.threads)
    trained = load_tuned(model_paths(checkpoint_path, adapter_path), adapter_path)
    result = complete(trained.model, trained.tokenizer, prompt, settings,
                      on_text=None if as_json else write_stdout,
                      chat_format=None if raw else trained.chat_format)
    if as_json:
        click.echo(json.dumps(result.as_json()))
    else:
        write_stdout("\n")

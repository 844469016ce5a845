"""`fragment finetune`: a pretrained checkpoint tuned on conversations (full, LoRA or
DoRA), with `fragment train`'s display, summary and exit codes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from fragment_llm.cli.common import (
    EXIT_INTERRUPTED,
    FLAGS,
    FlagValue,
    FragmentCommand,
    config_option,
    json_option,
    show,
)
from fragment_llm.cli.train import summary_as_json, summary_for_display, training_options
from fragment_llm.safety.signals import Terminated

if TYPE_CHECKING:
    from fragment_llm.config import FinetuneConfig, GivenSettings, TrainConfig

DEFAULT_CONVERSATIONS = Path("data/conversations")
DEFAULT_FINETUNED = Path("checkpoints-chat")
ADAPTER_FLAGS = ("method", "rank", "alpha", "dropout", "targets", "rslora")


def _targets(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [name.strip() for name in value.split(",") if name.strip()]
    allowed = ("qkv", "attn_proj", "mlp_fc", "mlp_proj")
    if not names or any(name not in allowed for name in names):
        raise click.BadParameter(f"{value!r}: a comma-separated list of {', '.join(allowed)}")
    return names


@click.command(cls=FragmentCommand)
@click.option("--base", type=click.Path(path_type=Path),
              help="The checkpoint to tune: a run folder (its newest valid step) or a step "
                   "folder. On --resume, defaults to the one the run recorded.")
@click.option("--data", type=click.Path(path_type=Path), default=DEFAULT_CONVERSATIONS,
              show_default=True,
              help="Conversations: a .jsonl/.json file, or a folder of them (OpenAI "
                   "messages or Alpaca records; docs/finetune.md).")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False),
              default=DEFAULT_FINETUNED, show_default=True,
              help="Run folder: checkpoints (or adapters), metrics.jsonl, the token cache.")
@click.option("--method", type=click.Choice(["full", "lora", "dora"]),
              help="full: every weight trains; lora/dora: a small adapter on a frozen base "
                   "[lora].")
@click.option("--rank", type=click.IntRange(1, 256), help="Adapter rank r [16].")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True, max=1e4),
              help="Adapter scale: updates are multiplied by alpha / r [32].")
@click.option("--lora-dropout", "dropout", type=click.FloatRange(0, 1, max_open=True),
              help="Dropout on the adapter's input [0].")
@click.option("--targets", callback=_targets,
              help="Projections to adapt, comma-separated: qkv,attn_proj,mlp_fc,mlp_proj "
                   "[all four].")
@click.option("--rslora", is_flag=True, default=None,
              help="Scale by alpha / sqrt(r) (rank-stabilised LoRA).")
@config_option
@training_options
@click.option("--tokens-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Where the rendered conversations are cached [OUT/tokens].")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from its newest valid step, exactly.")
@click.option("--dry-run", is_flag=True,
              help="Print the plan, a timing probe and the estimated time, then exit.")
@json_option('"steps", "val_loss", "checkpoint", "plan", ...')
def finetune(base: Path | None, data: Path, out: Path, config_path: Path | None,
             tokens_dir: Path | None, resume: bool, dry_run: bool, as_json: bool,
             **flags: FlagValue) -> int:
    """Tune a pretrained model on conversations, so it answers instead of continuing.

    \b
    Each conversation is validated (roles, alternation, sizes, duplicates: the
    refused ones are counted by reason), rendered with the chat template `fragment
    chat` uses (<|user|> ... <|end|><|assistant|> ... <|end|>) and trained on with
    a loss that counts only the assistant's tokens and the <|end|> closing them.
    LoRA and DoRA train a small adapter on the frozen base and save only it
    (OUT/step-NNNNNNN/adapter.safetensors): use it with --adapter on chat,
    generate, eval and verify, or fold it into a checkpoint with `fragment merge`.
    Everything `fragment train` does holds here: Ctrl-C saves and --resume
    continues exactly, --dry-run plans, torchrun runs it on several processes.

    \b
    Layering: fine-tuning defaults < the [finetune]/[train] tables of --config < flags.

    \b
    Examples:
      fragment finetune --base checkpoints --data data/conversations
      fragment finetune --base checkpoints --method dora --rank 8 --max-time 10m
      fragment finetune --base checkpoints --method full --out checkpoints-full
      fragment finetune --out checkpoints-chat --resume
    """
    from fragment_llm.cli.display import TrainDisplay
    from fragment_llm.finetune.run import FinetuneRequest, run_finetune
    from fragment_llm.train.runtime import keep_freed_memory

    keep_freed_memory()
    tuning, train_config, given = _finetune_configs(config_path, flags)
    request = FinetuneRequest(base=base, data=data, out=out, finetune=tuning,
                              train=train_config, resume=resume, tokens_dir=tokens_dir,
                              given=given)
    with TrainDisplay(not FLAGS.quiet, train_config.max_steps) as display:
        summary = run_finetune(request, display, dry_run=dry_run)
    if summary.terminated:
        raise Terminated(f"checkpoint saved at {summary.checkpoint}; --resume continues")
    if as_json:
        click.echo(json.dumps(summary_as_json(summary, display, dry_run)))
    else:
        show(summary_for_display(summary, display, dry_run))
    return EXIT_INTERRUPTED if summary.interrupted else 0


def _finetune_configs(config_path: Path | None, flags: dict[str, FlagValue]
                      ) -> tuple[FinetuneConfig, TrainConfig, GivenSettings]:
    """[finetune] and [train], each layered defaults < file < flags. Full fine-tuning
    starts from a lower learning rate: every pretrained weight moves."""
    from fragment_llm.config import (
        FINETUNE_FULL_LR,
        FINETUNE_TRAIN,
        FinetuneConfig,
        GivenSettings,
        TrainConfig,
        read_config_file,
        resolve,
    )

    tables = read_config_file(config_path) if config_path is not None else {}
    adapter_flags = {key: flags.pop(key) for key in ADAPTER_FLAGS}
    tuning = resolve(FinetuneConfig, "finetune", tables, config_path, adapter_flags)
    defaults = dict(FINETUNE_TRAIN)
    if tuning.method == "full":
        defaults["lr"] = FINETUNE_FULL_LR
    train = resolve(TrainConfig, "train", tables, config_path, flags, base=defaults)
    spelled = {param.name: param for param in click.get_current_context().command.params}
    given_flags = {key: (spelled[key].secondary_opts[0] if value is False
                         and spelled[key].secondary_opts else spelled[key].opts[0])
                   for key, value in flags.items() if value is not None}
    return tuning, train, GivenSettings.collect(None, tables, config_path, given_flags)

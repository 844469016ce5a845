"""Experiment plans: what loads, and every refusal one line naming the plan and field."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fragment_llm.config import ModelConfig, TrainConfig
from fragment_llm.errors import ConfigError
from fragment_llm.experiment.plan import MAX_STEPS_CEILING, Plan
from tests.helpers import REPO

MICRO = ('seeds = [1, 2]\n[budget]\nmax_steps = 20\n'
         '[base.model]\nn_layer = 1\nn_head = 1\nn_embd = 16\nblock_size = 16\n')


def write_plan(folder: Path, text: str, name: str = "plan.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["plan-lr-grid.toml", "plan-mlp.toml", "plan-speedrun.toml"])
def test_the_example_plans_validate(name):
    plan = Plan.load(REPO / "examples" / name)
    assert plan.max_time_s == 600 and len(plan.seeds) == 3  # the issue asks 3 seeds
    assert plan.max_steps is None and all(r.train.max_steps == MAX_STEPS_CEILING
                                          for r in plan.runs)  # time alone ends a run
    assert len(plan.trainings()) == 3 * len(plan.runs) >= 6


def test_runs_layer_preset_base_overrides_budget_and_seed(tmp_path):
    (tmp_path / "base.toml").write_text("[train]\nlr = 1e-3\nbatch_size = 4\n")
    plan = Plan.load(write_plan(tmp_path, 'preset = "tiny"\nbase = "base.toml"\nseeds = [7, 8]\n'
                                '[budget]\nmax_time = "90s"\nmax_steps = 50\n'
                                '[[runs]]\nname = "base"\n'
                                '[[runs]]\nname = "wide"\nmodel.n_embd = 256\ntrain.lr = 2e-3\n'))
    base, wide = plan.runs
    assert (base.model.n_layer, base.model.n_embd, wide.model.n_embd) == (4, 128, 256)  # tiny
    assert (base.train.lr, wide.train.lr, wide.train.batch_size) == (1e-3, 2e-3, 4)
    assert (wide.train.max_steps, wide.train.max_time_s) == (50, 90.0)
    assert plan.budget == "1.5m or 50 steps"
    assert wide.label == "model.n_embd=256 train.lr=0.002" and base.label == "base"
    assert [(t.run.name, t.seed) for t in plan.trainings()] == [
        ("base", 7), ("base", 8), ("wide", 7), ("wide", 8)]


def test_a_grid_is_the_cartesian_product_named_after_its_values(tmp_path):
    plan = Plan.load(write_plan(tmp_path, MICRO + '[grid]\ntrain.lr = [1e-3, 2e-3]\n'
                                'model.mlp = ["swiglu", "gelu"]\n'))
    assert [r.name for r in plan.runs] == ["mlp=swiglu+lr=0.001", "mlp=swiglu+lr=0.002",
                                           "mlp=gelu+lr=0.001", "mlp=gelu+lr=0.002"]
    assert plan.runs[3].model.mlp == "gelu" and plan.runs[3].train.lr == 2e-3


def test_a_training_config_is_a_train_config_file_of_the_same_settings(tmp_path):
    plan = Plan.load(write_plan(tmp_path, MICRO + '[[runs]]\nname = "a"\ntrain.lr = 3e-3\n'))
    training = plan.trainings()[1]
    tables = tomllib.loads(training.config_toml())
    assert TrainConfig.model_validate(tables["train"]) == training.train
    assert training.train.seed == 2
    assert ModelConfig.model_validate(tables["model"]) == training.run.model
    assert training.folder(Path("out")) == Path("out/a/seed-2")


DEEP = "x = " + "[" * 5000 + "]" * 5000 + "\n"
REFUSED = {
    "unknown plan key": ('colour = "red"\n' + MICRO + '[[runs]]\nname = "a"\n',
                         "unknown plan key colour"),
    "unknown override key": (MICRO + '[[runs]]\nname = "a"\ntrain.lrr = 1\n',
                             "unknown key train.lrr, in {plan} run 'a'"),
    "out of range": (MICRO + '[[runs]]\nname = "a"\ntrain.lr = 5.0\n',
                     "invalid train.lr = 5.0: Input should be less than or equal to 1, "
                     "in {plan} run 'a'"),
    "a shape the model refuses": (MICRO + '[[runs]]\nname = "a"\nmodel.n_head = 3\n',
                                  "invalid [model]: n_embd (16) must be divisible by n_head"),
    "a wrong type": (MICRO + '[[runs]]\nname = "a"\ntrain.batch_size = "8"\n',
                     "invalid train.batch_size = '8'"),
    "grid too large": (MICRO + "[grid]\ntrain.lr = [1e-3, 2e-3, 3e-3, 4e-3]\n"
                       "train.batch_size = [1, 2, 4, 8]\n"
                       "train.beta1 = [0.8, 0.85, 0.9, 0.95, 0.99]\n",
                       "[grid] makes 80 runs, more than 64"),
    "a huge grid, not expanded": (MICRO + "[grid]\n" + "".join(
        f"train.k{i} = [{', '.join(map(str, range(60)))}]\n" for i in range(16)),
        "[grid] makes 28,211,099,074,560,000,000,000,000,000 runs"),
    "missing base": ('base = "nowhere.toml"\nseeds = [1]\n[budget]\nmax_steps = 2\n'
                     '[[runs]]\nname = "a"\n', "file not found"),
    "base escaping the plan's folder": ('base = "../../etc/passwd"\nseeds = [1]\n'
                                        '[budget]\nmax_steps = 2\n[[runs]]\nname = "a"\n',
                                        "leaves the plan's folder"),
    "absolute data path": ('data = "/etc"\n' + MICRO + '[[runs]]\nname = "a"\n',
                           "plan field data = /etc leaves the plan's folder"),
    "run name with a slash": (MICRO + '[[runs]]\nname = "a/b"\n', "invalid plan field runs.0.name"),
    "run name ..": (MICRO + '[[runs]]\nname = ".."\n', "invalid plan field runs.0.name"),
    "run name with an escape": (MICRO + '[[runs]]\nname = "a\\u001b[2J"\n',
                                "invalid plan field runs.0.name = 'a\\x1b[2J'"),
    "duplicate names": (MICRO + '[[runs]]\nname = "a"\n[[runs]]\nname = "a"\n',
                        "run name 'a' appears twice"),
    "names differing in case only": (MICRO + '[[runs]]\nname = "Gelu"\n[[runs]]\nname = "gelu"\n',
                                     "run name 'Gelu' appears twice"),
    "a repeated seed": (MICRO.replace("[1, 2]", "[3, 3]") + '[[runs]]\nname = "a"\n',
                        "seeds repeat a seed ([3, 3])"),
    "a seed in a run": (MICRO + '[[runs]]\nname = "a"\ntrain.seed = 3\n',
                        "train.seed is set by the plan's seeds, not by a run"),
    "a budget in the base": (MICRO + '[base.train]\nmax_steps = 3\n[[runs]]\nname = "a"\n',
                             "train.max_steps is set by the plan's [budget]"),
    "vocab size": (MICRO + '[[runs]]\nname = "a"\nmodel.vocab_size = 512\n',
                   "model.vocab_size is set by the tokenizer"),
    "too many seeds": (MICRO.replace("[1, 2]", str(list(range(11)))) + '[[runs]]\nname = "a"\n',
                       "invalid plan field seeds"),
    "no budget": (MICRO.replace("max_steps = 20", "") + '[[runs]]\nname = "a"\n',
                  "[budget] needs max_time or max_steps"),
    "a bad duration": (MICRO.replace("max_steps = 20", 'max_time = "soon"')
                       + '[[runs]]\nname = "a"\n', "invalid budget.max_time = 'soon'"),
    "neither runs nor grid": (MICRO, "a plan needs [[runs]] or [grid] (one of them)"),
    "deep TOML": (DEEP, "in {plan}"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_bad_plan_is_refused_naming_the_plan_and_the_field(case, tmp_path):
    text, expected = REFUSED[case]
    (tmp_path / "plans").mkdir()
    path = write_plan(tmp_path / "plans", text)
    with pytest.raises(ConfigError) as refused:
        Plan.load(path)
    message = refused.value.message
    assert expected.format(plan=path) in message, message
    assert str(path) in message and "\n" not in message

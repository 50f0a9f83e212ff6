"""The `w2vbert-asr` command line: `w2vbert-asr <command> [recipe=<name>] [key=value ...]`.

Usage:
    w2vbert-asr --help
    w2vbert-asr synth recipe=demo
    w2vbert-asr prepare data.root=/data/cv-corpus-21.0/sw lang=sw output_dir=outputs/sw
    w2vbert-asr train recipe=demo
    w2vbert-asr train recipe=mn data.root=/data/cv-corpus-21.0/mn --cfg job     # print the composed config
    w2vbert-asr evaluate recipe=demo
    w2vbert-asr transcribe model=demo_out/model clip.mp3 recordings/
    w2vbert-asr serve model=demo_out/model                           # http://127.0.0.1:8000

A command that writes holds a lock on its folder (LOCKED_FOLDER) for its whole run, so a second command
on the same folder stops at once. A key the schema lacks, a value of the wrong type or outside its choices
(w2vbert_asr/config.py), a missing required value or any UsageError is one `error:` line (exit 2).
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import sys
import traceback
from contextlib import nullcontext
from pathlib import Path

from . import UsageError
from .redact import redact_arg, redact_text
from .storage import folder_lock

# command -> (module, function, one-line help). Modules are imported lazily: `--help` stays instant.
COMMANDS = {
    "synth": ("synth", "synth", "write a synthetic Common Voice release spoken by libespeak-ng"),
    "prepare": ("prepare", "prepare", "normalise and filter a dataset, build the vocabulary and processor"),
    "train": ("train", "train", "fine-tune (prepares the data first), export model/, score dev and test"),
    "evaluate": ("evaluate", "evaluate", "score a model dir on a split: metrics.json + predictions"),
    "baseline": ("baseline", "baseline", "score a Whisper, omniASR or MMS checkpoint zero-shot on the same split"),
    "compare": ("compare", "compare", "side-by-side table (markdown, JSON, PNG) of result folders"),
    "transcribe": ("transcribe", "transcribe", "transcribe audio files or folders to txt, json and srt"),
    "serve": ("serve", "serve", "an OpenAI-compatible transcription API and a try-it page over HTTP"),
    "lm": ("lm", "build_lm", "build an n-gram language model from the training text"),
    "push": ("push", "push", "upload a model dir with a generated model card to the Hub"),
    "export": ("export", "export", "write <model>/onnx/model.onnx (and int8) for the onnxruntime CPU backend"),
    "pseudolabel": ("pseudolabel", "pseudolabel", "label unlabelled clips (other.tsv) for self-training; or run its rounds"),
    "audit": ("audit", "audit", "score every clip's transcript against its audio: audit.tsv + an HTML report"),
    "bakeoff": ("bakeoff", "bakeoff", "zero-shot baselines + each backbone fine-tuned + compare: the best model here"),
    "download": ("download", "download", "fetch every model a recipe's commands need into the Hugging Face cache"),
}
# For these commands `model=<dir or Hub id>` names the model to use, not the model config group.
MODEL_ARG_COMMANDS = {"evaluate", "transcribe", "serve", "push", "lm", "export", "pseudolabel", "audit"}
# Hydra's flags that take a value (`--cfg job`), and `--info`'s optional one.
HYDRA_FLAG_VALUES = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun"}
INFO_CHOICES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
# With these flags Hydra composes another config, or sweeps: it is not checked before Hydra starts, only
# when the command runs (run: validate).
HYDRA_OWN_COMPOSITION = {"-m", "--multirun", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
                         "--experimental-rerun"}
# The config key of the folder each command writes: the main process locks it for the whole command, so
# two commands never write into one folder at once. lm and push rebuild lm.output_dir and push.staging_dir
# whole, so the run folder around them holds their lock; export moves its files into its folder one by
# one and locks that (export.output_dir, null: <model_dir>/onnx, `locked_folder`). pseudolabel running
# self-training rounds locks output_dir, where the rounds go. compare (which may learn its folder only from
# the runs it reads) takes none.
LOCKED_FOLDER = {"synth": "synth.output_dir", "prepare": "output_dir", "train": "output_dir",
                 "evaluate": "eval.results_dir", "baseline": "baseline.results_dir", "lm": "output_dir",
                 "push": "output_dir", "transcribe": "transcribe.output_dir", "export": "export.output_dir",
                 "pseudolabel": "pseudolabel.output_dir",
                 "audit": "audit.output_dir", "bakeoff": "bakeoff.output_dir"}
# What to pass when a required value (`???` in conf/) is missing.
REQUIRED = {"lang": "lang=<language code, e.g. sw> or recipe=<name>",
            "data.root": "data.root=<the dataset folder, e.g. a Common Voice language folder>"}


def conf_dir() -> Path:
    """Configs ship inside the wheel (w2vbert_asr/conf); a source checkout uses the top-level conf/."""
    packaged = Path(__file__).resolve().parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "conf"


def recipes_dir() -> Path:
    packaged = conf_dir() / "recipe"
    return packaged if packaged.is_dir() else conf_dir().parent / "recipes"


def compose(overrides: list[str] | None = None):
    """The config a command would see, for tests, notebooks and scripts: compose(["recipe=demo", "lang=sw"]).
    Checked against the schema (checks.validate); a mistake raises checks.ConfigError, a UsageError whose
    message is one line."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .checks import ConfigError, explain, validate
    from .config import register

    register()  # the schemas conf/ names in its defaults lists
    overrides = list(overrides or [])
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        try:
            cfg = hydra_compose(config_name="config", overrides=overrides)
        except (HydraException, OmegaConfBaseException) as e:
            raise ConfigError(explain(e, overrides)) from e
    return validate(cfg)


def usage() -> str:
    lines = ["usage: w2vbert-asr <command> [recipe=<name>] [key=value ...] [--cfg job] [--help]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    recipes = sorted(p.stem for p in recipes_dir().glob("*.yaml"))
    lines += ["", f"recipes: {', '.join(recipes)}   (recipes/<name>.yaml; any language works without one:",
              "         lang=<code> data.root=<Common Voice folder>)",
              "`w2vbert-asr <command> --help` shows the composed config and its groups."]
    return "\n".join(lines)


def _translate(command: str, args: list[str]) -> list[str]:
    """Positional audio paths (transcribe) and `model=<dir>` become Hydra overrides; Hydra's flags
    (with their values: `--cfg job`) go after all overrides, which Hydra's parser wants together."""
    overrides, flags = _split(command, args)
    return overrides + flags


def _split(command: str, args: list[str]) -> tuple[list[str], list[str]]:
    """-> (Hydra overrides, Hydra's flags with their values) of a command's arguments (see _translate)."""
    overrides, inputs, flags = [], [], []
    for i, a in enumerate(args):
        previous = args[i - 1] if i else ""
        if a.startswith("-") or previous in HYDRA_FLAG_VALUES or previous in ("--info", "-i") and a in INFO_CHOICES:
            flags.append(a)
        elif command in MODEL_ARG_COMMANDS and a.startswith("model=") and not _is_model_option(a[len("model="):]):
            overrides.append("model_dir=" + _quote(a[len("model="):]))
        elif command == "transcribe" and "=" not in a:
            inputs.append(a)
        else:
            overrides.append(a)
    if inputs:
        overrides.append("transcribe.inputs=[" + ",".join(_quote(i) for i in inputs) + "]")
    if command in MODEL_ARG_COMMANDS and not any(o.startswith(("lang=", "recipe=")) for o in overrides):
        overrides.append("lang=model")  # lang only names output folders here; the model carries the rest
        model_dir = Path(next((a[len("model="):] for a in args if a.startswith("model=")), ""))
        if model_dir.name and model_dir.is_dir() and not any(o.startswith("output_dir=") for o in overrides):
            # Outputs (transcripts, lm, push staging) go next to the run that made the model.
            overrides.append("output_dir=" + _quote(str(model_dir.resolve().parent)))
    return overrides, flags


def _is_model_option(value: str) -> bool:
    """`model=<value>` picks conf/model/<value>.yaml only when that file exists and no such path does."""
    return (conf_dir() / "model" / f"{value}.yaml").is_file() and not Path(value).exists()


def shown_command(command: str, args: list[str]) -> str:
    """The command line the model card shows (overrides only, Hydra's flags left out, secrets redacted)."""
    return " ".join(["w2vbert-asr", command,
                     *(shlex.quote(redact_arg(a)) for a in args if "=" in a and not a.startswith("-"))])


def _quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def main(argv: list[str] | None = None) -> int | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"w2vbert-asr: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    import hydra

    from .config import register

    register()  # the schemas conf/ names in its defaults lists, for Hydra's own composition too

    overrides, flags = _split(command, rest)
    if not HYDRA_OWN_COMPOSITION.intersection(flags):
        # Composed and checked here first: Hydra's own report of a composition error is several lines
        # (with a hint to add `+`, which would silently add a key nothing reads) and exit code 1.
        try:
            compose(overrides)
        except UsageError as e:
            _exit(f"error: {e}")

    def task(cfg):
        return run(command, cfg, shown_command(command, rest))

    sys.argv = [f"w2vbert-asr {command}", *overrides, *flags]
    hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(task)()
    return 0


def run(command: str, cfg, shown: str):
    """Run one command on its composed config with its folder locked; a mistake the user can fix
    ends the process with one `error:` line (exit 2)."""
    from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

    from .checks import validate
    from .tracking import quiet_console

    module, func, _ = COMMANDS[command]
    quiet_console()
    try:
        validate(cfg)  # main checked the config it composed, not one Hydra composed on its own (a sweep, -cd)
        if command == "train" and cfg.push.command is None:
            cfg.push.command = shown  # set here, not as an override: Hydra's messages list the overrides
        with _lock(command, cfg):
            return getattr(importlib.import_module(f"w2vbert_asr.{module}"), func)(cfg)
    except UsageError as e:
        _exit(f"error: {e}")
    except (MissingMandatoryValue, InterpolationToMissingValueError) as e:
        _exit(f"error: {_missing_value(e)}")
    except Exception:
        # Not Hydra's report: it starts with every override, and so with any secret typed on the command line.
        traceback.print_exc()
        sys.exit(1)


def _lock(command: str, cfg):
    """The lock on the folder `command` writes. Under `accelerate launch` every rank runs the command;
    only the main one (RANK 0) locks, so the others neither wait nor fail."""
    main_process = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0
    key, folder = locked_folder(command, cfg) if main_process else (None, None)
    return folder_lock(folder, key, f"w2vbert-asr {command}") if folder else nullcontext()


def locked_folder(command: str, cfg) -> tuple[str | None, str | None]:
    """-> (config key, folder) that `command` writes with `cfg` (LOCKED_FOLDER; two depend on the config)."""
    from omegaconf import OmegaConf

    key = LOCKED_FOLDER.get(command)
    if command == "pseudolabel" and OmegaConf.select(cfg, "self_training.thresholds"):
        key = "output_dir"  # the rounds write output_dir/round<i>, self_training.json and compare/
    folder = OmegaConf.select(cfg, key, throw_on_missing=True) if key else None
    if command == "export" and not folder:
        from .export import onnx_dir

        folder = str(onnx_dir(OmegaConf.select(cfg, "model_dir", throw_on_missing=True)))
    return key, folder


def _missing_value(e) -> str:
    """`data.root is not set: pass data.root=<...>` for an omegaconf missing-value error."""
    found = re.search(r"Missing mandatory value: ?([\w.-]+)", str(e))
    key = found.group(1) if found else str(e.full_key)
    needed_by = f" ({e.full_key} needs it)" if e.full_key and e.full_key != key else ""
    return f"{key} is not set{needed_by}: pass {REQUIRED.get(key, f'{key}=<value>')}"


def _exit(message: str, code: int = 2):
    print(redact_text(message), file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    sys.exit(main())

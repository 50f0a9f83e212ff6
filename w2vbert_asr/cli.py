"""The `w2vbert-asr` command line: `w2vbert-asr <command> [recipe=<name>] [key=value ...]`.

Usage:
    w2vbert-asr --help
    w2vbert-asr synth recipe=demo
    w2vbert-asr prepare data.root=/data/cv-corpus-21.0/sw lang=sw output_dir=outputs/sw
    w2vbert-asr train recipe=demo
    w2vbert-asr train recipe=mn data.root=/data/cv-corpus-21.0/mn --cfg job     # print the composed config
    w2vbert-asr evaluate recipe=demo
    w2vbert-asr transcribe model=demo_out/model clip.mp3 recordings/
"""

from __future__ import annotations

import importlib
import shlex
import sys
from pathlib import Path

from . import UsageError

# command -> (module, function, one-line help). Modules are imported lazily: `--help` stays instant.
COMMANDS = {
    "synth": ("synth", "synth", "write a synthetic Common Voice release spoken by libespeak-ng"),
    "prepare": ("data", "prepare", "normalise and filter a dataset, build the vocabulary and processor"),
    "train": ("train", "train", "fine-tune (prepares the data first), export model/, score dev and test"),
    "evaluate": ("evaluate", "evaluate", "score a model dir on a split: metrics.json + predictions"),
    "baseline": ("baseline", "baseline", "score a Whisper checkpoint zero-shot on the same split"),
    "compare": ("report", "compare", "side-by-side table (markdown, JSON, PNG) of result folders"),
    "transcribe": ("transcribe", "transcribe", "transcribe audio files or folders to txt, json and srt"),
    "lm": ("lm", "build_lm", "build an n-gram language model from the training text"),
    "push": ("hub", "push", "upload a model dir with a generated model card to the Hub"),
}
# For these commands `model=<dir or Hub id>` names the model to use, not the model config group.
MODEL_ARG_COMMANDS = {"evaluate", "transcribe", "push", "lm"}


def conf_dir() -> Path:
    """Configs ship inside the wheel (w2vbert_asr/conf); a source checkout uses the top-level conf/."""
    packaged = Path(__file__).resolve().parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "conf"


def recipes_dir() -> Path:
    packaged = conf_dir() / "recipe"
    return packaged if packaged.is_dir() else conf_dir().parent / "recipes"


def compose(overrides: list[str] | None = None):
    """The config a command would see, for tests, notebooks and scripts: compose(["recipe=demo", "lang=sw"])."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides or []))


def usage() -> str:
    lines = ["usage: w2vbert-asr <command> [recipe=<name>] [key=value ...] [--cfg job] [--help]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    recipes = sorted(p.stem for p in recipes_dir().glob("*.yaml"))
    lines += ["", f"recipes: {', '.join(recipes)}   (recipes/<name>.yaml; any language works without one:",
              "         lang=<code> data.root=<Common Voice folder>)",
              "`w2vbert-asr <command> --help` shows the composed config and its groups."]
    return "\n".join(lines)


def _translate(command: str, args: list[str]) -> list[str]:
    """Positional audio paths (transcribe) and `model=<dir>` become Hydra overrides."""
    overrides, inputs = [], []
    for a in args:
        if command in MODEL_ARG_COMMANDS and a.startswith("model=") and not a.startswith("model=tiny"):
            overrides.append("model_dir=" + _quote(a[len("model="):]))
        elif command == "transcribe" and "=" not in a and not a.startswith("-"):
            inputs.append(a)
        else:
            overrides.append(a)
    if inputs:
        overrides.append("transcribe.inputs=[" + ",".join(_quote(i) for i in inputs) + "]")
    if command == "train" and not any(o.startswith("push.command=") for o in overrides):
        # The model card shows the command that made the model (overrides only, Hydra's flags left out).
        shown = " ".join(["w2vbert-asr", command, *(shlex.quote(a) for a in args if "=" in a and not a.startswith("-"))])
        overrides.insert(0, "push.command=" + _quote(shown))
    if command in MODEL_ARG_COMMANDS and not any(o.startswith(("lang=", "recipe=")) for o in overrides):
        overrides.append("lang=model")  # lang only names output folders here; the model carries the rest
        model_dir = Path(next((a[len("model="):] for a in args if a.startswith("model=")), ""))
        if model_dir.name and model_dir.is_dir() and not any(o.startswith("output_dir=") for o in overrides):
            # Outputs (transcripts, lm, push staging) go next to the run that made the model.
            overrides.append("output_dir=" + _quote(str(model_dir.resolve().parent)))
    return overrides


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
    module, func, _ = COMMANDS[command]
    import hydra

    def task(cfg):
        try:
            return getattr(importlib.import_module(f"w2vbert_asr.{module}"), func)(cfg)
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    sys.argv = [f"w2vbert-asr {command}", *_translate(command, rest)]
    hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(task)()
    return 0


if __name__ == "__main__":
    sys.exit(main())

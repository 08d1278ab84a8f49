"""`python -m open_clip_hn.demo`: the bag-of-words failure and its fix, on a laptop, offline.

1. renders procedural two-object scenes into webdataset shards, plus compositional sets from
   compositions never used in training (`val`: the demo's sets; `test`: a second, unseen split);
2. pretrains a tiny CLIP with plain OpenCLIP;
3. continues from that checkpoint twice with the same seed, data, steps and learning rate, once
   with vanilla OpenCLIP and once with the plugin's recommended hard-negative recipe (as NegCLIP
   and CE-CLIP fine-tune a pretrained CLIP);
4. evaluates both on every set, prints the comparison, writes `results.json` and `compare.png`.

Every training run is `python -m open_clip_hn.train` in a subprocess: exactly the command a user
would type, and each run gets a fresh process like OpenCLIP expects.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Sequence

from . import eval as hn_eval
from . import scenes
from .argtypes import non_negative_int, positive_float, positive_int
from .config import HNConfig
from .files import atomic_write_json, read_model_config, shard_paths
from .recipes import resolve_recipe
from .run import no_hard_negative_step

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# The demo's tiny CLIP has a ModifiedResNet image tower: the tiny ViT of the tests
# (hn-tiny-vit.json) does not tell 6-pixel shapes apart within the demo's budget (benchmarks/RESULTS.md)
MODEL_CONFIG = os.path.join(PACKAGE_DIR, "model_configs", "hn-tiny-rn.json")
RECOMMENDED = "recommended"  # a shipped recipe name (open_clip_hn.recipes), found from a wheel too


# Wall seconds of each stage at the defaults on the 2-core CPU machine (fp32), as (idle, shared):
# benchmarks/RESULTS.md's stage timings (one stage at a time, nothing else running) and session 13's run on the
# shared machine (one thread, beside another training: 13 min 22 s), with the units of work they
# did (scenes rendered, scene-epochs trained, test items scored). The idle hard-negative stage is
# the idle vanilla stage times the shared runs' ratio (418 s / 194 s: the recipe's converse
# captions, two more text blocks per mirrored sample, made it heavier than the 220 s measured
# before them). A stage that starts a process (loading torch, OpenCLIP, the model) costs
# STARTUP_SECONDS whatever its size (toy runs: ~2 min).
STAGE_SECONDS = {
    "rendering": (20000, (17.0, 41.0)),
    "pretraining": (20000, (42.0, 70.0)),
    "vanilla": (60000, (116.0, 194.0)),
    "hard negatives": (60000, (250.0, 418.0)),
    "evaluation": (1000, (25.0, 79.0)),
}
STARTUP_SECONDS = (8.0, 25.0)


def expected_seconds(samples: int, test_items: int, pretrain_epochs: int,
                     epochs: int) -> tuple[float, float]:
    """(low, high) wall seconds of a run from scratch on 2 CPU cores, scaled from the stage sizes."""
    units = {"rendering": samples, "pretraining": samples * pretrain_epochs,
             "vanilla": samples * epochs, "hard negatives": samples * epochs,
             "evaluation": test_items}
    bounds = []
    for side in (0, 1):
        total = 0.0
        for stage, (default_units, measured) in STAGE_SECONDS.items():
            fixed = 0.0 if stage == "rendering" else STARTUP_SECONDS[side]
            total += fixed + (measured[side] - fixed) * units[stage] / default_units
        bounds.append(total)
    return bounds[0], bounds[1]


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


@dataclass(frozen=True)
class DemoData:
    train: str  # --train-data value
    val: str  # compositional sets from the val compositions (the demo's sets)
    test: str  # compositional sets from the test compositions (never used anywhere else)


def prepare_data(root: str, samples: int, test_items: int, image_size: int = 32,
                 seed: int = 0, samples_per_shard: int = 2500) -> DemoData:
    """Render shards and sets once; reuse them when a previous run used the same settings."""
    stamp_path = os.path.join(root, "stamp.json")
    stamp = {"samples": samples, "test_items": test_items, "image_size": image_size,
             "seed": seed, "samples_per_shard": samples_per_shard,
             "render_version": scenes.RENDER_VERSION}
    train_dir = os.path.join(root, "train")
    names = [f"shard-{i:05d}.tar" for i in range(-(-samples // samples_per_shard))]
    data = DemoData(scenes.shards_spec([os.path.join(train_dir, n) for n in names]),
                    os.path.join(root, "val"), os.path.join(root, "test"))
    if os.path.isfile(stamp_path) and json.load(open(stamp_path)) == stamp:
        print(f"[data] reusing {root}")
        return data
    start = time.time()
    print(f"[data] rendering {samples} training scenes and {test_items} items per test set ...")
    scenes.write_scene_shards(train_dir, samples, samples_per_shard, seed, image_size)
    for split in ("val", "test"):
        scenes.write_compositional_sets(getattr(data, split), test_items, seed + 1, image_size,
                                        split, num_pairs=test_items // 2,
                                        num_retrieval=min(test_items, 300))
    atomic_write_json(stamp_path, stamp, indent=2)
    print(f"[data] done in {time.time() - start:.0f}s -> {root}")
    return data


def model_name(model_config: str) -> str:
    """OpenCLIP registers a config file under its file name without `.json`."""
    return os.path.splitext(os.path.basename(model_config))[0]


def train_argv(data: DemoData, logs: str, name: str, epochs: int, batch_size: int, lr: float,
               device: str, workers: int, seed: int, warmup: int,
               pretrained: str | None = None, extra: Sequence[str] = (),
               model_config: str = MODEL_CONFIG) -> list[str]:
    """OpenCLIP's command line for one run (plus plugin flags in `extra`)."""
    argv = ["--model", model_name(model_config), "--model-config", model_config,
            "--train-data", data.train, "--dataset-type", "webdataset",
            "--batch-size", str(batch_size), "--epochs", str(epochs), "--lr", str(lr),
            "--wd", "0.1", "--warmup", str(warmup), "--workers", str(workers),
            "--seed", str(seed), "--logs", logs, "--name", name, "--save-frequency", "1",
            "--report-to", "", "--log-every-n-steps", "20", "--device", device,
            "--precision", "fp32" if device == "cpu" else "amp"]
    if pretrained:
        argv += ["--pretrained", pretrained]
    return argv + list(extra)


def _file_stamp(path: str) -> list[int] | None:
    """Size and modification time of `path` (None when missing): a re-written file is new."""
    if not os.path.isfile(path):
        return None
    info = os.stat(path)
    return [info.st_size, info.st_mtime_ns]


def run_stamp(argv: list[str]) -> dict:
    """What decides a run: its command line, the contents of the recipe and model config it
    names, the checkpoint it starts from and its training shards (an edited recipe or model
    config, a re-trained checkpoint or re-rendered data under the same path is another run).
    A --train-data pattern that names no shards is a ValueError naming the flag."""
    contents, start, shards = {}, None, []
    for flag, value in zip(argv, argv[1:]):
        if flag == "--hn-config":
            value = resolve_recipe(value)  # a shipped recipe's name stamps the file it names
        if flag in ("--hn-config", "--model-config") and os.path.isfile(value):
            with open(value, encoding="utf-8") as handle:
                contents[value] = handle.read()
        if flag == "--pretrained":
            start = _file_stamp(value)
        if flag == "--train-data":
            shards = [_file_stamp(path) for path in shard_paths(value, "--train-data")]
    return {"argv": argv, "file_contents": contents, "pretrained_file": start, "train_files": shards}


def run_training(argv: list[str], logs: str, name: str, epochs: int, quiet: bool = False) -> str:
    """Run `python -m open_clip_hn.train argv` in a subprocess, echoing its progress lines.

    Returns the final checkpoint; raises with the log's tail when the run fails. An earlier
    finished run with the same name and the same `run_stamp` (command line, recipe contents,
    starting checkpoint, training shards) is reused.
    """
    checkpoint = os.path.join(logs, name, "checkpoints", f"epoch_{epochs}.pt")
    argv_path = os.path.join(logs, f"{name}.argv.json")
    stamp = run_stamp(argv)
    if (os.path.isfile(checkpoint) and os.path.isfile(argv_path)
            and json.load(open(argv_path)) == stamp):
        print(f"[{name}] reusing {checkpoint}")
        return checkpoint
    if os.path.isdir(os.path.join(logs, name)):
        shutil.rmtree(os.path.join(logs, name))  # an interrupted run: OpenCLIP refuses to overwrite
    os.makedirs(logs, exist_ok=True)
    log_path = os.path.join(logs, f"{name}.log")
    start = time.time()
    print(f"[{name}] training {epochs} epoch(s) ... (log: {log_path})")
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "open_clip_hn.train", *argv],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            if not quiet and "Train Epoch" in line:
                progress = line.split("Train Epoch:", 1)[1].split("Data (t)")[0].strip()
                loss = line.rsplit("Loss:", 1)[-1].strip()
                print(f"[{name}] epoch {progress}  loss {loss}", flush=True)
        process.wait()
    if process.returncode != 0 or not os.path.isfile(checkpoint):
        tail = "".join(open(log_path).readlines()[-25:])
        raise RuntimeError(f"training run {name!r} failed (exit {process.returncode}); "
                           f"log {log_path} ends with:\n{tail}")
    atomic_write_json(argv_path, stamp, indent=2)
    print(f"[{name}] done in {time.time() - start:.0f}s")
    return checkpoint


def logged_average(log_path: str, key: str = "Hn_curriculum") -> float | None:
    """A logged statistic averaged over the run's last logged epoch (None if not logged): how
    a finished run's share of hard negatives and mirrored pairs is read back from its log."""
    lines = [line for line in open(log_path) if "Train Epoch" in line and f"{key}:" in line]
    if not lines:
        return None
    average = lines[-1].split(f"{key}:", 1)[1].split("(", 1)[1].split(")", 1)[0]
    return float(average)


def evaluate_checkpoints(checkpoints: dict[str, str], roots: dict[str, str], device: str,
                         batch_size: int = 500, model_config: str = MODEL_CONFIG
                         ) -> dict[str, dict[str, dict[str, dict]]]:
    """{label: {benchmark: results}} for each checkpoint on each compositional folder."""
    loaded = {}
    for bench, root in roots.items():
        choice, pairs = hn_eval.discover_sets(root)
        loaded[bench] = (choice, pairs, hn_eval.load_retrieval_set(os.path.join(root, "retrieval")))
    results: dict[str, dict[str, dict]] = {}
    for label, checkpoint in checkpoints.items():
        model, preprocess, tokenizer = hn_eval.load_model(model_name(model_config), checkpoint,
                                                          device, [model_config])
        print(f"[eval] {label}")
        results[label] = {bench: hn_eval.evaluate_sets(model, preprocess, tokenizer, *sets,
                                                       device=device, batch_size=batch_size)
                          for bench, sets in loaded.items()}
    return results


def summary(vanilla: dict[str, dict], hn: dict[str, dict]) -> dict[str, float]:
    """The issue's targets: relation gain, swap error reduction, image->text R@1 change."""
    out = {"relation_gain": hn["replace_relation"]["acc"] - vanilla["replace_relation"]["acc"],
           "i2t_R@1_change": (hn["retrieval"]["image_to_text_R@1"]
                              - vanilla["retrieval"]["image_to_text_R@1"])}
    for kind in ("swap_attributes", "swap_objects"):
        error_v, error_h = 1 - vanilla[kind]["acc"], 1 - hn[kind]["acc"]
        out[f"{kind}_error_reduction"] = (error_v - error_h) / error_v if error_v > 0 else 0.0
    return out


def check_run_flags(args: argparse.Namespace) -> str | None:
    """What the trainer says of the hard-negative run's flags (the model config, the recipe and
    --hn-args), or None when it accepts them: asked of the trainer itself (`--hn-print-config`
    checks and exits), before any scene is rendered or run trained. The probe reads no data, so
    a --train-data pattern in --hn-args is checked here (`run_stamp` reads it)."""
    probe = DemoData("train-shards-checked-later", "", "")
    argv = train_argv(probe, "logs", "check", 1, 2, 1e-3, args.device, 0, args.seed, 0,
                      extra=["--hn-config", args.hn_config, *shlex.split(args.hn_args), "--hn-print-config"],
                      model_config=os.path.abspath(args.model_config))
    proc = subprocess.run([sys.executable, "-m", "open_clip_hn.train", *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        return (errors[-1].split("error: ", 1)[1] if errors else proc.stderr.strip()[-1000:]) + \
            " (in the hard-negative run's flags: --model-config, --hn-config, --hn-args)"
    try:
        run_stamp(argv)
        _check_train_data(shlex.split(args.hn_args))
    except ValueError as err:
        return f"{err} (in --hn-args)"
    config = _printed_config(proc.stdout)
    steps = max(1, args.samples // args.batch_size) * args.epochs  # the continued runs'
    short = no_hard_negative_step(config, steps)
    if short:
        return (f"{short} (the demo's hard-negative run, {steps} steps from --samples, "
                "--batch-size and --epochs: e.g. --hn-args '--hn-curriculum-warmup 12.5%')")
    return _caption_parser_problem(config)


def _check_train_data(hn_tokens: list[str]) -> None:
    """A --train-data of --hn-args names shards that are all there (else the hard-negative run,
    the demo's third, would be the first to find out)."""
    for flag, value in zip(hn_tokens, hn_tokens[1:]):
        if flag == "--train-data":
            paths = shard_paths(value, "--train-data")
            missing = [p for p in paths if not os.path.isfile(p)]
            if missing:
                raise ValueError(f"--train-data {value!r}: {len(missing)} of {len(paths)} shard "
                                 f"file(s) not found (first: {missing[0]})")


def _printed_config(printed_recipe: str) -> HNConfig:
    """The hard-negative run's configuration, from its resolved recipe as the trainer printed it."""
    import tempfile

    from .hooks import build_parser
    from .recipes import recipe_argv

    parser = build_parser()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as recipe:
        recipe.write(printed_recipe)
        recipe.flush()
        return HNConfig.unchecked(parser.parse_known_args(recipe_argv(recipe.name, parser))[0])


def _caption_parser_problem(config: HNConfig) -> str | None:
    """Why the hard-negative run could not parse its captions here (NLTK data missing or
    damaged), or None: found before the data is rendered and two runs trained, not when the
    third starts."""
    from .hooks import check_caption_parser

    if not config.parses_captions:
        return None
    try:
        check_caption_parser()
    except ValueError as err:
        return str(err)
    return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m open_clip_hn.demo",
        description="Offline demo: vanilla OpenCLIP vs the hard-negative recipe on rendered "
                    "scenes, continuing the same pretrained tiny CLIP.")
    add = parser.add_argument
    add("--output-dir", default="demo", help="Where data, runs and results go. Default: demo.")
    add("--samples", type=positive_int, default=20000, help="Training scenes. Default: 20000.")
    add("--test-items", type=positive_int, default=1000, help="Items per test set. Default: 1000.")
    add("--pretrain-epochs", type=positive_int, default=1, help="Vanilla pretraining epochs. Default: 1.")
    add("--pretrain-batch-size", type=positive_int, default=128, help="Default: 128.")
    add("--lr", type=positive_float, default=2e-3, help="Pretraining learning rate. Default: 2e-3.")
    add("--epochs", type=positive_int, default=3,
        help="Epochs of each continued run (vanilla and hard negatives). Default: 3.")
    add("--batch-size", type=positive_int, default=64,
        help="Batch size of both continued runs. Default: 64.")
    add("--continue-lr", type=positive_float, default=1e-3,
        help="Learning rate of both continued runs. Default: 1e-3.")
    add("--device", default="cpu", choices=("cpu", "cuda"), help="Default: cpu (fp32).")
    add("--workers", type=non_negative_int, default=1, help="Loader workers per run. Default: 1.")
    add("--seed", type=int, default=0, help="Default: 0.")
    add("--model-config", default=MODEL_CONFIG, metavar="PATH.json",
        help="OpenCLIP model config of the tiny CLIP (its file name is the model name). "
             "Default: the package's hn-tiny-rn.json; hn-tiny-vit.json is the tests' tiny ViT.")
    add("--hn-config", default=RECOMMENDED, metavar="NAME|PATH.yaml",
        help="Recipe of the hard-negative run: a shipped name (--hn-list-configs of "
             "open_clip_hn.train) or a YAML file. Default: recommended.")
    add("--hn-args", default="", metavar="'--hn-... ...'",
        help="Extra --hn-* flags for the hard-negative run (override the recipe), and "
             "--train-data for shards with precomputed negatives; OpenCLIP's other flags are "
             "the demo's own, the same for both runs.")
    args = parser.parse_args(argv)
    try:
        args.hn_config = resolve_recipe(args.hn_config)
    except FileNotFoundError as err:
        parser.error(f"--hn-config: {err}")
    try:
        read_model_config(args.model_config)
    except ValueError as err:
        parser.error(f"{err} (such as {MODEL_CONFIG})")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is visible to torch here (OpenCLIP would "
                         "fall back to the CPU with amp); use --device cpu")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        parser.error(f"--output-dir {args.output_dir} is a file; pass a folder (made when missing)")
    try:
        hn_tokens = shlex.split(args.hn_args)
    except ValueError as err:
        parser.error(f"--hn-args {args.hn_args!r}: {err}")
    args.hn_args = " ".join(shlex.quote(token) for token in hn_tokens)
    foreign = [t for t in hn_tokens if t.startswith("--") and not t.startswith("--hn-")
               and t.split("=", 1)[0] != "--train-data"]
    if foreign:
        parser.error(f"--hn-args {args.hn_args!r}: {foreign[0]} is not a --hn-* flag; the demo "
                     "gives both continued runs the same OpenCLIP flags (set them with the demo's "
                     "own --epochs, --batch-size, --continue-lr, ...), and --hn-args takes --hn-* "
                     "flags and --train-data (shards with precomputed negatives)")
    problem = check_run_flags(args)
    if problem:
        parser.error(problem)
    low, high = expected_seconds(args.samples, args.test_items, args.pretrain_epochs, args.epochs)
    print(f"[demo] expected time from scratch: about {_duration(low)} to {_duration(high)} on 2 CPU "
          f"cores{' (a GPU is faster)' if args.device == 'cuda' else ''}; stages already done in "
          f"{args.output_dir} are reused")
    start = time.time()
    out = os.path.abspath(args.output_dir)
    logs = os.path.join(out, "runs")
    data = prepare_data(os.path.join(out, "data"), args.samples, args.test_items, seed=args.seed)
    common = dict(data=data, logs=logs, device=args.device, workers=args.workers, seed=args.seed,
                  model_config=os.path.abspath(args.model_config))
    pretrain_steps = max(1, args.samples // args.pretrain_batch_size)
    pretrained = run_training(train_argv(name="pretrain", epochs=args.pretrain_epochs, lr=args.lr,
                                         batch_size=args.pretrain_batch_size,
                                         warmup=min(100, pretrain_steps), **common),
                              logs, "pretrain", args.pretrain_epochs)
    steps_per_epoch = max(1, args.samples // args.batch_size)
    cont = dict(epochs=args.epochs, lr=args.continue_lr, warmup=steps_per_epoch // 10,
                batch_size=args.batch_size, pretrained=pretrained, **common)
    vanilla = run_training(train_argv(name="vanilla", **cont), logs, "vanilla", args.epochs)
    hn_extra = ["--hn-config", args.hn_config, *shlex.split(args.hn_args)]
    hn = run_training(train_argv(name="hard-negatives", extra=hn_extra, **cont), logs,
                      "hard-negatives", args.epochs)
    results = evaluate_checkpoints(
        {"pretrained": pretrained, "vanilla": vanilla, "hard-negatives": hn},
        {"demo sets (val)": data.val, "unseen sets (test)": data.test}, args.device,
        model_config=common["model_config"])
    labels = list(results)
    document = {"settings": {**vars(args), "data": asdict(data)}, "benchmarks": {}}
    for bench in results[labels[0]]:
        runs = [results[label][bench] for label in labels]
        print(f"\n== {bench} ==  (percent; Δ vs pretrained)")
        print(hn_eval.format_table(labels, runs))
        document["benchmarks"][bench] = {
            **hn_eval.report(labels, runs),
            "targets": summary(results["vanilla"][bench], results["hard-negatives"][bench])}
        print("targets:", ", ".join(f"{k} {v:+.3f}" for k, v in
                                    document["benchmarks"][bench]["targets"].items()))
    results_path = os.path.join(out, "results.json")
    plot_path = os.path.join(out, "compare.png")
    atomic_write_json(results_path, document, indent=2)
    demo_bench = next(iter(results[labels[0]]))
    hn_eval.plot_results(plot_path, labels[1:], [results[label][demo_bench] for label in labels[1:]],
                         title="Continuing the same tiny CLIP: vanilla vs hard negatives")
    print(f"\ndone in {time.time() - start:.0f}s\n  table/JSON: {results_path}\n  plot: {plot_path}"
          f"\n  runs and logs: {logs}")
    return document


if __name__ == "__main__":
    main()

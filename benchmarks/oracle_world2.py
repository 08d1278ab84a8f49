"""An upper bound for text negatives on world2: the recipe trained on the world's own negatives.

world2 knows each training caption's scene, so it can write the negatives its test sets are made
of (`world2.negative_caption`: the related pair's colours, sizes or shapes exchanged, or a shape
replaced) exactly, with no parsing, no plausibility filter and nothing that only reorders phrases.
This script writes the world2 training shards of `recipe_worlds.py` again with those negatives as
`neg.json` members (K 4 per caption: colour swap, size swap, shape swap, shape replacement, each
where the scene allows it) and continues the same pretrained checkpoint with `recommended.yaml`
reading them (`--hn-negatives precomputed`), under issue 21's protocol.

Pass the same protocol flags (`--samples`, `--test-items`, `--epochs`, ...) as the
`recipe_worlds.py` run whose folder this uses: with others, world2 is rendered again and the
pretrained and vanilla runs are trained again.

If the recipe with these negatives still leaves a setting's swap errors above 0.7x vanilla's,
better text negatives cannot meet issue 21's swap targets there: the limit is on the image side.

    python benchmarks/recipe_worlds.py --output-dir recipe-worlds --settings 'world2/vit' \
        --variants 'vanilla;recommended.yaml'
    python benchmarks/oracle_world2.py --output-dir recipe-worlds --tower vit
"""

from __future__ import annotations

import argparse
import io
import json
import importlib.util
import os
import random
import tarfile

from open_clip_hn import demo, world2
from open_clip_hn.files import atomic_open, atomic_write_json, content_identity, expand_shards
from open_clip_hn.negatives.manifest import input_stamp, record_shard, shard_done
from open_clip_hn.negatives.shards import negatives_member, split_key
from open_clip_hn.scenes import shards_spec

# recipe_worlds.py by its path: benchmarks/ is not a package, and putting it on sys.path would
# let its scripts (neighbors.py, negatives.py, ...) hide modules of those names
_SPEC = importlib.util.spec_from_file_location(
    "recipe_worlds", os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipe_worlds.py"))
recipe_worlds = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(recipe_worlds)

# (type, attribute the pair trades) for the swaps; a replacement comes from world2's own sets' code
ORACLE_SWAPS = (("swap_attributes", "colour"), ("swap_attributes", "size"), ("swap_objects", "shape"))


def oracle_negatives(scene: world2.World2Scene, rng: random.Random) -> list[dict[str, str]]:
    """The scene's test-style negatives: each swap the scene allows (both attributes, where
    `negative_caption` picks one at random) and one replaced shape."""
    s, r = scene.subject, scene.reference
    out = [{"text": world2.exchange(scene, attribute).caption, "type": kind}
           for kind, attribute in ORACLE_SWAPS if getattr(s, attribute) != getattr(r, attribute)]
    out.append({"text": world2.negative_caption(scene, "replace_object", rng), "type": "replace_object"})
    return out


def write_oracle_shards(train_spec: str, output_dir: str, seed: int = 0) -> str:
    """Copy world2's training shards with oracle `neg.json` members; returns the --train-data."""
    shards = expand_shards(train_spec)
    os.makedirs(output_dir, exist_ok=True)
    written = []
    for source in shards:
        destination = os.path.join(output_dir, os.path.basename(source))
        written.append(destination)
        identity = content_identity(source)
        if shard_done(output_dir, source, identity):
            continue  # written from this very shard (precompute's manifest): new data is redone
        stamp, samples = input_stamp(source), 0
        with tarfile.open(source) as reader, atomic_open(destination, "wb") as handle, \
                tarfile.open(fileobj=handle, mode="w", format=tarfile.GNU_FORMAT) as writer:
            for member in reader:
                payload = reader.extractfile(member).read()
                writer.addfile(member, io.BytesIO(payload))
                key, extension = split_key(member.name)
                if extension != "txt":
                    continue
                index = int(key)
                scene = world2.sample_scene(world2._rng(seed, "train", "sample", index), "train")
                if scene.caption != payload.decode("utf-8"):
                    raise RuntimeError(f"{source}: {member.name} is not world2 sample {index} of "
                                       f"seed {seed}; render the data again")
                negatives = oracle_negatives(scene, random.Random(f"oracle/{index}"))
                info, data = negatives_member(key, negatives, member)
                writer.addfile(info, io.BytesIO(data))
                samples += 1
        # none masked: every scene has a shape left to replace one of its pair with
        record_shard(output_dir, source, identity, samples, 0, None, stamp)
        print(f"wrote {destination}", flush=True)
    with open(os.path.join(os.path.dirname(shards[0]), "sizes.json")) as handle:
        atomic_write_json(os.path.join(output_dir, "sizes.json"), json.load(handle), indent=1)
    return shards_spec(written)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--output-dir", default="recipe-worlds", help="recipe_worlds.py's output folder.")
    towers = [tower for world, tower in recipe_worlds.MODEL_CONFIGS if world == "world2"]
    add("--tower", default="vit", choices=towers, help="Image tower. Default: vit.")
    add("--scores-file", default="scores-oracle.json",
        help="Where the runs' scores are recorded in the output folder (recipe_worlds.py "
             "--only-table merges every scores*.json there): a run recorded under the same command "
             "line, recipe, checkpoint and data is not evaluated again. Default: scores-oracle.json.")
    recipe_worlds.add_protocol_arguments(parser)
    add("--recipe-flags", default="", metavar="FLAGS",
        help="Plugin flags added after recommended.yaml in the oracle run (space-separated, e.g. "
             "'--hn-choice-weight 6'); the run's name carries them. Default: none.")
    args = parser.parse_args()
    flags = args.recipe_flags.split()
    oracle_variant = "recommended.yaml, oracle negatives" + "".join(f" {f}" for f in flags)
    oracle_name = "recommended-yaml-oracle-negatives" + "".join(
        c if c.isalnum() else "-" for c in "".join(f" {f}" for f in flags))

    out = os.path.abspath(args.output_dir)
    data = recipe_worlds.prepare_world2(os.path.join(out, "data-world2"), args.samples, args.test_items)
    oracle = demo.DemoData(write_oracle_shards(data.train, os.path.join(out, "oracle-world2")),
                           data.val, data.test)
    model_config = os.path.join(recipe_worlds.CONFIGS,
                                recipe_worlds.MODEL_CONFIGS[("world2", args.tower)])
    setting, logs = recipe_worlds.setting_folder(out, "world2", args.tower, args.seed)
    pretrained = recipe_worlds.pretrain(args, data, logs, model_config)
    results = {}
    for variant, name, run_data, extra in (
            ("vanilla", "vanilla", data, []),
            (oracle_variant, oracle_name, oracle,
             ["--hn-config", recipe_worlds.RECOMMENDED, "--hn-negatives", "precomputed",
              "--hn-vocabulary", "none", "--hn-plausibility", "none", *flags])):
        argv = recipe_worlds.continued_argv(args, run_data, logs, model_config, name, pretrained, extra)
        results[variant] = recipe_worlds.scored_run(args, os.path.join(out, args.scores_file),
                                                    setting, variant, name, argv, logs,
                                                    data.test, model_config)
    comparison = recipe_worlds.against_vanilla(results[oracle_variant], results["vanilla"])
    print(json.dumps({"metrics": results, "against_vanilla": comparison}, indent=2))


if __name__ == "__main__":
    main()

"""Can a world's text negatives be told from their captions without the image? `negatives audit`.

world2 (open_clip_hn/world2.py) names its bystanders without a size ("..., beside a pink hexagon")
and always gives the related pair a size; a swap that trades a phrase or an attribute group with a
bystander writes a caption no positive has ("..., beside a tiny cyan hexagon"), which a text-only
reader rejects. The demo's two-object captions (scenes.py) have no such slot. This prints the
audit's blind accuracies (0.50: no shortcut) for the recipe's types, unfiltered and with the
plausibility filter, on held-out captions of the world, with the filter's model and both readers
learning from other captions of the same world.

    python benchmarks/audit_worlds.py --world world2 --output-dir audit-world2
    python benchmarks/audit_worlds.py --world demo --output-dir audit-demo
"""

from __future__ import annotations

import argparse
import os
import random

from open_clip_hn import scenes, world2
from open_clip_hn.files import atomic_open
from open_clip_hn.negatives.cli import main as negatives_main


WORLDS = {"demo": scenes.sample_scene, "world2": world2.sample_scene}


def write_captions(path: str, world: str, count: int, first_index: int) -> None:
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(WORLDS[world](random.Random(first_index + i)).caption
                               for i in range(count)) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=sorted(WORLDS), default="world2",
                        help="Whose captions: the demo's (scenes.py) or world2's. Default: world2.")
    parser.add_argument("--output-dir", default="audit-world", help="Captions and the audit's JSON.")
    parser.add_argument("--captions", type=int, default=6000, help="Audited captions. Default: 6000.")
    parser.add_argument("--reference", type=int, default=20000,
                        help="Other captions the filter and the readers learn from. Default: 20000.")
    parser.add_argument("--types", default="replace_object,swap_objects,swap_attributes",
                        help="Audited types. Default: recommended.yaml's.")
    parser.add_argument("--num", type=int, default=4, help="Negatives per caption. Default: 4.")
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    audited, reference = (os.path.join(args.output_dir, n) for n in ("captions.txt", "reference.txt"))
    words = os.path.join(args.output_dir, "words.txt")
    write_captions(audited, args.world, args.captions, 0)
    write_captions(reference, args.world, args.reference, 10 * (args.captions + args.reference))
    common = ["--reference", reference, "--types", args.types, "--num", str(args.num)]
    if negatives_main(["vocabulary", "--input", reference, "--output", words]) != 0:
        raise SystemExit(1)
    # vocabulary: like the recipe's train-data, replacements stay inside the world's own words
    raise SystemExit(negatives_main(["audit", audited, *common, "--vocabulary", words,
                                     "--plausibility", reference, "--output",
                                     os.path.join(args.output_dir, "audit.json")]))


if __name__ == "__main__":
    main()

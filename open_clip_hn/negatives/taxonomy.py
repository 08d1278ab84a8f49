"""The typed hard-negative taxonomy (SugarCrepe-like), shared by the generator, data and losses."""

NEGATIVE_TYPES: tuple[str, ...] = (
    "swap_attributes",
    "swap_objects",
    "replace_attribute",
    "replace_object",
    "replace_relation",
    "replace_count",
    "add_attribute",
    "add_object",
    "shuffle_order",
)

TYPE_TO_ID: dict[str, int] = {name: i for i, name in enumerate(NEGATIVE_TYPES)}
# the types whose new word a masked LM (--hn-lm, --lm) proposes
LM_TYPES: tuple[str, ...] = ("replace_object", "replace_attribute")
# the generator's rules: raised with every change that alters some caption's negatives, so a
# precompute resumed into a folder written under other rules is refused (2: only the articles
# an edit touches change; web addresses mask a caption; 3: no trade of counts that say the same,
# none across a symmetric relation of the subject, no doubled word, plural nouns after a
# preposition, no "without" after a participle, no
# posture change for things, "-es" plurals of s/x/z/ch/sh/o stems only, no person made a group
# or given a gender its pronouns contradict, no age on a noun that says it, no up/down along a
# street; tests/
# test_negatives.py pins the output of each revision)
RULES_REVISION = 3
# the types whose negatives may only reorder the caption's noun phrases (--hn-swap-reorders)
SWAP_TYPES: tuple[str, ...] = ("swap_objects", "swap_attributes")


def parse_types(spec: str | None) -> tuple[str, ...]:
    """Parse a comma list of type names ('all', or None, means every type); unknown names raise,
    and so does an empty list (what an unset shell variable gives: it is not read as "all")."""
    if spec is None or spec.strip() == "all":
        return NEGATIVE_TYPES
    names = tuple(dict.fromkeys(s.strip() for s in spec.split(",") if s.strip()))
    if not names:
        raise ValueError(f"no negative type in {spec!r} (an unset shell variable?); name types, "
                         f"or all: {', '.join(NEGATIVE_TYPES)}")
    unknown = [n for n in names if n not in TYPE_TO_ID]
    if unknown:
        raise ValueError(
            f"unknown negative type(s) {', '.join(unknown)}; valid types: {', '.join(NEGATIVE_TYPES)}"
        )
    return names

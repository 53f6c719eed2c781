"""The 40 prompt templates of FastComposer's evaluation, in four categories of ten.

`{}` stands for the subject's class word ("man", "woman", ...). Written here in our own
wording, following the categories and the kind of edit each one tests: accessories and
outfits (recontextualise the person's look), artistic styles (the identity must survive
a change of medium), actions (pose and interaction) and contexts (background/scene).
"""
from __future__ import annotations

from dataclasses import dataclass

CATEGORIES: dict[str, tuple[str, ...]] = {
    "accessory": (
        "a {} wearing a red hat",
        "a {} wearing a santa hat",
        "a {} wearing a rainbow scarf",
        "a {} wearing a black top hat and a monocle",
        "a {} dressed as a chef",
        "a {} dressed as a firefighter",
        "a {} dressed as a police officer",
        "a {} wearing pink glasses",
        "a {} wearing a yellow shirt",
        "a {} dressed as a purple wizard",
    ),
    "style": (
        "a painting of a {} in the style of Banksy",
        "a painting of a {} in the style of Vincent van Gogh",
        "a colorful graffiti painting of a {}",
        "a watercolor painting of a {}",
        "a Greek marble sculpture of a {}",
        "a street art mural of a {}",
        "a black and white photograph of a {}",
        "a pointillism painting of a {}",
        "a Japanese woodblock print of a {}",
        "a chalk drawing of a {} on a street pavement",
    ),
    "action": (
        "a {} riding a horse",
        "a {} holding a glass of wine",
        "a {} holding a piece of cake",
        "a {} giving a lecture",
        "a {} reading a book",
        "a {} gardening in the backyard",
        "a {} cooking a meal",
        "a {} working out at the gym",
        "a {} walking a dog",
        "a {} baking cookies",
    ),
    "context": (
        "a {} on the beach",
        "a {} in the snow",
        "a {} on a cobblestone street",
        "a {} on top of a mountain",
        "a {} in a jungle",
        "a {} in an office",
        "a {} at a train station",
        "a {} in front of the Eiffel Tower",
        "a {} in a library",
        "a {} in a field of sunflowers",
    ),
}


# Expression editing (PortraitBooth's ECAC claim), not in FastComposer's 40: chosen with
# --prompts expression. The CLIP expression coefficient reads the emotion word.
EXPRESSION_CATEGORY: dict[str, tuple[str, ...]] = {
    "expression": (
        "a {} smiling",
        "a {} laughing",
        "a {} looking angry",
        "a {} looking sad",
        "a {} looking surprised",
        "a {} looking disgusted",
        "a {} looking scared",
        "a {} crying",
        "a {} with a neutral expression",
        "a {} grinning",
    ),
}

# Two subjects per image: 21 prompts (FastComposer's multi-subject protocol uses 21), in
# three categories of seven, written for two people. `{}` becomes "man and a woman".
MULTI_CATEGORIES: dict[str, tuple[str, ...]] = {
    "action": (
        "a {} shaking hands",
        "a {} riding bicycles together",
        "a {} playing chess",
        "a {} cooking a meal together",
        "a {} dancing",
        "a {} sitting on a bench and talking",
        "a {} hiking up a hill",
    ),
    "context": (
        "a {} on the beach",
        "a {} in the snow",
        "a {} in an office",
        "a {} at a train station",
        "a {} in front of the Eiffel Tower",
        "a {} in a library",
        "a {} in a field of sunflowers",
    ),
    "style": (
        "a painting of a {} in the style of Vincent van Gogh",
        "a watercolor painting of a {}",
        "a black and white photograph of a {}",
        "a street art mural of a {}",
        "a Japanese woodblock print of a {}",
        "a pencil sketch of a {}",
        "an oil portrait of a {} in a gilded frame",
    ),
}


@dataclass(frozen=True)
class Prompt:
    category: str
    number: int  # 0..9 within its category
    template: str

    @property
    def id(self) -> str:
        return f"{self.category}{self.number:02d}"

    def single(self, class_word: str) -> str:
        return self.template.format(class_word)

    def multi(self, class_words: list[str]) -> str:
        """'a man and a woman riding a horse': one class word per subject, in subject order,
        which is how the two-subject workflow's global prompt assigns regions."""
        return self.template.format(" and a ".join(class_words))


def select_prompts(categories: list[str] | None = None, per_category: int | None = None,
                   multi: bool = False) -> list[Prompt]:
    """The prompts of these categories (all of the set by default), the first `per_category` of
    each; `multi`: the two-subject set. A category the set lacks is skipped when others match."""
    table = MULTI_CATEGORIES if multi else {**CATEGORIES, **EXPRESSION_CATEGORY}
    names = categories or list(MULTI_CATEGORIES if multi else CATEGORIES)
    known = set(CATEGORIES) | set(MULTI_CATEGORIES) | set(EXPRESSION_CATEGORY)
    unknown = [c for c in names if c not in known]
    if unknown:
        raise ValueError(f"unknown prompt categories {unknown}; choose from {sorted(known)}")
    if per_category is not None and per_category < 1:
        raise ValueError(f"--per-category must be 1 or more, got {per_category}")
    out = []
    for name in names:
        for i, template in enumerate(table.get(name, ())[:per_category]):
            out.append(Prompt(name, i, template))
    if not out:
        raise ValueError(f"none of the categories {names} has {'two-subject' if multi else 'single-subject'} "
                         f"prompts; that set has {list(table)}")
    return out

"""What every world shares: the `World` contract, paraphrase templates, the compositional split,
prompt files, and the seeded draws of the captioned samplers.

A world (`lightning_grpo.worlds.shapes`, `lightning_grpo.worlds.moving_shapes`) is a small
synthetic domain in which each scene is a tuple of attribute values (colour, shape, position or
direction), written in paraphrase templates, drawn by a vectorised renderer and read back from
pixels by a verifier reward. The pieces that do not depend on what the attributes mean live here,
once; a world supplies its vocabulary, its templates' fields, its renderer and its verifier.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, make_dataclass
from pathlib import Path
from itertools import product
from typing import Any, ClassVar, Literal, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor

Scene = TypeVar("Scene")
Phrasing = Literal["train", "heldout"]
#: The held-out evaluation splits, in report order: held-out combinations in training phrasings,
#: training combinations in reserved phrasings, held-out combinations in reserved phrasings.
HELDOUT_SPLITS: tuple[str, ...] = ("new_combinations", "new_phrasings", "both")
#: A combination of attribute indices (a, b, c) is held out iff (a + b + c) % SPLIT_MODULUS == 0.
SPLIT_MODULUS = 3


class PromptParseError(ValueError):
    """A prompt does not name exactly one value of each attribute; the message names it."""


@runtime_checkable
class World(Protocol):
    """The contract of a world, what GRPO's demos, pretraining scripts and tests rely on.

    Attributes:
        name: the world's name ("shapes", "moving_shapes").
        phrasebook: its paraphrase templates (training and reserved held-out ones).
        split: its compositional train / held-out split of attribute combinations.
    """

    name: str
    phrasebook: Phrasebook
    split: CompositionalSplit

    def vocabulary(self) -> list[str]:
        """Every word its prompts (and its parser's synonyms) use: what a toy tokenizer needs."""

    def parse(self, prompt: str) -> Any:
        """The scene a prompt names (any phrasing); `PromptParseError` naming the prompt otherwise."""

    def render(self, scenes: Sequence[Any], size: int = 32, seed: int | None = 0) -> Tensor:
        """Pixels of `scenes` in [0, 1]: images [N, 3, H, W] or clips [N, F, 3, H, W]."""

    def verifier(self, **options: Any) -> Any:
        """The world's pixel verifier reward (a `lightning_grpo.rewards.Reward`) with `options`."""


class SceneRecord:
    """Base of a world's scene record: a frozen, ordered dataclass whose fields are its attributes,
    by name (so scenes can be set members, dict keys and sorted deterministically).

    `VALUES` maps each field, in field order, to its allowed values in index order; the record
    checks its values, and converts to and from attribute indices (what tensors carry).
    """

    VALUES: ClassVar[dict[str, tuple[str, ...]]]

    def __post_init__(self) -> None:
        for name, allowed in self.VALUES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; expected one of {list(allowed)}")

    @property
    def indices(self) -> tuple[int, ...]:
        """The attribute indices, in field order."""
        return tuple(allowed.index(getattr(self, name)) for name, allowed in self.VALUES.items())

    @classmethod
    def from_indices(cls, *indices: int):
        """The scene with the given attribute indices."""
        return cls(*(allowed[i] for allowed, i in zip(cls.VALUES.values(), indices)))

    @classmethod
    def every(cls) -> list:
        """Every combination, in index order (the last attribute varies fastest)."""
        return [cls(*values) for values in product(*cls.VALUES.values())]


def scene_record(name: str, module: str, doc: str, **values: tuple[str, ...]) -> type:
    """A world's scene record class: a frozen, ordered dataclass `name` (defined in `module`) with
    one string field per keyword, in order, each taking the given values (a `SceneRecord`)."""
    record = make_dataclass(name, [(field, str) for field in values], bases=(SceneRecord,), frozen=True, order=True,
                            namespace={"VALUES": dict(values), "__doc__": doc})
    record.__module__ = module
    return record


def scene_indices(scenes: Sequence[SceneRecord], device: torch.device | str | None = None) -> Tensor:
    """Attribute indices of `scenes` as LongTensor[N, A] (one column per attribute, 3 in both worlds)."""
    return torch.tensor([s.indices for s in scenes], dtype=torch.long, device=device).reshape(-1, 3)


def one_value(prompt: str, kind: str, found: set[str], choices: Sequence[str]) -> str:
    """The single value of one attribute found in `prompt`, or a PromptParseError naming the prompt."""
    if len(found) == 1:
        return next(iter(found))
    problem = "no" if not found else f"conflicting {sorted(found)} for the"
    raise PromptParseError(f"cannot parse prompt {prompt!r}: {problem} {kind} (expected one of {list(choices)})")


@dataclass(frozen=True)
class Phrasebook:
    """A world's paraphrase templates: `train` (the only phrasings training uses, index 0 the
    canonical one) and `heldout` (reserved phrasings no training sees, made of the same words).

    Attributes:
        fields: scene -> the template fields that write it (e.g. {"colour": "red", ...}).
        kind: how error messages name the templates ("", "motion ").
    """

    train: tuple[str, ...]
    heldout: tuple[str, ...]
    fields: Callable[[Any], dict[str, str]]
    kind: str = ""

    def templates_of(self, phrasing: Phrasing) -> tuple[str, ...]:
        """`train` for "train", `heldout` for "heldout"; a ValueError names anything else."""
        if phrasing == "train":
            return self.train
        if phrasing == "heldout":
            return self.heldout
        raise ValueError(f"phrasing must be 'train' or 'heldout', got {phrasing!r}")

    def describe(self, scene: Any, template: int = 0, phrasing: Phrasing = "train") -> str:
        """The prompt for `scene` written with template `template` of `templates_of(phrasing)`."""
        templates = self.templates_of(phrasing)
        if not 0 <= template < len(templates):
            raise IndexError(f"template {template} out of range; there are {len(templates)} {phrasing} {self.kind}templates")
        return templates[template].format(**self.fields(scene))

    def prompts_for(self, scenes: Sequence[Any], templates: Sequence[int] | None = None, phrasing: Phrasing = "train") -> list[str]:
        """Every scene written with every chosen template of `phrasing` (default: all), scene-major order."""
        chosen = range(len(self.templates_of(phrasing))) if templates is None else templates
        return [self.describe(scene, t, phrasing) for scene in scenes for t in chosen]


@dataclass(frozen=True)
class CompositionalSplit:
    """The train / held-out split of a world's attribute combinations (compositional generalisation).

    A combination of attribute indices is held out iff their sum % `SPLIT_MODULUS` == 0. With
    4 × 3 × 4 values that holds out 16 of 48 combinations; since the middle attribute takes each
    residue mod 3 once, every single value and every pair of values is still trained, and only the
    held-out triples are new.

    Attributes:
        scenes: () -> every combination as scene records with an `indices` tuple, in index order.
    """

    scenes: Callable[[], list]

    @staticmethod
    def is_heldout(scene: Any) -> bool:
        """Whether the scene's combination is held out of RL training."""
        return sum(scene.indices) % SPLIT_MODULUS == 0

    def train_scenes(self) -> list:
        """The combinations RL training may use, in index order."""
        return [s for s in self.scenes() if not self.is_heldout(s)]

    def heldout_scenes(self) -> list:
        """The combinations reserved for evaluation, in index order."""
        return [s for s in self.scenes() if self.is_heldout(s)]

    def split_prompts(self, phrasebook: Phrasebook, split: str, templates: Sequence[int] | None = None) -> list[str]:
        """The prompts of one held-out split (`HELDOUT_SPLITS`); `templates` selects the training
        templates of "new_combinations". A ValueError names an unknown split."""
        if split == "new_combinations":
            return phrasebook.prompts_for(self.heldout_scenes(), templates)
        if split == "new_phrasings":
            return phrasebook.prompts_for(self.train_scenes(), phrasing="heldout")
        if split == "both":
            return phrasebook.prompts_for(self.heldout_scenes(), phrasing="heldout")
        raise ValueError(f"unknown held-out split {split!r}; expected one of {list(HELDOUT_SPLITS)}")

    def prompt_sets(self, phrasebook: Phrasebook, templates: Sequence[int] | None = None) -> dict[str, list[str]]:
        """"train" (training combinations in training templates) and every held-out split -> prompts."""
        sets = {"train": phrasebook.prompts_for(self.train_scenes(), templates)}
        return sets | {split: self.split_prompts(phrasebook, split, templates) for split in HELDOUT_SPLITS}


def write_prompt_files(directory: str | Path, prompts: dict[str, list[str]], names: dict[str, str]) -> dict[str, Path]:
    """Write each set of `prompts`, one prompt a line, into `directory` under `names[key]`; returns
    their paths keyed like `prompts`. Plain text files are what the prompt datamodule and
    `HeldOutEvaluation` read, so a recipe can point at them."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, lines in prompts.items():
        paths[key] = out / names[key]
        paths[key].write_text("\n".join(lines) + "\n")
    return paths


# ----------------------------------------------------------------------------- seeded draws
def jitter_generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator:
    """The generator to draw jitter from: the given one, else a CPU one seeded with `seed` (0 if None)."""
    if generator is not None:
        return generator
    return torch.Generator().manual_seed(0 if seed is None else int(seed))


T = TypeVar("T")


def draw_captions(
    n: int, scenes: Sequence[T], num_templates: int, templates: Sequence[int] | None, generator: torch.Generator
) -> tuple[list[T], list[int]]:
    """`n` scenes drawn uniformly from `scenes` and, for each, a template index drawn uniformly from
    `templates` (default: all `num_templates`), in that order from `generator`; shared by the image
    and the moving-shapes worlds' captioned samplers."""
    pool = list(scenes)
    chosen = list(range(num_templates) if templates is None else templates)
    if not pool or not chosen:
        raise ValueError("a captioned sampler needs a non-empty scene pool and template list")
    scene_ids = torch.randint(len(pool), (n,), generator=generator).tolist()
    template_ids = torch.randint(len(chosen), (n,), generator=generator).tolist()
    return [pool[i] for i in scene_ids], [chosen[t] for t in template_ids]


def caption_noise_rates(noise: float | Sequence[float], attributes: int) -> Tensor:
    """Per-attribute replacement probabilities Tensor[attributes] from one rate or one per attribute;
    a ValueError names a rate outside [0, 1] or a list of the wrong length."""
    rates = [noise] * attributes if isinstance(noise, (int, float)) else list(noise)
    if len(rates) != attributes:
        raise ValueError(f"caption noise (caption_noise) needs one rate or {attributes} (one per attribute), got {noise!r}")
    if not all(0 <= r <= 1 for r in rates):
        raise ValueError(f"caption noise (caption_noise) must be in [0, 1], got {noise!r}")
    return torch.tensor(rates, dtype=torch.float32)


def noisy_descriptions(
    prompts: Sequence[str],
    noise: float | Sequence[float],
    seed: int,
    parse: Callable[[str], Any],
    sizes: Sequence[int],
    num_templates: int,
    redescribe: Callable[[tuple[int, ...], int], str],
) -> list[str]:
    """Re-describe each prompt's scene with each attribute replaced by a uniformly drawn value w.p.
    `noise`, in a random template: the noisy-caption pretraining of both worlds (image and motion).

    Args:
        prompts: captions to perturb; `parse(prompt).indices` gives their attribute indices.
        noise: replacement probability of every attribute, in [0, 1], or one per attribute (in
            `sizes` order: a world whose model should be taught one attribute cleanly).
        seed: one seed fixes every draw (same seed, same captions).
        sizes: number of values of each attribute (e.g. colours, shapes, positions).
        num_templates: training templates to draw from.
        redescribe: (attribute indices, template) -> caption.
    """
    rates = caption_noise_rates(noise, len(sizes))
    generator = torch.Generator().manual_seed(seed)
    out = []
    for prompt in prompts:
        scene = parse(prompt)
        replace = (torch.rand(len(sizes), generator=generator) < rates).tolist()  # the same draws for any rates
        drawn = [int(torch.randint(k, (1,), generator=generator)) for k in sizes]
        indices = tuple(d if r else i for i, d, r in zip(scene.indices, drawn, replace))
        template = int(torch.randint(num_templates, (1,), generator=generator))
        out.append(redescribe(indices, template))
    return out


def sample_captioned(
    n: int, scenes: Sequence[T], phrasebook: Phrasebook, seed: int, templates: Sequence[int] | None,
    render: Callable[[list[T], torch.Generator], Tensor],
) -> tuple[Tensor, list[str]]:
    """`n` random (pixels, caption) pairs: scenes and training templates drawn uniformly, then the
    scenes rendered with jitter from the same generator (one seed fixes everything), so one caption
    maps to many slightly different images or clips; what each world's captioned sampler does."""
    generator = torch.Generator().manual_seed(int(seed))
    picked, chosen = draw_captions(n, scenes, len(phrasebook.train), templates, generator)
    prompts = [phrasebook.describe(scene, t) for scene, t in zip(picked, chosen)]
    return render(picked, generator), prompts


@dataclass(frozen=True)
class SyntheticWorld:
    """A `World` assembled from its parts: what both shipped worlds are (`WORLD` in
    `lightning_grpo.worlds.shapes` and in `lightning_grpo.worlds.moving_shapes`).

    Attributes:
        name, phrasebook, split: as in `World`.
        words: () -> the vocabulary.
        parser: prompt -> scene.
        renderer: (scenes, size=, seed=) -> pixels.
        reward: the verifier class, called with the options of `verifier`.
    """

    name: str
    phrasebook: Phrasebook
    split: CompositionalSplit
    words: Callable[[], list[str]]
    parser: Callable[[str], Any]
    renderer: Callable[..., Tensor]
    reward: Callable[..., Any]

    def vocabulary(self) -> list[str]:
        return self.words()

    def parse(self, prompt: str) -> Any:
        return self.parser(prompt)

    def render(self, scenes: Sequence[Any], size: int = 32, seed: int | None = 0) -> Tensor:
        return self.renderer(list(scenes), size=size, seed=seed)

    def verifier(self, **options: Any) -> Any:
        return self.reward(**options)


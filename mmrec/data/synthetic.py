"""Synthetic multi-domain mixture-of-modality (MoM) catalogs: the project's built-in demo data.

The data is made so that transfer learning has something real to transfer. Several domains (by
default ``books`` and ``music`` as sources, ``films`` as the target) share NO users and NO items,
but they share a latent structure that is visible ONLY through item content:

Latent categories
    ``K`` categories (``n_categories``). Category ``c`` has a visual signature (a shape from
    ``SHAPES`` drawn in a dominant colour from ``category_colour(c)``) and a text vocabulary
    (``category_words(c)``: themed words such as *ocean, tide, coral*). Both are the same in every
    domain. Each item also has a secondary *style* (``n_styles``): a fill texture in its image
    (plain, dots, stripes, ...) and style words in its text (*vintage, retro*, ...). Styles are
    drawn independently of everything else, so they are content a model must learn to ignore.

Domain surface
    Each domain has its own look: a surface vocabulary (nouns such as *novel*, *album*, *film* and
    filler words) and an image background (paper grain, dark gradient, film strip, ...). Domains
    therefore look different while the category signal is the same.

Items
    ``n_items`` per domain, spread evenly over the categories (every category has items in every
    domain). Each item is text-only, image-only or both with the domain's probabilities
    (``p_text_only``, ``p_image_only``, the rest both); the counts are allocated exactly (largest
    remainder) and shuffled. Text: a short title and a one-sentence description mixing category,
    style and domain words (with probability ``text_noise`` the description also carries a word of
    another category). Image: a small PNG of the category shape with seeded jitter of position,
    size, rotation, colour and pixel noise, so that no two items are pixel-identical.

User sequences
    Each user has a sparse taste ``theta ~ Dirichlet(taste_alpha)`` over categories. The first
    category is drawn from ``theta``; every next category is, with probability ``p_taste``, a
    taste-driven jump (drawn from ``theta``) and otherwise a step of the category-level Markov
    chain ``category_transitions(cfg)``, SHARED by all domains::

        T = p_stay * I + p_next * P_successor + p_partner * P_partner + p_uniform / K,

    normalised by ``1 - p_taste`` (``p_uniform`` is what the four probabilities leave). The
    successor map is a random cycle over the categories and the partner of a category is another
    random category, both fixed by the seed and the same in every domain. Within a category the
    item is drawn from a domain-specific Zipf popularity (``zipf_a``) over the category's items,
    skipping items the user already has (unless the category is exhausted). Sequence lengths are
    uniform in ``[min_seq_len, max_seq_len]``; timestamps are a distinct per-user start plus
    positive increments, so they strictly increase within a sequence.

So a user encoder that learns "after category A comes category B" from the content of the source
domains can reuse it on the target domain, where it sees the same words and shapes on new items.

Determinism: every random draw comes from ``numpy.random.SeedSequence(seed)``: child 0 fixes the
shared structure, child ``1 + d`` domain ``d`` (which spawns separate streams for items, text,
images, sequences and timestamps). PNGs and CSVs are written with fixed options, so one config always produces
byte-identical files.

On disk (the generic tabular layout, read by the ``tabular`` importer)::

    <out_dir>/demo.json                         config and per-domain counts
    <out_dir>/<domain>/items.csv                item_id,title,description,image
    <out_dir>/<domain>/interactions.csv         user_id,item_id,timestamp (by user, then time)
    <out_dir>/<domain>/images/<item_id>.png     for items with an image

The latent categories are never written; ``generate_demo`` returns them in memory.
"""

from __future__ import annotations

import colorsys
import csv
import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm.auto import tqdm

from mmrec.configbase import check_keys
from mmrec.io import atomic_dir

# --------------------------------------------------------------------------------------------
# Vocabularies and visual signatures (fixed; the seed only changes the sampled data)

SHAPES = (
    "circle", "square", "triangle", "star", "cross", "ring",
    "diamond", "stripes", "hexagon", "crescent", "arrow", "semicircle",
)
"""Category ``c`` is drawn as ``SHAPES[c % len(SHAPES)]``."""

_PALETTE = (
    (215, 40, 40), (40, 80, 215), (40, 170, 60), (245, 140, 20), (140, 50, 190), (235, 210, 30),
    (30, 190, 210), (220, 50, 160), (130, 80, 40), (20, 120, 120), (250, 150, 180), (120, 130, 30),
)

_THEMES = (
    ("ocean", "wave", "tide", "coral", "harbor", "reef", "sailor", "lagoon"),
    ("forest", "pine", "moss", "fern", "oak", "woodland", "grove", "timber"),
    ("galaxy", "comet", "orbit", "nebula", "rocket", "planet", "asteroid", "starlight"),
    ("city", "street", "skyline", "subway", "neon", "avenue", "tower", "downtown"),
    ("desert", "dune", "cactus", "mirage", "oasis", "canyon", "sandstorm", "caravan"),
    ("mountain", "summit", "glacier", "ridge", "avalanche", "peak", "alpine", "cliff"),
    ("kitchen", "recipe", "spice", "bakery", "feast", "garlic", "pastry", "harvest"),
    ("robot", "engine", "circuit", "gear", "factory", "machine", "laser", "reactor"),
    ("garden", "rose", "tulip", "blossom", "orchard", "meadow", "petal", "bloom"),
    ("winter", "snow", "frost", "ice", "blizzard", "sleigh", "fireplace", "aurora"),
    ("castle", "knight", "empire", "crown", "dynasty", "throne", "legend", "sword"),
    ("stadium", "race", "champion", "sprint", "trophy", "athlete", "marathon", "goal"),
    ("detective", "clue", "shadow", "secret", "riddle", "alibi", "suspect", "cipher"),
    ("tiger", "wolf", "falcon", "safari", "jungle", "panther", "elephant", "eagle"),
    ("carnival", "parade", "lantern", "firework", "dance", "festival", "costume", "drum"),
    ("atom", "molecule", "laboratory", "theory", "fossil", "microscope", "formula", "experiment"),
)

STYLES = (
    ("plain", ("classic", "timeless", "elegant", "refined")),
    ("dots", ("vintage", "retro", "antique", "nostalgic")),
    ("stripes", ("modern", "sleek", "minimal", "contemporary")),
    ("checker", ("rustic", "handmade", "earthy", "homespun")),
    ("outline", ("bold", "vivid", "striking", "loud")),
    ("gradient", ("dreamy", "soft", "gentle", "misty")),
)
"""Per style: the image texture and the style words of its text."""

_NEUTRAL = ("complete", "essential", "original", "special", "selected", "collected")


@dataclass(frozen=True)
class DomainLook:
    """A domain's surface: its nouns and filler words, and its image background."""

    key: str
    aliases: tuple[str, ...]
    nouns: tuple[str, ...]
    fillers: tuple[str, ...]


LOOKS = (
    DomainLook("books", ("book", "books"), ("novel", "book", "paperback", "anthology", "memoir", "hardcover"),
               ("chapters", "prose", "characters", "pages", "storytelling", "narration")),
    DomainLook("music", ("music", "album", "albums"), ("album", "record", "single", "vinyl", "mixtape", "LP"),
               ("melodies", "lyrics", "rhythms", "choruses", "vocals", "guitars")),
    DomainLook("films", ("film", "films", "movie", "movies"), ("film", "movie", "feature", "documentary", "picture", "miniseries"),
               ("scenes", "cinematography", "performances", "dialogue", "screenplay", "camera work")),
    DomainLook("posters", ("poster", "posters", "art", "prints"), ("poster", "print", "canvas", "artwork", "lithograph", "sketch"),
               ("brushwork", "colours", "composition", "frames", "ink", "lines")),
    DomainLook("games", ("game", "games"), ("game", "board game", "puzzle", "video game", "card game", "expansion"),
               ("levels", "quests", "players", "gameplay", "rules", "puzzles")),
    DomainLook("clothing", ("clothing", "clothes", "fashion"), ("shirt", "jacket", "scarf", "sweater", "dress", "hoodie"),
               ("fabric", "stitching", "prints", "fit", "cotton", "patterns")),
)
"""Surface of each domain look; backgrounds: paper grain, dark gradient, film strip, diagonal
lines, grid, vignette (``render_item_image``)."""


def category_words(category: int) -> tuple[str, ...]:
    """The text vocabulary of a category (the same in every domain)."""
    if category < len(_THEMES):
        return _THEMES[category]
    # Beyond the hand-written themes: pronounceable pseudo-words, fixed per category.
    rng = np.random.default_rng([0x5EED, category])
    cons, vows = "bdfgklmnprstvz", "aeiou"
    return tuple(
        "".join(cons[rng.integers(len(cons))] + vows[rng.integers(len(vows))] for _ in range(int(rng.integers(2, 4))))
        for _ in range(8)
    )


def category_colour(category: int) -> tuple[int, int, int]:
    """The dominant RGB colour of a category."""
    if category < len(_PALETTE):
        return _PALETTE[category]
    hue = (category * 0.6180339887) % 1.0  # golden-ratio hues stay well apart for any count
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.55 + 0.35 * ((category // len(_PALETTE)) % 2))
    return int(r * 255), int(g * 255), int(b * 255)


def domain_looks(domains: tuple[str, ...]) -> tuple[int, ...]:
    """The look (index into ``LOOKS``, possibly beyond it) of each domain.

    Known names (``books``, ``music``, ``films``, ``posters``, ``games``, ``clothing`` and
    aliases) keep their own look; other names take the first unused looks in order, so distinct
    domains always look different. Looks ``>= len(LOOKS)`` reuse a surface with shifted colours.
    """
    looks: list[int | None] = []
    for name in domains:
        low = name.lower()
        looks.append(next((i for i, lk in enumerate(LOOKS) if low in lk.aliases), None))
    used = {lk for lk in looks if lk is not None}
    free = (i for i in range(10**6) if i not in used)
    return tuple(lk if lk is not None else next(free) for lk in looks)


# --------------------------------------------------------------------------------------------
# Configuration

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class DemoConfig:
    """Parameters of the synthetic demo data. Defaults: 3 domains x 150 items x 200 users.

    ``n_users``, ``n_items``, ``p_text_only`` and ``p_image_only`` take one value for every domain
    or a tuple with one value per domain (in the order of ``domains``).
    """

    seed: int = 0
    """Seed of every random draw; the same config always writes byte-identical files."""
    domains: tuple[str, ...] = ("books", "music", "films")
    """Domain names (folder names and id prefixes). By convention the last one is the target
    (``films``) and the others the sources. ``books``/``music``/``films`` (and ``posters``,
    ``games``, ``clothing``) have their own vocabulary and background; other names get unused ones."""
    n_users: int | tuple[int, ...] = 200
    """Users per domain."""
    n_items: int | tuple[int, ...] = 150
    """Items per domain (at least ``n_categories``, so every category has items everywhere)."""
    n_categories: int = 8
    """Latent categories K (2..64), shared by all domains."""
    n_styles: int = 4
    """Secondary item styles (1..6): image texture and style words."""
    min_seq_len: int = 6
    """Shortest user sequence (interactions)."""
    max_seq_len: int = 15
    """Longest user sequence (interactions)."""
    image_size: int = 32
    """Side of the square RGB images in pixels (8..512)."""
    p_text_only: float | tuple[float, ...] = 0.3
    """Share of text-only items (no image)."""
    p_image_only: float | tuple[float, ...] = 0.2
    """Share of image-only items (empty title and description). The rest have both."""
    p_stay: float = 0.2
    """Markov chain: probability to stay in the current category."""
    p_next: float = 0.4
    """Markov chain: probability to move to the category's successor (a random cycle)."""
    p_partner: float = 0.15
    """Markov chain: probability to move to the category's fixed partner."""
    p_taste: float = 0.2
    """Probability of a taste-driven jump (drawn from the user's own taste) instead of a chain
    step. What the four probabilities leave is a uniform random jump."""
    taste_alpha: float = 0.3
    """Dirichlet concentration of user tastes over categories (small: few favourite categories)."""
    zipf_a: float = 1.0
    """Exponent of the within-category item popularity ``1 / rank**zipf_a`` (0: uniform)."""
    text_noise: float = 0.1
    """Probability that an item's description carries a word of another category."""

    def __post_init__(self):
        def bad(name: str, value: Any, need: str) -> ValueError:
            return ValueError(f"DemoConfig.{name} must be {need}, got {value!r}")

        if not _is_int(self.seed) or self.seed < 0:
            raise bad("seed", self.seed, "an integer >= 0")
        if isinstance(self.domains, str) or not isinstance(self.domains, (tuple, list)) or not self.domains:
            raise bad("domains", self.domains, "a non-empty tuple of names")
        object.__setattr__(self, "domains", tuple(self.domains))
        for name in self.domains:
            if not isinstance(name, str) or not _NAME.match(name):
                raise bad("domains", self.domains, "names of letters, digits, '_' or '-' (not starting with '_' or '-')")
        if len(set(self.domains)) != len(self.domains):
            raise bad("domains", self.domains, "distinct names")
        n_dom = len(self.domains)

        for name, lo, hi in (("n_categories", 2, 64), ("n_styles", 1, len(STYLES)), ("min_seq_len", 2, None),
                             ("max_seq_len", 2, None), ("image_size", 8, 512)):
            v = getattr(self, name)
            if not _is_int(v) or v < lo or (hi is not None and v > hi):
                raise bad(name, v, f"an integer in [{lo}, {hi}]" if hi else f"an integer >= {lo}")
        if self.min_seq_len > self.max_seq_len:
            raise ValueError(f"DemoConfig.min_seq_len ({self.min_seq_len}) must be <= max_seq_len ({self.max_seq_len})")

        def per_domain(name: str, ok, need: str) -> None:
            v = getattr(self, name)
            if isinstance(v, (list, tuple)):
                if len(v) != n_dom or not all(ok(x) for x in v):
                    raise bad(name, v, f"{need}, or a tuple of {n_dom} such values (one per domain)")
                object.__setattr__(self, name, tuple(v))
            elif not ok(v):
                raise bad(name, v, need)

        per_domain("n_users", lambda x: _is_int(x) and x >= 1, "an integer >= 1")
        per_domain("n_items", lambda x: _is_int(x) and x >= self.n_categories,
                   f"an integer >= n_categories ({self.n_categories})")
        for name in ("p_text_only", "p_image_only"):
            per_domain(name, lambda x: _is_num(x) and 0 <= x <= 1, "a probability in [0, 1]")
        for d in range(n_dom):
            t, i = self.modality_probs(d)[:2]
            if t + i > 1 + 1e-9:
                raise ValueError(
                    f"DemoConfig.p_text_only + p_image_only must be <= 1, got {t} + {i} for domain {self.domains[d]!r}"
                )

        for name in ("p_stay", "p_next", "p_partner", "p_taste", "text_noise"):
            v = getattr(self, name)
            if not _is_num(v) or not 0 <= v <= 1:
                raise bad(name, v, "a probability in [0, 1]")
        if self.p_taste >= 1:
            raise bad("p_taste", self.p_taste, "< 1 (otherwise there is no shared transition structure)")
        total = self.p_stay + self.p_next + self.p_partner + self.p_taste
        if total > 1 + 1e-9:
            raise ValueError(f"DemoConfig.p_stay + p_next + p_partner + p_taste must be <= 1, got {total:g}")
        if not _is_num(self.taste_alpha) or self.taste_alpha <= 0:
            raise bad("taste_alpha", self.taste_alpha, "a number > 0")
        if not _is_num(self.zipf_a) or self.zipf_a < 0:
            raise bad("zipf_a", self.zipf_a, "a number >= 0")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DemoConfig:
        """Build a config from a mapping (e.g. a YAML section); lists become tuples."""
        if not isinstance(d, dict):
            raise ValueError(f"DemoConfig: expected a mapping, got {type(d).__name__}")
        check_keys(cls, d, "DemoConfig")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples as lists) that ``from_dict`` reads back."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def _of(self, name: str, d: int):
        v = getattr(self, name)
        return v[d] if isinstance(v, tuple) else v

    def users_of(self, d: int) -> int:
        """Users of the ``d``-th domain."""
        return int(self._of("n_users", d))

    def items_of(self, d: int) -> int:
        """Items of the ``d``-th domain."""
        return int(self._of("n_items", d))

    def modality_probs(self, d: int) -> tuple[float, float, float]:
        """``(p_text_only, p_image_only, p_both)`` of the ``d``-th domain."""
        t, i = float(self._of("p_text_only", d)), float(self._of("p_image_only", d))
        return t, i, max(0.0, 1.0 - t - i)


@dataclass
class DemoDomain:
    """What ``generate_demo`` wrote for one domain, with the latent variables kept out of the files."""

    name: str
    item_category: dict[str, int]
    """item_id -> latent category."""
    n_users: int
    n_items: int
    n_interactions: int
    modality_counts: dict[str, int]
    """``{"text": text-only, "image": image-only, "both": text and image}`` item counts."""
    item_style: dict[str, int] = field(default_factory=dict)
    """item_id -> style (the secondary attribute)."""


# --------------------------------------------------------------------------------------------
# Pure core: structure, sequences, text, images


def _streams(seed: int, n_domains: int) -> tuple[np.random.SeedSequence, list[np.random.SeedSequence]]:
    """The shared-structure stream and one stream per domain (spawn keys are stable)."""
    shared, *domains = np.random.SeedSequence(seed).spawn(1 + n_domains)
    return shared, domains


def category_structure(rng: np.random.Generator, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A random successor cycle and partner map over ``k`` categories.

    The successor of every category is another category (one cycle through all of them); the
    partner differs from the category and its successor when ``k >= 3``.
    """
    order = rng.permutation(k)
    successor = np.empty(k, dtype=np.int64)
    successor[order] = np.roll(order, -1)
    partner = successor.copy()
    if k >= 3:
        for c in range(k):
            choices = [x for x in range(k) if x != c and x != successor[c]]
            partner[c] = choices[int(rng.integers(len(choices)))]
    return successor, partner


def transition_matrix(successor: np.ndarray, partner: np.ndarray, p_stay: float, p_next: float,
                      p_partner: float, p_taste: float) -> np.ndarray:
    """The category chain (rows sum to 1), excluding taste jumps which depend on the user."""
    k = len(successor)
    p_uniform = max(0.0, 1.0 - p_stay - p_next - p_partner - p_taste)
    t = np.full((k, k), p_uniform / k)
    rows = np.arange(k)
    t[rows, rows] += p_stay
    t[rows, successor] += p_next
    t[rows, partner] += p_partner
    return t / t.sum(axis=1, keepdims=True)


def category_transitions(cfg: DemoConfig) -> np.ndarray:
    """The K x K category transition matrix shared by every domain of ``cfg``."""
    shared, _ = _streams(cfg.seed, len(cfg.domains))
    successor, partner = category_structure(np.random.default_rng(shared), cfg.n_categories)
    return transition_matrix(successor, partner, cfg.p_stay, cfg.p_next, cfg.p_partner, cfg.p_taste)


def item_popularity(rng: np.random.Generator, item_category: np.ndarray, zipf_a: float) -> np.ndarray:
    """Zipf weights ``1 / rank**zipf_a``, with ranks shuffled within each category."""
    pop = np.empty(len(item_category))
    for c in np.unique(item_category):
        idx = np.flatnonzero(item_category == c)
        ranks = rng.permutation(len(idx)) + 1
        pop[idx] = ranks.astype(float) ** -zipf_a
    return pop


class Sequences(NamedTuple):
    """Per user: the category sequence, the item sequence (indices) and the taste vector."""

    categories: list[np.ndarray]
    items: list[np.ndarray]
    tastes: np.ndarray


def _draw(rng: np.random.Generator, p: np.ndarray) -> int:
    # searchsorted on the cumulative sum: much faster than rng.choice in a Python loop.
    cum = np.cumsum(p)
    return int(min(np.searchsorted(cum, rng.random() * cum[-1], side="right"), len(p) - 1))


def sample_sequences(rng: np.random.Generator, n_users: int, transition: np.ndarray, item_category: np.ndarray,
                     popularity: np.ndarray, min_len: int, max_len: int, taste_alpha: float,
                     p_taste: float) -> Sequences:
    """Sample user sequences from the taste + shared Markov chain model (see the module docstring).

    ``transition`` is the K x K chain, ``item_category[i]`` and ``popularity[i]`` the category and
    popularity of item ``i``. Every category must have at least one item.
    """
    k = transition.shape[0]
    members = [np.flatnonzero(item_category == c) for c in range(k)]
    if any(len(m) == 0 for m in members):
        raise ValueError("every category needs at least one item")
    tastes = rng.dirichlet(np.full(k, float(taste_alpha)), size=n_users)
    lengths = rng.integers(min_len, max_len + 1, size=n_users)
    cats_out, items_out = [], []
    for u in range(n_users):
        cats = np.empty(lengths[u], dtype=np.int64)
        items = np.empty(lengths[u], dtype=np.int64)
        seen: set[int] = set()
        for t in range(lengths[u]):
            if t == 0 or rng.random() < p_taste:
                c = _draw(rng, tastes[u])
            else:
                c = _draw(rng, transition[cats[t - 1]])
            cand = members[c]
            w = popularity[cand].copy()
            w[[j for j, i in enumerate(cand) if i in seen]] = 0.0
            if w.sum() <= 0:  # category exhausted for this user: repeats are allowed
                w = popularity[cand]
            i = int(cand[_draw(rng, w)])
            cats[t], items[t] = c, i
            seen.add(i)
        cats_out.append(cats)
        items_out.append(items)
    return Sequences(cats_out, items_out, tastes)


def sample_timestamps(rng: np.random.Generator, lengths: list[int]) -> list[np.ndarray]:
    """Integer timestamps: distinct per-user starts plus positive gaps (strictly increasing)."""
    base = 1_600_000_000  # Sept 2020, in Unix seconds
    starts = base + rng.choice(30_000_000, size=len(lengths), replace=False)
    out = []
    for start, n in zip(starts, lengths):
        gaps = rng.integers(60, 3 * 86_400, size=n)  # one minute to three days
        gaps[0] = 0
        out.append(int(start) + np.cumsum(gaps))
    return out


def allocate_modalities(rng: np.random.Generator, n_items: int, probs: tuple[float, float, float]) -> np.ndarray:
    """A shuffled array of modalities (0 text-only, 1 image-only, 2 both) with counts as close to
    ``probs * n_items`` as possible (largest remainder)."""
    want = np.asarray(probs, dtype=float) * n_items
    counts = np.floor(want).astype(int)
    for j in np.argsort(-(want - counts), kind="stable")[: n_items - counts.sum()]:
        counts[j] += 1
    return rng.permutation(np.repeat(np.arange(3), counts))


def item_text(category: int, style: int, look: int, rng: np.random.Generator, n_categories: int,
              text_noise: float = 0.1) -> tuple[str, str]:
    """A title and a one-sentence description for an item of ``category`` and ``style`` in a
    domain with look ``look`` (see ``domain_looks``)."""
    words = category_words(category)
    a, b, c = (words[j] for j in rng.choice(len(words), size=3, replace=False))
    styles = STYLES[style][1]
    st = styles[int(rng.integers(len(styles)))]
    surface = LOOKS[look % len(LOOKS)]
    noun = surface.nouns[int(rng.integers(len(surface.nouns)))]
    filler = surface.fillers[int(rng.integers(len(surface.fillers)))]
    neutral = _NEUTRAL[int(rng.integers(len(_NEUTRAL)))]
    if n_categories > 1 and rng.random() < text_noise:
        other = (category + 1 + int(rng.integers(n_categories - 1))) % n_categories
        ow = category_words(other)
        c = ow[int(rng.integers(len(ow)))]
    cap = lambda s: s[:1].upper() + s[1:]  # noqa: E731  (keeps "LP" as it is, unlike str.title)
    a_st = ("an " if st[0] in "aeiou" else "a ") + st  # style words are all lowercase
    titles = (
        f"{cap(st)} {cap(a)} {cap(noun)}",
        f"The {cap(a)} and the {cap(b)}",
        f"{cap(a)} {cap(b)}: {cap(a_st)} {cap(noun)}",
        f"{cap(neutral)} {cap(a)} {cap(noun)}",
    )
    descriptions = (
        f"{cap(a_st)} {noun} about {a} and {b}, with {filler} full of {c}.",
        f"This {noun} takes its {filler} from the {a} to the {b}, in {a_st} mood of {c}.",
        f"{cap(st)} {filler}, {a} and {b} meet in this {neutral} {noun} about {c}.",
        f"Fans of {a} will enjoy this {st} {noun}: {filler}, {b} and {c}.",
    )
    return titles[int(rng.integers(len(titles)))], descriptions[int(rng.integers(len(descriptions)))]


def _rotated(cx: float, cy: float, r: float, angle: float, pts) -> list[tuple[float, float]]:
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def _regular(n: int, start: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [(math.cos(start + 2 * math.pi * i / n), math.sin(start + 2 * math.pi * i / n)) for i in range(n)]


def _shape_mask(shape: str, s: int, cx: float, cy: float, r: float, angle: float) -> Image.Image:
    """An ``L`` mask (255 inside) of ``shape`` centred at ``(cx, cy)`` with radius ``r``."""
    mask = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(mask)
    poly = lambda pts: draw.polygon(_rotated(cx, cy, r, angle, pts), fill=255)  # noqa: E731
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        draw.ellipse((cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r), fill=0)
    elif shape == "square":
        poly([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)])
    elif shape == "triangle":
        poly(_regular(3))
    elif shape == "star":
        outer, inner = _regular(5), _regular(5, -math.pi / 2 + math.pi / 5)
        poly([p for pair in zip(outer, inner) for p in (pair[0], (0.42 * pair[1][0], 0.42 * pair[1][1]))])
    elif shape == "cross":
        w = 0.3
        poly([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)])
    elif shape == "diamond":
        poly([(0, -1), (0.6, 0), (0, 1), (-0.6, 0)])
    elif shape == "stripes":
        for y in (-0.65, 0.0, 0.65):
            poly([(-0.9, y - 0.17), (0.9, y - 0.17), (0.9, y + 0.17), (-0.9, y + 0.17)])
    elif shape == "hexagon":
        poly(_regular(6, 0.0))
    elif shape == "crescent":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        (ox, oy), = _rotated(cx, cy, r, angle, [(0.45, -0.25)])
        draw.ellipse((ox - 0.85 * r, oy - 0.85 * r, ox + 0.85 * r, oy + 0.85 * r), fill=0)
    elif shape == "arrow":
        poly([(-1, -0.3), (0.2, -0.3), (0.2, -0.75), (1, 0), (0.2, 0.75), (0.2, 0.3), (-1, 0.3)])
    elif shape == "semicircle":
        arc = [(math.cos(math.pi + math.pi * i / 24), 0.35 + math.sin(math.pi + math.pi * i / 24)) for i in range(25)]
        poly(arc)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def _background(look: int, s: int, rng: np.random.Generator) -> np.ndarray:
    """The ``s x s x 3`` float background of a domain look."""
    yy, xx = np.mgrid[0:s, 0:s].astype(float) / s
    kind = look % len(LOOKS)
    if kind == 0:  # paper: cream with grain
        bg = np.array([238.0, 230, 210]) + rng.normal(0, 7, (s, s, 1))
    elif kind == 1:  # dark vertical gradient
        bg = np.array([25.0, 25, 60]) * (1 - yy[..., None]) + np.array([70.0, 30, 85]) * yy[..., None]
    elif kind == 2:  # film strip: grey frame between black bars with sprocket holes
        bg = np.broadcast_to(np.array([115.0, 115, 120]), (s, s, 3)).copy()
        bar = (yy < 0.12) | (yy > 0.88)
        bg[bar] = 15.0
        holes = bar & (((xx * 8) % 1) < 0.45) & (np.abs(((yy < 0.5) * 0.06 + (yy >= 0.5) * 0.94) - yy) < 0.03)
        bg[holes] = 225.0
    elif kind == 3:  # light blue with diagonal lines
        bg = np.broadcast_to(np.array([200.0, 225, 240]), (s, s, 3)).copy()
        bg[((xx + yy) * 8 % 1) < 0.15] -= 45
    elif kind == 4:  # light green grid
        bg = np.broadcast_to(np.array([215.0, 235, 205]), (s, s, 3)).copy()
        bg[((xx * 6) % 1 < 0.08) | ((yy * 6) % 1 < 0.08)] -= 50
    else:  # peach with a dark vignette
        d = np.sqrt((xx - 0.5) ** 2 + (yy - 0.5) ** 2)[..., None]
        bg = np.array([245.0, 215, 200]) * (1 - 0.9 * d)
    if look >= len(LOOKS):  # further domains: same pattern, rotated colour channels
        bg = np.roll(bg, look // len(LOOKS), axis=-1)
    return bg


def _fill(style: int, colour: np.ndarray, s: int, mask: Image.Image, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The textured fill of a shape (``s x s x 3``) and its coverage (``s x s`` in [0, 1])."""
    yy, xx = np.mgrid[0:s, 0:s].astype(float)
    cover = np.asarray(mask, dtype=float) / 255
    fill = np.broadcast_to(colour, (s, s, 3)).copy()
    kind = STYLES[style][0]
    phase = rng.uniform(0, s)  # texture offset: the same style is not pixel-identical twice
    if kind == "dots":
        p = s / 5
        dot = ((xx + phase) % p - p / 2) ** 2 + ((yy + phase) % p - p / 2) ** 2 < (p / 4) ** 2
        fill[dot] *= 0.45
    elif kind == "stripes":
        fill[((yy + phase) // (s / 10)) % 2 == 0] = 0.55 * colour + 0.45 * 255
    elif kind == "checker":
        q = s / 6
        fill[(((xx + phase) // q + (yy + phase) // q) % 2) == 0] *= 0.6
    elif kind == "outline":
        k = max(3, (s // 10) | 1)  # odd rank-filter size ~ a tenth of the image
        inner = np.asarray(mask.filter(ImageFilter.MinFilter(k)), dtype=float) / 255
        pale, dark = 0.35 * colour + 0.65 * 255, 0.5 * colour
        edge = (cover - inner)[..., None]  # the border band of the shape
        fill = pale * (1 - edge) + dark * edge
    elif kind == "gradient":
        t = (yy / s)[..., None] * 0.7
        fill = colour * (1 - t) + 255 * t
    return fill, cover


def render_item_image(category: int, style: int, domain_index: int, rng: np.random.Generator, size: int) -> Image.Image:
    """An RGB ``size x size`` image of an item: the category's shape in the category's colour,
    textured by ``style``, on the background of domain look ``domain_index`` (see
    ``domain_looks``), with jitter of position, size, rotation, colour and pixel noise."""
    ss = max(1, min(4, 128 // size))  # supersampling, for smooth edges at small sizes
    s = size * ss
    cx, cy = s * (0.5 + rng.uniform(-0.1, 0.1, size=2))
    r = s * rng.uniform(0.28, 0.37)
    angle = rng.uniform(-0.26, 0.26)  # +-15 degrees: keeps a square a square, not a diamond
    colour = np.clip(np.array(category_colour(category), dtype=float) + rng.normal(0, 12, 3), 0, 255)
    mask = _shape_mask(SHAPES[category % len(SHAPES)], s, cx, cy, r, angle)
    fill, cover = _fill(style, colour, s, mask, rng)
    bg = _background(domain_index, s, rng)
    img = bg * (1 - cover[..., None]) + fill * cover[..., None]
    img = np.asarray(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).resize((size, size), Image.Resampling.BOX),
                     dtype=float)
    img += rng.normal(0, 4, img.shape)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------------------------
# I/O shell


def _ids(prefix: str, n: int) -> list[str]:
    width = max(4, len(str(n - 1)))  # zero padding: lexical order = numeric order
    return [f"{prefix}{i:0{width}d}" for i in range(n)]


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _write_domain(folder: Path, cfg: DemoConfig, d: int, look: int, transition: np.ndarray,
                  ss: np.random.SeedSequence, bar) -> DemoDomain:
    name, n_items, n_users = cfg.domains[d], cfg.items_of(d), cfg.users_of(d)
    item_ss, text_ss, image_ss, user_ss, time_ss = ss.spawn(5)
    rng = np.random.default_rng(item_ss)
    cats = rng.permutation(np.arange(n_items) % cfg.n_categories)  # balanced: every category present
    styles = rng.integers(0, cfg.n_styles, size=n_items)
    modality = allocate_modalities(rng, n_items, cfg.modality_probs(d))
    popularity = item_popularity(rng, cats, cfg.zipf_a)

    item_ids = _ids(f"{name}_i", n_items)
    (folder / "images").mkdir(parents=True)
    text_rng, image_rng = np.random.default_rng(text_ss), np.random.default_rng(image_ss)
    rows = []
    for i, iid in enumerate(item_ids):
        # Text and images are drawn for every item, used or not, so that changing the modality
        # probabilities does not reshuffle the content of the other items.
        title, desc = item_text(int(cats[i]), int(styles[i]), look, text_rng, cfg.n_categories, cfg.text_noise)
        img = render_item_image(int(cats[i]), int(styles[i]), look, image_rng, cfg.image_size)
        has_text, has_image = modality[i] != 1, modality[i] != 0
        ref = f"images/{iid}.png" if has_image else ""
        if has_image:
            img.save(folder / ref, format="PNG", optimize=False, compress_level=6)
        rows.append([iid, title if has_text else "", desc if has_text else "", ref])
        bar.update(1)
    _write_csv(folder / "items.csv", ["item_id", "title", "description", "image"], rows)

    seqs = sample_sequences(np.random.default_rng(user_ss), n_users, transition, cats, popularity,
                            cfg.min_seq_len, cfg.max_seq_len, cfg.taste_alpha, cfg.p_taste)
    times = sample_timestamps(np.random.default_rng(time_ss), [len(s) for s in seqs.items])
    user_ids = _ids(f"{name}_u", n_users)
    inter = [[uid, item_ids[i], int(t)] for uid, items, ts in zip(user_ids, seqs.items, times) for i, t in zip(items, ts)]
    _write_csv(folder / "interactions.csv", ["user_id", "item_id", "timestamp"], inter)
    counts = np.bincount(modality, minlength=3)
    return DemoDomain(
        name=name,
        item_category={iid: int(c) for iid, c in zip(item_ids, cats)},
        n_users=n_users,
        n_items=n_items,
        n_interactions=len(inter),
        modality_counts={"text": int(counts[0]), "image": int(counts[1]), "both": int(counts[2])},
        item_style={iid: int(s) for iid, s in zip(item_ids, styles)},
    )


def generate_demo(cfg: DemoConfig, out_dir: str | Path, progress: bool = True) -> dict[str, DemoDomain]:
    """Write the demo data of ``cfg`` to ``out_dir`` (replaced atomically) and return, per domain,
    the counts and the latent categories of the items."""
    out_dir = Path(out_dir)
    shared, domain_ss = _streams(cfg.seed, len(cfg.domains))
    successor, partner = category_structure(np.random.default_rng(shared), cfg.n_categories)
    transition = transition_matrix(successor, partner, cfg.p_stay, cfg.p_next, cfg.p_partner, cfg.p_taste)
    looks = domain_looks(cfg.domains)
    result: dict[str, DemoDomain] = {}
    total = sum(cfg.items_of(d) for d in range(len(cfg.domains)))
    with atomic_dir(out_dir) as tmp, tqdm(total=total, desc="demo data", unit="item", disable=not progress) as bar:
        for d, name in enumerate(cfg.domains):
            bar.set_postfix_str(name)
            result[name] = _write_domain(tmp / name, cfg, d, looks[d], transition, domain_ss[d], bar)
        summary = {
            "generator": "mmrec.data.synthetic",
            "format": "tabular",
            "config": cfg.to_dict(),
            "domains": {
                n: {"users": r.n_users, "items": r.n_items, "interactions": r.n_interactions,
                    "text_only": r.modality_counts["text"], "image_only": r.modality_counts["image"],
                    "both": r.modality_counts["both"]}
                for n, r in result.items()
            },
        }
        with open(tmp / "demo.json", "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2, sort_keys=True)
            fh.write("\n")
    return result

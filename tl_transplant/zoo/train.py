"""Train the embedded model pairs: ``python -m tl_transplant.zoo.train [--pair NAME] [--preset P]``.

Two pairs, each with a real capability gap, deterministic from the seed and
small enough to train on two CPU cores in a few minutes:

* ``cross_generation`` (Llama architecture with GQA): ``gen1`` learns a mix of
  synthetic tasks (modular addition, list max, induction/copy). ``gen2``
  continues from ``gen1`` on the mix *without* addition until its addition
  accuracy collapses: a newer model that underperforms its predecessor.
* ``base_instruct`` (GPT-2 architecture): ``base`` learns the tasks in a plain
  format (``add 4 9 =``); ``instruct`` is ``base`` fine-tuned to answer in a
  chat-like format (``Q: add 4 9 A:``), which ``base`` fails.

The second stage of each pair trains only the transformer blocks' linear
layers (embeddings, unembedding and norms are frozen), as transplants never
move those: the gap then lives in units a transplant can reach. Every answer
is a single token; training loss is on the answer token only.

Presets (:data:`PRESETS`) change only sizes: model width and depth, step budget, eval cadence,
probe size, threads. ``full`` made the shipped pairs, ``fast`` is a smaller retrain, ``smoke``
is the test suite's: the same recipe (task mixes, learning rates, freezing, weight decay, stop
rules) in seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tl_transplant.errors import ZooError

ZOO_DIR = Path(__file__).resolve().parent
PAIRS_DIR = ZOO_DIR / "pairs"
TASKS_DIR = ZOO_DIR / "tasks"

MOD = 13
NUMS = [f"n{i}" for i in range(MOD)]
SYMS = [f"s{i}" for i in range(16)]
WORDS = [*NUMS, *SYMS, "add", "max", "copy", "=", "|", "Q:", "A:"]

Example = tuple[str, str]  # (prompt, answer)


# ---- synthetic tasks -------------------------------------------------------------------------


def task_add(rng: random.Random, chat: bool = False) -> Example:
    a, b = rng.randrange(MOD), rng.randrange(MOD)
    body = f"add n{a} n{b}"
    return (f"Q: {body} A:" if chat else f"{body} =", f"n{(a + b) % MOD}")


def task_max(rng: random.Random, chat: bool = False) -> Example:
    xs = [rng.randrange(MOD) for _ in range(rng.randint(3, 5))]
    body = "max " + " ".join(f"n{x}" for x in xs)
    return (f"Q: {body} A:" if chat else f"{body} =", f"n{max(xs)}")


def task_copy(rng: random.Random, chat: bool = False) -> Example:
    """Induction: a random symbol sequence, then its repeat, cut before a random position."""
    n = rng.randint(4, 6)
    seq = rng.sample(SYMS, n)
    if rng.random() < 0.5:  # sprinkle chat tokens as fillers so their embeddings get trained
        seq[rng.randrange(n)] = rng.choice(["Q:", "A:"])
    cut = rng.randint(1, n - 1)
    prompt = "copy " + " ".join(seq) + " | " + " ".join(seq[:cut])
    return (prompt, seq[cut])


TASKS: dict[str, Callable[..., Example]] = {"add": task_add, "max": task_max, "copy": task_copy}


def sample_examples(name: str, n: int, seed: int, chat: bool = False,
                    exclude: set[str] | None = None) -> list[Example]:
    """``n`` distinct examples of a task, skipping prompts in ``exclude``."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[Example] = []
    tries = 0
    while len(out) < n and tries < 200 * n:
        tries += 1
        p, a = TASKS[name](rng, chat)
        if p not in seen:
            seen.add(p)
            out.append((p, a))
    return out


# ---- model and training ----------------------------------------------------------------------


@dataclass
class Stage:
    """One training stage: a task mix and when to stop."""

    mix: list[tuple[str, bool]]  # (task, chat format)
    max_steps: int
    lr: float
    done: Callable[[dict[str, float]], bool]
    freeze_non_linear: bool = False
    weight_decay: float = 0.0


@dataclass(frozen=True)
class Preset:
    """Sizes of one training run; the recipe itself (mixes, rates, stop rules) is fixed."""

    d_model: int
    n_layers: int
    d_mlp: int
    max_steps: int  # per stage
    n_eval: int  # retention dev/test split size
    n_probe: int  # examples per probe task, scored every ``eval_every`` steps
    eval_every: int = 100
    threads: int | None = None  # torch intra-op threads while training (None: leave as is)


PRESETS: dict[str, Preset] = {
    "full": Preset(64, 3, 128, max_steps=6000, n_eval=200, n_probe=150),
    "fast": Preset(48, 2, 96, max_steps=1500, n_eval=100, n_probe=150),
    # Tiny matmuls: one thread avoids thread hand-off costs, which dominate on a busy machine.
    "smoke": Preset(48, 2, 96, max_steps=1200, n_eval=100, n_probe=100, eval_every=50,
                    threads=1),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ZooError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name]


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch threads, restoring the previous count after."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def make_tokenizer(path: Path) -> Any:
    from tl_transplant.testing import word_tokenizer

    return word_tokenizer(path, words=WORDS)


def make_model(arch: str, vocab: int, preset: Preset = PRESETS["full"]) -> Any:
    import transformers as tf

    d, layers, inner = preset.d_model, preset.n_layers, preset.d_mlp
    common: dict[str, Any] = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  tie_word_embeddings=False)
    cfg: tf.PretrainedConfig
    if arch == "llama":
        cfg = tf.LlamaConfig(hidden_size=d, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=inner,
                             max_position_embeddings=32, **common)
    else:
        cfg = tf.GPT2Config(n_embd=d, n_layer=layers, n_head=4, n_inner=inner, n_positions=32,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    return tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")


class _WordIds:
    """The zoo's word tokenizer as a dict lookup: the ids ``tok(text)`` gives, ~50x faster.

    :func:`make_tokenizer` is whitespace-split word-level, so a text's ids are its words' ids;
    training tokenizes every batch, and the tokenizer call dominated a step of these tiny models.
    """

    def __init__(self, tok: Any) -> None:
        self.vocab: dict[str, int] = tok.get_vocab()
        self.unk = tok.unk_token_id
        self.bos_token_id, self.pad_token_id = tok.bos_token_id, tok.pad_token_id
        self.eos_token_id = tok.eos_token_id

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [self.vocab.get(w, self.unk) for w in text.split()]}


def _batch(tok: Any, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    from tl_transplant.tasks.tokens import encode

    if not isinstance(tok, _WordIds):
        tok = _WordIds(tok)
    enc = encode(tok, [p for p, _ in examples], [a for _, a in examples], prepend_bos=True)
    return enc.input_ids, enc.prompt_len - 1


def accuracy(model: Any, tok: Any, examples: list[Example]) -> float:
    """Next-token accuracy of the single-token answer after the prompt."""
    ids, pos = _batch(tok, examples)
    with torch.no_grad():
        logits = model(ids).logits
    pred = logits[torch.arange(len(examples)), pos].argmax(-1)
    gold = ids[torch.arange(len(examples)), pos + 1]
    return float((pred == gold).float().mean())


def train_stage(model: Any, tok: Any, stage: Stage, evals: dict[str, list[Example]], seed: int,
                batch_size: int = 64, desc: str = "train", eval_every: int = 100,
                log: Callable[[str], None] | None = None) -> dict[str, float]:
    """Train until ``stage.done`` holds on ``evals`` (checked every ``eval_every`` steps)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    tok = tok if isinstance(tok, _WordIds) else _WordIds(tok)
    for name, p in model.named_parameters():
        is_linear = p.ndim == 2 and "wte" not in name and "wpe" not in name and \
            "embed" not in name and "lm_head" not in name
        p.requires_grad_(is_linear or not stage.freeze_non_linear)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=stage.lr,
                            weight_decay=stage.weight_decay)
    accs: dict[str, float] = {}
    bar = tqdm(range(stage.max_steps), desc=desc, leave=False, disable=None, mininterval=1.0)
    for step in bar:
        model.train()
        batch = []
        for _ in range(batch_size):  # one task draw, then its example, per row
            t, chat = rng.choice(stage.mix)
            batch.append(TASKS[t](rng, chat))
        ids, pos = _batch(tok, batch)
        logits = model(ids).logits
        rows = torch.arange(len(batch))
        loss = torch.nn.functional.cross_entropy(logits[rows, pos], ids[rows, pos + 1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % eval_every == 0 or step + 1 == stage.max_steps:
            model.eval()
            accs = {k: accuracy(model, tok, v) for k, v in evals.items()}
            if log is not None:
                log(f"{desc} step {step + 1}: " + " ".join(f"{k}={v:.2f}" for k, v in accs.items()))
            bar.set_postfix(loss=f"{loss.item():.3f}", **{k: f"{v:.2f}" for k, v in accs.items()})
            if stage.done(accs):
                break
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    accs["steps"] = step + 1
    return accs


# ---- pairs ---------------------------------------------------------------------------------------


PAIRS: dict[str, dict[str, Any]] = {
    "cross_generation": {
        "arch": "llama", "source": "gen1", "target": "gen2",
        "task": ("add", False), "retention": ("copy", False),
        "description": "gen2 continued training without modular addition and forgot it",
    },
    "base_instruct": {
        "arch": "gpt2", "source": "instruct", "target": "base",
        "task": ("add", True), "retention": ("copy", False),
        "description": "instruct answers 'Q: ... A:' prompts, which base never learned",
    },
}


def _write_jsonl(path: Path, rows: list[Example], task: str, fmt: str) -> None:
    with path.open("w") as f:
        for p, a in rows:
            f.write(json.dumps({"prompt": p, "answer": a, "task": task, "format": fmt}) + "\n")


def train_pair(name: str, out_dir: Path, tasks_dir: Path, seed: int = 0, fast: bool = False,
               log: Callable[[str], None] = print, preset: str | None = None,
               curve: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train one pair; save ``source``/``target`` HF dirs under ``out_dir`` and task JSONLs.

    ``preset`` names a size in :data:`PRESETS` (default ``"fast"`` if ``fast`` else ``"full"``);
    ``curve`` receives one line per probe evaluation.
    """
    preset = preset or ("fast" if fast else "full")
    ps = get_preset(preset)
    with _threads(ps.threads):
        return _train_pair(name, out_dir, tasks_dir, seed, preset, ps, log, curve)


def _train_pair(name: str, out_dir: Path, tasks_dir: Path, seed: int, preset: str, ps: Preset,
                log: Callable[[str], None], curve: Callable[[str], None] | None) -> dict[str, Any]:
    spec = PAIRS[name]
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks_dir.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out_dir / "tokenizer")
    chat_task = spec["task"][1]
    n_eval = ps.n_eval
    # Held-out splits first, so training never sees a dev/test prompt. Addition has only
    # MOD**2 distinct prompts: split all of them in two halves.
    task_rows = sample_examples("add", MOD * MOD, seed + 101, chat=chat_task)
    half = len(task_rows) // 2
    dev, test = task_rows[:half], task_rows[half:]
    ret_dev = sample_examples("copy", n_eval, seed + 103)
    ret_test = sample_examples("copy", n_eval, seed + 104, exclude={p for p, _ in ret_dev})
    fmt = "chat" if chat_task else "plain"
    prefix = f"{name}"
    _write_jsonl(tasks_dir / f"{prefix}_task_dev.jsonl", dev, "add", fmt)
    _write_jsonl(tasks_dir / f"{prefix}_task_test.jsonl", test, "add", fmt)
    _write_jsonl(tasks_dir / f"{prefix}_retention_dev.jsonl", ret_dev, "copy", "plain")
    _write_jsonl(tasks_dir / f"{prefix}_retention_test.jsonl", ret_test, "copy", "plain")

    probe = {
        "add": sample_examples("add", ps.n_probe, seed + 201),
        "add_chat": sample_examples("add", ps.n_probe, seed + 202, chat=True),
        "max": sample_examples("max", ps.n_probe, seed + 203),
        "copy": sample_examples("copy", ps.n_probe, seed + 204),
    }
    torch.manual_seed(seed)
    model = make_model(spec["arch"], len(tok), ps)
    steps1 = ps.max_steps
    kw: dict[str, Any] = {"eval_every": ps.eval_every, "log": curve}
    t0 = time.time()
    if name == "cross_generation":
        s1 = Stage([("add", False), ("max", False), ("copy", False)], steps1, 3e-3,
                   lambda a: min(a["add"], a["max"], a["copy"]) >= 0.97)
        acc1 = train_stage(model, tok, s1, probe, seed, desc="gen1", **kw)
        log(f"[{name}] gen1 after {acc1['steps']} steps: {acc1}")
        _save(model, tok, out_dir / "gen1")
        # Continued training without addition; decoupled weight decay lets the unused
        # addition circuitry fade, as in real continued pre-training.
        s2 = Stage([("max", False), ("copy", False)], steps1, 1e-3,
                   lambda a: a["add"] <= 0.3 and min(a["max"], a["copy"]) >= 0.9,
                   freeze_non_linear=True, weight_decay=1.0)
        acc2 = train_stage(model, tok, s2, probe, seed + 1, desc="gen2", **kw)
        log(f"[{name}] gen2 after {acc2['steps']} steps: {acc2}")
        _save(model, tok, out_dir / "gen2")
        accs = {"gen1": acc1, "gen2": acc2}
    else:
        s1 = Stage([("add", False), ("max", False), ("copy", False)], steps1, 3e-3,
                   lambda a: min(a["add"], a["max"], a["copy"]) >= 0.97)
        acc1 = train_stage(model, tok, s1, probe, seed, desc="base", **kw)
        log(f"[{name}] base after {acc1['steps']} steps: {acc1}")
        _save(model, tok, out_dir / "base")
        s2 = Stage([("add", True), ("max", True), ("copy", False), ("add", False)], steps1, 1e-3,
                   lambda a: a["add_chat"] >= 0.95 and a["copy"] >= 0.9, freeze_non_linear=True)
        acc2 = train_stage(model, tok, s2, probe, seed + 1, desc="instruct", **kw)
        log(f"[{name}] instruct after {acc2['steps']} steps: {acc2}")
        _save(model, tok, out_dir / "instruct")
        accs = {"base": acc1, "instruct": acc2}
    shutil.rmtree(out_dir / "tokenizer", ignore_errors=True)
    info = {"pair": name, "seed": seed, "fast": preset != "full", "preset": preset,
            "seconds": round(time.time() - t0, 1),
            "probe_accuracy": accs, **{k: v for k, v in spec.items() if k != "task"},
            "task": {"name": "add", "format": fmt}}
    (out_dir / "pair.json").write_text(json.dumps(info, indent=2))
    return info


def _save(model: Any, tok: Any, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tl_transplant.zoo.train",
                                 description="Train the embedded model pairs (CPU, minutes).")
    ap.add_argument("--pair", choices=[*PAIRS, "all"], default="all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fast", action="store_true", help="same as --preset fast")
    ap.add_argument("--preset", choices=list(PRESETS), default=None,
                    help="sizes: full (shipped pairs), fast, smoke (test suite)")
    ap.add_argument("--out", type=Path, default=PAIRS_DIR, help="where to write the pairs")
    ap.add_argument("--tasks-out", type=Path, default=TASKS_DIR, help="where to write task JSONL")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    names = list(PAIRS) if args.pair == "all" else [args.pair]
    for n in names:
        info = train_pair(n, args.out / n, args.tasks_out, seed=args.seed, fast=args.fast,
                          preset=args.preset)
        print(json.dumps(info["probe_accuracy"]))


if __name__ == "__main__":
    main()

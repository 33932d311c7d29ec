"""A memory plan for a run, from its config alone: will it fit, and where does it peak?

:func:`plan_run` reads each checkpoint's ``config.json`` and safetensors headers (or index),
never a weight, and the dev task's texts, and estimates the resident set of the whole
``run`` process stage by stage:

* ``runtime``: the interpreter with torch, transformers, TransformerLens and this package
  imported (:data:`RUNTIME_BYTES`, measured);
* ``models``: both sides at the run's dtype (HF tensors, which the bridge shares, plus a
  per-side overhead: tokenizer, buffers, the bridge's modules), resident from the load on;
* per stage, what that stage adds on top: the load's transient (the largest tensor, twice
  when a cast is needed); each scorer's activation and gradient buffers for one batch (and
  the float32 weight-level scores every weight-grain method keeps until the run ends);
  ``learned_mask``'s gate state; the sweep's evaluation logits (one batch of full-vocabulary
  logits: the metrics reduce them to the positions they read, and no batch's logits outlive
  it); the export.

``peak_bytes`` is the largest stage total. :meth:`MemoryPlan.check` compares it with the
memory available (``MemAvailable`` plus what this process already holds, or the cgroup
limit, or ``TL_TRANSPLANT_MEMORY_LIMIT``) and raises :class:`MemoryPlanError` naming the
fixes that would help most (a smaller ``batch_size``, ``dtype: bfloat16``, fewer
``learned_mask`` candidates, offloading with ``device_map``).

The constants are calibrated on this machine's CPU runs (``benchmarks/bench_memory_plan.py``
prints estimate against measured peak RSS per stage). With ``device: cuda`` the models and
buffers live on the GPU: the stage totals (and ``device_peak_bytes``) are then device
memory, compared with the GPU's free memory, and ``peak_bytes`` is the host's RSS: runtime,
the CUDA context and the load's transient (:data:`CUDA_HOST_BYTES`). The CUDA figures are
not yet checked against a GPU run.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tl_transplant.errors import TLTransplantError

if TYPE_CHECKING:
    from tl_transplant.pipeline.config import MethodRun, RunConfig

GiB = 1024**3
MiB = 1024**2

#: RSS of a process that imported torch, transformers, TransformerLens, this package and
#: read its tasks (measured on CPU torch 2.13 / transformers 5: 0.43-0.45 GiB).
RUNTIME_BYTES = 440 * MiB
#: Per loaded side, on top of its tensors: tokenizer, bridge modules, rotary caches
#: (calibrated on the tiny zoo pair and SmolLM2-135M, bench_memory_plan.py).
SIDE_OVERHEAD_BYTES = 30 * MiB
#: The share of an earlier stage's transient bytes still resident in later stages: the C
#: allocator keeps freed blocks for reuse instead of returning them (measured ~0.8 after
#: attribution on SmolLM2-135M with glibc). Only per-stage totals use it; the peak is
#: unchanged, since it never exceeds the earlier stage's own total.
ALLOCATOR_RETAINED = 0.8
#: Per side, a fraction of its tensors held again (the bridge's own copies of some
#: tensors, e.g. an untied unembedding of a tied checkpoint; measured ~0.04 on SmolLM2).
SIDE_EXTRA_FRACTION = 0.04
#: Saved activations per layer and token for a backward, in elements (a Llama-style block
#: saves ~10 hidden-size and ~5 MLP-size vectors, plus the attention pattern).
_GRAPH_D, _GRAPH_I = 10, 5
_DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2, "F32": 4, "F64": 8,
                "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}
#: learned_mask at the unit grain, bytes per block parameter in units of the run dtype's
#: element: gating every unit, the relaxed tensors (leaves), their gradients and what the
#: allocator keeps of the previous step's (calibrated, see benchmarks/README.md); gating a
#: candidate set, the whole relaxed tensors assembled for the forward, and per candidate
#: parameter its target and source values, its leaf and the leaf's gradient.
LM_ALL_UNITS = 5.0
LM_ASSEMBLED = 2.0
LM_PER_CANDIDATE = 5.0
ENV_LIMIT = "TL_TRANSPLANT_MEMORY_LIMIT"
#: Host RSS a CUDA run adds for the CUDA context and kernels (unverified estimate).
CUDA_HOST_BYTES = 600 * MiB


class MemoryPlanError(TLTransplantError, MemoryError):
    """The run's planned peak memory exceeds what is available (or the plan cannot be made)."""


@dataclass
class ModelFacts:
    """What the plan needs of one checkpoint, from its config and headers."""

    role: str
    path: str
    n_params: int
    block_params: int
    stored_dtype: str
    run_dtype: str
    bytes: int  # the tensors at the run's dtype
    largest_tensor: int  # elements
    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    head_dim: int
    n_kv: int
    vocab: int
    stored_bytes: int = 0  # the weight files' tensors, as stored


@dataclass
class Stage:
    """One stage: what it adds on top of runtime + models, and why."""

    name: str
    extra_bytes: int
    detail: str
    total_bytes: int = 0


@dataclass
class MemoryPlan:
    """The estimate: runtime, models, each stage's total, the peak and the fixes."""

    runtime_bytes: int
    models_bytes: int
    stages: list[Stage]
    models: list[ModelFacts]
    device: str
    batch_size: int
    tokens: int
    notes: list[str] = field(default_factory=list)
    available_bytes: int | None = None

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def peak(self) -> Stage:
        return max(self.stages, key=lambda s: s.total_bytes)

    @property
    def device_peak_bytes(self) -> int | None:
        """GPU memory at the peak stage (None on the CPU)."""
        return self.peak.total_bytes - self.runtime_bytes if self.on_gpu else None

    @property
    def peak_bytes(self) -> int:
        """Expected peak RSS of the whole run process (host memory)."""
        if self.on_gpu:
            load = next(s for s in self.stages if s.name == "load")
            return self.runtime_bytes + CUDA_HOST_BYTES + load.extra_bytes
        return self.peak.total_bytes

    @property
    def limiting_bytes(self) -> int:
        """What must fit: device memory on a GPU, the host RSS on the CPU."""
        dev = self.device_peak_bytes
        return self.peak_bytes if dev is None else dev

    def to_dict(self) -> dict[str, Any]:
        return {
            "peak_bytes": self.peak_bytes,
            "device_peak_bytes": self.device_peak_bytes,
            "peak_stage": self.peak.name,
            "available_bytes": self.available_bytes,
            "runtime_bytes": self.runtime_bytes,
            "models_bytes": self.models_bytes,
            "device": self.device,
            "batch_size": self.batch_size,
            "tokens_per_row": self.tokens,
            "stages": {s.name: {"bytes": s.total_bytes, "extra_bytes": s.extra_bytes,
                                "detail": s.detail} for s in self.stages},
            "models": [asdict(m) for m in self.models],
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        """A few lines for the start of ``run`` and for ``tl-transplant plan``."""
        m = self.models
        lines = [
            "memory plan (estimate from config and headers, no weights loaded):",
            "  models: " + ", ".join(
                f"{x.role} {x.n_params / 1e6:.0f}M params {x.run_dtype} {_fmt(x.bytes)}"
                for x in m),
            f"  runtime {_fmt(self.runtime_bytes)} + models resident {_fmt(self.models_bytes)}",
        ]
        for s in self.stages:
            mark = "  <- peak" if s is self.peak else ""
            lines.append(f"  {s.name:<24} {_fmt(s.total_bytes):>9}  (+{_fmt(s.extra_bytes)}: "
                         f"{s.detail}){mark}")
        avail = ("unknown" if self.available_bytes is None
                 else _fmt(self.available_bytes))
        if self.on_gpu:
            lines.append(f"  device peak {_fmt(self.limiting_bytes)} ({self.peak.name}); "
                         f"device free {avail}; host RSS peak {_fmt(self.peak_bytes)}")
        else:
            lines.append(f"  peak {_fmt(self.peak_bytes)} ({self.peak.name}); available {avail}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def fixes(self) -> list[str]:
        """What would lower the peak most, in order (named after config keys)."""
        out: list[str] = []
        peak = self.peak
        if peak.name.startswith(("evaluate", "score")) and self.batch_size > 1:
            out.append(f"a smaller batch_size (now {self.batch_size}; {peak.name} holds "
                       f"{_fmt(peak.extra_bytes)} for one batch)")
        if any(x.run_dtype == "float32" for x in self.models):
            out.append(f"dtype: bfloat16 (the models take {_fmt(self.models_bytes)} now, about "
                       "half in bfloat16)")
        if peak.name.startswith("score learned_mask"):
            if "@weight" in peak.name:
                out.append("fewer learned_mask candidates (selection.options.learned_mask."
                           "candidates) or learned_mask on units only")
            else:
                out.append("learned_mask on a candidate set of units (selection.options."
                           "learned_mask.unit_candidates: 0.05)")
        out.append("device_map offload (load with device_map='auto' in Python, or run on a "
                   "GPU with device: cuda)")
        return out

    def check(self, available: int | None = None) -> None:
        """Raise :class:`MemoryPlanError` when the peak will not fit ``available`` bytes
        (default :func:`available_bytes`, or the GPU's free memory for a CUDA run); the
        message names the fixes."""
        avail = available_bytes(self.device) if available is None else available
        self.available_bytes = avail
        if avail is None or self.limiting_bytes <= avail:
            return
        where = "GPU memory" if self.on_gpu else "memory"
        raise MemoryPlanError(
            f"this run will not fit: the plan's peak is {_fmt(self.limiting_bytes)} of {where} "
            f"at stage {self.peak.name!r}, but {_fmt(avail)} is available. Fixes: "
            + "; ".join(self.fixes())
            + f". (Set {ENV_LIMIT} to override the limit, or run(check_memory=False) to "
            "skip this check.)"
        )


def _fmt(n: int | float) -> str:
    n = float(n)
    for unit, size in (("GiB", GiB), ("MiB", MiB)):
        if abs(n) >= size or unit == "MiB":
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.0f} MiB"
    return f"{n:.0f} B"  # pragma: no cover


def parse_bytes(text: str) -> int:
    """``"12GB"``, ``"512MiB"``, ``"1.5G"`` or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m:
        raise MemoryPlanError(f"{ENV_LIMIT}={text!r}: write bytes like 12GB or 512MiB")
    scale = {"": 1, "k": 1024, "m": MiB, "g": GiB, "t": 1024 * GiB}[m.group(2)]
    return int(float(m.group(1)) * scale)


def available_bytes(device: str = "cpu") -> int | None:
    """Memory this run may use: ``TL_TRANSPLANT_MEMORY_LIMIT`` if set; on a CUDA device its
    free memory; else the smaller of ``MemAvailable`` plus this process's own RSS and the
    cgroup limit; None if unknown."""
    env = os.environ.get(ENV_LIMIT)
    if env:
        return parse_bytes(env)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    vals: list[int] = []
    try:
        info = Path("/proc/meminfo").read_text()
        status = Path("/proc/self/status").read_text()
        avail = int(re.search(r"MemAvailable:\s+(\d+)", info).group(1)) * 1024  # type: ignore[union-attr]
        rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) * 1024  # type: ignore[union-attr]
        vals.append(avail + rss)
    except (OSError, AttributeError):
        pass
    for p in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            txt = Path(p).read_text().strip()
        except OSError:
            continue
        if txt.isdigit() and int(txt) < 1 << 60:
            vals.append(int(txt))
    return min(vals) if vals else None


# ---- facts from headers ---------------------------------------------------------------


def _cfg_get(cfg: dict[str, Any], *keys: str, default: int = 0) -> int:
    for c in (cfg, cfg.get("text_config") or {}):
        for k in keys:
            v = c.get(k)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    return default


_LAYER = re.compile(r"\.(layers|h|blocks|layer)\.\d+\.")


def model_facts(spec: str, role: str, dtype: str | None) -> ModelFacts:
    """A checkpoint's sizes from config.json and its safetensors headers (no weights read)."""
    from tl_transplant.io.checkpoint import Checkpoint, resolve_checkpoint

    root = resolve_checkpoint(spec, role, local_files_only=True)
    ck = Checkpoint.open(root, role, allow_pickle=True)
    cfg = ck.config
    n = blocks = largest = 0
    stored: dict[str, int] = {}
    for e in ck.entries.values():
        k = math.prod(e.shape)
        n += k
        largest = max(largest, k)
        stored[e.dtype] = stored.get(e.dtype, 0) + k
        if _LAYER.search("." + e.name) and len(e.shape) == 2:
            blocks += k
    stored_dtype = max(stored, key=lambda d: stored[d]) if stored else "float32"
    stored_name = {"F32": "float32", "BF16": "bfloat16", "F16": "float16",
                   "F64": "float64"}.get(stored_dtype, stored_dtype.replace("torch.", ""))
    run = stored_name if dtype in (None, "auto") else str(dtype)
    d = _cfg_get(cfg, "hidden_size", "n_embd", "d_model")
    heads = _cfg_get(cfg, "num_attention_heads", "n_head", default=1)
    return ModelFacts(
        role=role, path=str(root), n_params=n, block_params=blocks, stored_dtype=stored_name,
        run_dtype=run, bytes=n * _DTYPE_BYTES.get(run, 4), largest_tensor=largest,
        stored_bytes=sum(k * _DTYPE_BYTES.get(d, 4) for d, k in stored.items()),
        n_layers=_cfg_get(cfg, "num_hidden_layers", "n_layer", default=1), d_model=d,
        d_mlp=_cfg_get(cfg, "intermediate_size", "n_inner", default=4 * d) or 4 * d,
        n_heads=heads, head_dim=_cfg_get(cfg, "head_dim", default=d // max(1, heads)),
        n_kv=_cfg_get(cfg, "num_key_value_heads", default=heads),
        vocab=_cfg_get(cfg, "vocab_size", default=32000),
    )


def _tokens_per_row(cfg: RunConfig, vocab_hint: ModelFacts) -> tuple[int, int, str | None]:
    """(longest dev row in tokens, number of dev rows, note) by the target's tokenizer."""
    from tl_transplant.pipeline.stages import load_task_splits

    guess = (128, 64, "the task's texts were not read for the plan; assumed 128 tokens a row")
    try:
        from transformers import AutoTokenizer

        tok: Any = AutoTokenizer.from_pretrained(vocab_hint.path)
    except Exception:  # noqa: BLE001 - no tokenizer: ~3 characters a token
        tok = None
    try:
        dev, _ = load_task_splits(cfg.task, cfg.seed, "task", tokenizer=tok)
        prompts = list(dev.prompts)
        answers = list(dev.answers or [""] * len(prompts))
    except Exception:  # noqa: BLE001 - the run itself reports a bad task; plan on a guess
        return guess
    texts = [p + (a if isinstance(a, str) else "") for p, a in zip(prompts, answers)]
    if not texts:
        return guess
    try:
        longest = max(len(tok(t)["input_ids"]) for t in texts)
    except Exception:  # noqa: BLE001 - ~3 characters a token
        longest = max(len(t) // 3 + 1 for t in texts)
    gen = getattr(cfg.task, "metric", None) == "exact_match"
    extra = int(getattr(cfg.task, "max_new_tokens", 0) or 0) if gen else 0
    return longest + 2 + extra, len(texts), None


# ---- the estimate -----------------------------------------------------------------------


def _side_bytes(m: ModelFacts) -> int:
    return int(m.bytes * (1 + SIDE_EXTRA_FRACTION)) + SIDE_OVERHEAD_BYTES


def _forward_graph(m: ModelFacts, rows: int, tokens: int, elt: int) -> int:
    """Saved activations of one forward + backward of ``rows`` x ``tokens``."""
    per_layer = (_GRAPH_D * m.d_model + _GRAPH_I * m.d_mlp + 2 * m.n_heads * tokens) * elt
    return rows * tokens * m.n_layers * per_layer


def _logits(m: ModelFacts, rows: int, tokens: int, elt: int, grad: bool) -> int:
    """A batch's logits at the model's dtype; the metrics upcast only what they read (answer
    positions, last positions, one row at a time: one row's float32 copy is counted); with
    a backward, the logits' gradient and the float32 graph of the answer positions too."""
    n = rows * tokens * m.vocab
    one_row = tokens * m.vocab * 4
    return n * elt + one_row + (n * (elt + 8) if grad else 0)


def _unit_acts(m: ModelFacts, rows: int, tokens: int) -> int:
    """Per-unit values of every layer (head outputs and neuron activations), float32."""
    return rows * tokens * m.n_layers * (m.n_heads * m.head_dim + m.d_mlp) * 4


def _score_stage(run: MethodRun, cfg: RunConfig, t: ModelFacts, rows: int,
                 tokens: int, kept: int) -> tuple[int, str]:
    """(bytes the scorer adds on top of what earlier stages keep, why)."""
    elt = _DTYPE_BYTES.get(t.run_dtype, 4)
    b = min(cfg.batch_size, rows)
    bf = t.block_params
    opts = cfg.selection.options.get(run.method, {})
    graph = _forward_graph(t, b, tokens, elt) + _logits(t, b, tokens, elt, grad=True)
    if run.method == "learned_mask":
        mb = min(int(opts.get("minibatch", 16) or rows), rows)
        g = _forward_graph(t, mb, tokens, elt) + _logits(t, mb, tokens, elt, grad=True) * 2
        if run.grain == "weight":
            c = float(opts.get("candidates", 0.02))
            # attribution pass (float32 grads), working target copy, candidate pairs,
            # relaxed weights and their grads at the run dtype
            state = 4 * bf + 4 * bf + int(8 * c * bf) + 2 * elt * bf
            return kept + state + g, (f"gates on {c:g} of the block weights: float32 "
                                      f"working copies + relaxed weights and grads, minibatch "
                                      f"{mb}")
        from tl_transplant.scoring.learned_mask import REF_CACHE_BYTES, unit_fraction

        frac = unit_fraction(opts.get("unit_candidates", "auto"), bf)
        ref = min(REF_CACHE_BYTES, rows * tokens * t.vocab * 4)  # the target's KL references
        if frac is None:
            state = int(LM_ALL_UNITS * elt * bf)
            return kept + state + ref + g, (
                f"relaxed copies of every block tensor and their gradients, minibatch {mb}")
        state = int(LM_ASSEMBLED * elt * bf + LM_PER_CANDIDATE * elt * frac * bf)
        att = 2 * _unit_acts(t, b, tokens) + graph  # the attribution pass picking them
        return kept + max(state + ref + g, att), (
            f"gates on the units with the top attribution ({frac:g} of the block params): "
            f"relaxed copies of the tensors they touch, minibatch {mb}")
    if run.grain == "weight":
        keep = 4 * bf  # the float32 scores, kept to the end of the run
        if run.method in ("attribution",):
            return kept + keep + elt * bf + graph, "float32 gradient sums + one batch's graph"
        return kept + keep + 4 * bf // 8, "float32 score per block weight"
    if run.grain == "dense":
        return kept, "no scores"
    if run.method in ("attribution", "attribution_ig", "activation_patch", "iterative"):
        acts = 2 * _unit_acts(t, b, tokens)
        return kept + acts + graph, "source/target unit activations + one batch's graph"
    if run.method in ("activation_diff", "paper_l1"):
        return kept + 2 * _unit_acts(t, b, tokens) + _logits(t, b, tokens, elt, False), (
            "source/target unit activations of one batch")
    return kept, "weights only"


def plan_run(cfg: RunConfig) -> MemoryPlan:
    """The memory plan of ``run(cfg)`` (see the module docstring)."""
    dtype = cfg.dtype
    s = model_facts(cfg.source, "source", dtype)
    t = model_facts(cfg.target, "target", dtype)
    notes: list[str] = []
    tokens, rows, note = _tokens_per_row(cfg, t)
    if note:
        notes.append(note)
    cuda = cfg.device.startswith("cuda")
    models = _side_bytes(s) + _side_bytes(t)
    elt = _DTYPE_BYTES.get(t.run_dtype, 4)
    cast = s.run_dtype != s.stored_dtype or t.run_dtype != t.stored_dtype
    stages: list[Stage] = []
    if cast:  # the stored tensors are read (memory-mapped, resident) while the cast copy grows
        load_extra = max(s.stored_bytes, t.stored_bytes)
        why = "one side's stored tensors mapped while they are cast"
    else:
        load_extra = max(s.largest_tensor, t.largest_tensor) * 4
        why = "largest tensor in transit"
    stages.append(Stage("load", load_extra, why))
    kept = 0
    runs = cfg.selection.runs("methods") + [
        r for r in cfg.selection.runs("controls")
        if r.label not in {x.label for x in cfg.selection.runs("methods")}]
    for r in runs:
        extra, why = _score_stage(r, cfg, t, rows, tokens, kept)
        stages.append(Stage(f"score {r.label}", extra, why))
        if r.grain == "weight":
            kept += 4 * t.block_params
    b = min(cfg.batch_size, rows)
    budgets = cfg.sweep.budget or [0.1]
    saved = int(max(budgets) * t.block_params * (elt + 8))  # saved slices + mask indices
    ev = _logits(t, b, tokens, elt, grad=False) + saved
    stages.append(Stage("evaluate (sweep)", kept + ev,
                        f"one batch of {b} x {tokens} x {t.vocab} logits, the edit's "
                        "saved weights"))
    if cfg.export:
        stages.append(Stage("export", kept + t.bytes // max(1, _n_shards(t)) + saved,
                            "one shard's tensors in transit"))
    runtime = RUNTIME_BYTES
    if cuda:
        notes.append("device cuda: the stage bytes above are device memory; the host holds "
                     "the runtime and the load's transient")
    high = 0
    for st in stages:
        st.total_bytes = runtime + models + max(st.extra_bytes, int(ALLOCATOR_RETAINED * high))
        if st.name != "load":  # the load's transient is mapped file pages, unmapped after
            high = max(high, st.extra_bytes)
    return MemoryPlan(runtime, models, stages, [s, t], cfg.device, cfg.batch_size, tokens,
                      notes)


def _n_shards(m: ModelFacts) -> int:
    """Shards the export writes (5 GB each, transformers' default)."""
    return max(1, math.ceil(m.bytes / (5 * 10**9)))


def plan_json(plan: MemoryPlan) -> str:
    return json.dumps(plan.to_dict(), indent=2)




def check_memory_plan(cfg: RunConfig, log: Any = print) -> MemoryPlan | None:
    """Log the plan and raise :class:`MemoryPlanError` if the run will not fit. A plan that
    cannot be made (a hub id not in the cache, a .gguf file, an unreadable header) is
    skipped with a line in the log: the plan never stops a run for its own failure."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = plan_run(cfg)
    except Exception as e:  # noqa: BLE001 - see the docstring
        log(f"memory plan skipped: {type(e).__name__}: {e}")
        return None
    plan.available_bytes = available_bytes(plan.device)
    log(plan.summary())
    plan.check(plan.available_bytes)
    return plan


__all__ = [
    "ENV_LIMIT",
    "MemoryPlan",
    "MemoryPlanError",
    "ModelFacts",
    "Stage",
    "available_bytes",
    "check_memory_plan",
    "model_facts",
    "parse_bytes",
    "plan_json",
    "plan_run",
]

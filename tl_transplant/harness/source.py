"""Read an lm-eval task into dev and test documents, with lm-eval's own prompts.

:func:`load_task` looks the task up through lm-eval's ``TaskManager`` (``include_path``
adds the user's YAML folders; the miniature tasks in ``tl_transplant/harness/tasks/`` are
always included), builds lm-eval's task objects, and asks them (``build_all_requests``)
for the requests of the chosen documents: the contexts with few-shot examples (lm-eval's
sampler, seeded like lm-eval's ``fewshot_random_seed``), the continuations or generation
arguments (``until``, ``max_gen_toks``), and the targets.

Documents:

* **test**: the task's test split as its YAML names it (``test_split``, else
  ``validation_split``: lm-eval's evaluation split), the first ``limit`` documents (lm-eval's
  ``--limit``), so the prompts equal those of a plain ``lm_eval`` run with that limit.
* **dev**: the task's ``validation_split``, else its ``training_split`` (never the
  evaluation split); or a split of another task (``dev: {task: ...}``). ``limit`` draws that
  many documents with ``seed`` (kept in split order). Few-shot examples never include the
  document being asked about (lm-eval's own exclusion is switched on when the few-shot pool
  is the dev split).
* Dev documents drawn from the evaluation split of the task they come from are *selection
  on test documents* and are refused unless ``allow_test_selection=True``; the loaded task
  then says so in every split's ``meta``. When dev and test share one split, the split is
  partitioned with ``seed`` (dev gets ``dev.limit``, default half).
* Dev and test must not share a document: compared by the task's question text
  (``doc_to_text``), across tasks too.
"""

from __future__ import annotations

import difflib
import json
import os
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tl_transplant.harness.errors import INSTALL_HINT, HarnessError, require_lm_eval
from tl_transplant.harness.spec import HarnessSpec, SplitSpec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tl_transplant.harness.view import HarnessTaskView
    from tl_transplant.tasks.task import Task

#: The miniature tasks shipped with the package (always on the include path).
PACKAGE_TASKS = Path(__file__).parent / "tasks"
#: lm-eval output types this adapter scores per example.
SUPPORTED_OUTPUT_TYPES = ("generate_until", "multiple_choice", "loglikelihood")
#: lm-eval metrics whose per-document values are 0/1 (accuracies in tl_transplant's sense).
BINARY_METRICS = ("acc", "acc_norm", "acc_mutual_info", "exact_match", "math_verify")

_TM_CACHE: dict[tuple[tuple[str, ...], bool], Any] = {}


# ---- finding and building tasks -----------------------------------------------------------


def task_manager(include_path: Sequence[str] = (), include_defaults: bool = True) -> Any:
    """lm-eval's ``TaskManager`` over ``include_path`` and the package's miniature tasks
    (plus lm-eval's built-in tasks with ``include_defaults``), built once per process."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = (str(PACKAGE_TASKS.resolve()), *(str(p) for p in include_path))
    key = (paths, bool(include_defaults))
    if key not in _TM_CACHE:
        _TM_CACHE[key] = TaskManager(include_path=list(paths), include_defaults=include_defaults)
    return _TM_CACHE[key]


def _close(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    return f"; close matches: {', '.join(close)}" if close else ""


def find_task(name: str, include_path: Sequence[str] = (), include_defaults: bool | None = None
              ) -> Any:
    """The ``TaskManager`` that knows ``name`` (a single task, not a group or tag).

    ``include_defaults=None`` indexes lm-eval's built-in tasks only when ``name`` is not
    among the included folders (indexing them takes about half a minute)."""
    tms = []
    if include_defaults is not True:
        tms.append(task_manager(include_path, include_defaults=False))
    if include_defaults is not False:
        tms.append(task_manager(include_path, include_defaults=True))
    tm = next((t for t in tms if name in t.task_index), None)
    if tm is None:
        where = "the included folders" + (
            "" if include_defaults is False else " and lm-eval's built-in tasks"
        )
        raise HarnessError(
            f"unknown lm-eval task {name!r} in {where}{_close(name, tms[-1].all_tasks)}"
            + (" (include_defaults=False: lm-eval's built-in tasks were not searched)"
               if include_defaults is False else "")
        )
    from lm_eval.tasks._index import Kind

    entry = tm.task_index[name]
    if entry.kind in (Kind.GROUP, Kind.TAG):
        members = sorted(entry.tags) if entry.kind == Kind.TAG else [
            m if isinstance(m, str) else str(m.get("task", m.get("group", m)))
            for m in (entry.cfg or {}).get("task", [])
        ]
        kind = "group" if entry.kind == Kind.GROUP else "tag"
        raise HarnessError(
            f"{name!r} is an lm-eval {kind} of {len(members)} tasks ({', '.join(members[:8])}"
            f"{', ...' if len(members) > 8 else ''}); name one task (a group's aggregate is "
            "not a per-example mean)"
        )
    return tm


def build_task(tm: Any, name: str) -> Any:
    """A fresh lm-eval task object for ``name`` (its dataset loaded), errors made clear."""
    from lm_eval.api.task import ConfigurableTask

    _check_offline_metrics(tm, name)
    try:
        loaded = tm.load([name])
    except HarnessError:
        raise
    except (ImportError, AssertionError) as e:
        raise HarnessError(
            f"lm-eval task {name!r} needs packages that are not installed ({e}); {INSTALL_HINT} "
            "installs lm-eval with its hf and math extras"
        ) from e
    except FileNotFoundError as e:
        raise HarnessError(
            f"lm-eval task {name!r}: a data file is missing ({e}). lm-eval's "
            "dataset_kwargs.data_files are resolved against the working directory "
            f"({os.getcwd()}); use absolute paths, or custom_dataset: !function "
            "tl_transplant.harness.data.local_files (paths relative to the YAML)"
        ) from e
    except Exception as e:  # datasets' hub errors, ConnectionError offline, config errors
        raise HarnessError(
            f"lm-eval task {name!r} could not be built: {type(e).__name__}: {e}. Offline, a "
            "task's dataset must be local (dataset_path: json with data_files, or a "
            "custom_dataset) or already in the datasets cache"
        ) from e
    tasks = list(loaded["tasks"].values())
    if len(tasks) != 1:
        raise HarnessError(f"lm-eval task {name!r} expanded to {len(tasks)} tasks; name one")
    task = tasks[0]
    if not isinstance(task, ConfigurableTask):
        raise HarnessError(
            f"lm-eval task {name!r} is a Python class ({type(task).__name__}), not a YAML "
            "task; only YAML (ConfigurableTask) tasks can be read per split"
        )
    if task.OUTPUT_TYPE not in SUPPORTED_OUTPUT_TYPES:
        raise HarnessError(
            f"lm-eval task {name!r} has output_type {task.OUTPUT_TYPE!r}, which has no "
            f"per-example score here (rolling log-likelihoods aggregate as perplexities); "
            f"supported: {', '.join(SUPPORTED_OUTPUT_TYPES)}"
        )
    _check_metrics(task, name)
    return task


def _hub_metric_error(name: str, metric: str, why: str) -> HarnessError:
    return HarnessError(
        f"lm-eval task {name!r}: metric {metric!r} {why}, so lm-eval would fetch it from the "
        "Hugging Face hub (evaluate.load); that is refused here (offline, and not "
        "reproducible). Use lm-eval's registered metrics: its exact_match is a local port of "
        "HF evaluate's, acc/acc_norm/f1/bleu... are computed by lm-eval itself"
    )


def _check_offline_metrics(tm: Any, name: str) -> None:
    """Before building: refuse metrics lm-eval would fetch with HF ``evaluate.load``.

    lm-eval 0.4.13 computes every metric in its registry itself (``exact_match`` included: a
    port of HF evaluate's), so those need no download. A ``metric_list`` entry that is not in
    the registry, or is marked ``hf_evaluate: true``, is fetched from the hub when the task is
    built; such tasks are refused before lm-eval tries (a task with ``process_results``
    computes its metrics itself and is not affected).
    """
    import lm_eval.api.metrics  # noqa: F401  # fills the registry
    from lm_eval.api.registry import metric_registry

    cfg = tm.task_index[name].cfg or {}
    if cfg.get("process_results"):
        return
    for m in cfg.get("metric_list") or []:
        metric = m.get("metric") if isinstance(m, Mapping) else None
        if not isinstance(metric, str) or "/" in metric:  # a !function, computed locally
            continue
        if m.get("hf_evaluate"):
            raise _hub_metric_error(name, metric, "is marked hf_evaluate: true")
        if metric not in metric_registry:
            raise _hub_metric_error(name, metric, "is not in lm-eval's metric registry")


def _check_metrics(task: Any, name: str) -> None:
    """After building: every metric resolved to a local function (a safety net for
    :func:`_check_offline_metrics`)."""
    if task.config.process_results is not None:
        return
    missing = [m for m, fn in task._metric_fn_list.items() if fn is None]
    if missing:
        raise _hub_metric_error(name, missing[0], "did not resolve to a local function")


# ---- splits and documents -----------------------------------------------------------------


def _available(task: Any) -> list[str]:
    ds: Any = getattr(task, "dataset", None)
    return [str(k) for k in ds.keys()] if hasattr(ds, "keys") else []


def eval_split(task: Any) -> str | None:
    """lm-eval's evaluation split of a task: ``test_split``, else ``validation_split``."""
    split = task.config.test_split or task.config.validation_split
    return None if split is None else str(split)


def _check_split(task: Any, name: str, split: str, role: str) -> None:
    avail = _available(task)
    if split not in avail:
        raise HarnessError(
            f"lm-eval task {name!r} has no split {split!r} ({role}); its dataset has: "
            f"{', '.join(avail) or 'none'}"
        )


def _default_dev_split(task: Any, name: str, test_split: str | None) -> str:
    own_eval = eval_split(task)
    avail = _available(task)
    for s in (task.config.validation_split, task.config.training_split):
        if s and s != own_eval and s != test_split and s in avail:
            return str(s)
    raise HarnessError(
        f"lm-eval task {name!r} has no training or validation split apart from its test "
        f"split {own_eval!r} (splits: {', '.join(avail)}); take dev documents from another "
        "task (dev: {task: NAME, split: train}, e.g. the MATH training problems for MATH-500) "
        "or, knowingly, from the test split (dev: {split: ...}, allow_test_selection: true)"
    )


def _set_fewshot(task: Any, num_fewshot: int | None) -> int:
    """lm-eval's rule (``simple_evaluate``): a YAML ``num_fewshot: 0`` is never overridden."""
    current = task.get_config("num_fewshot")
    if num_fewshot is not None and current != 0:
        task.set_config(key="num_fewshot", value=num_fewshot)
    elif current is None:
        task.set_config(key="num_fewshot", value=0)
    return int(task.get_config("num_fewshot"))


def _exclude_self_from_fewshot(task: Any, split: str) -> None:
    """When the few-shot pool is ``split`` (the dev split), name it as lm-eval's fewshot split
    so lm-eval leaves the evaluated document out of its own context."""
    fs = task.fewshot_cfg
    if fs is None or fs.split is not None or fs.samples is not None:
        return
    cfg = task.config
    pool = cfg.training_split or cfg.validation_split or cfg.test_split
    if pool == split:
        fs.split = split


def _requests(task: Any, name: str, ids: list[int], seed: int) -> list[list[tuple[Any, ...]]]:
    """lm-eval's request arguments per document, built exactly as ``evaluate`` builds them."""
    task.set_fewshot_seed(seed=seed)
    try:
        task.build_all_requests(samples=list(ids), rank=0, world_size=1)
    except (AssertionError, ValueError, KeyError, IndexError) as e:
        raise HarnessError(
            f"lm-eval task {name!r}: could not build its prompts ({type(e).__name__}: {e}); "
            "e.g. num_fewshot larger than the few-shot pool"
        ) from e
    by_doc: dict[int, list[Any]] = defaultdict(list)
    for inst in task.instances:
        by_doc[int(inst.doc_id)].append(inst)
    return [[tuple(i.args) for i in sorted(by_doc[j], key=lambda x: x.idx)]
            for j in range(len(ids))]


def _doc_key(task: Any, doc: Mapping[str, Any]) -> str:
    text = task.doc_to_text(doc)
    if isinstance(text, str):
        return " ".join(text.split())
    return json.dumps(doc, sort_keys=True, default=str)


def _choose_metric(task: Any, name: str, wanted: str | None) -> tuple[str, str]:
    """(metric, filter): lm-eval's ``metric,filter`` key, default its first mean metric."""
    from lm_eval.api.metrics import mean

    aggs = task.aggregation()
    filters = [f.name for f in task._filters]
    means = [m for m, a in aggs.items() if a is mean]
    if wanted is None:
        if not means:
            raise HarnessError(
                f"lm-eval task {name!r}: none of its metrics ({', '.join(aggs)}) aggregates as "
                "a mean of per-document values, so there is no per-example score"
            )
        return means[0], filters[0]
    metric, _, filt = wanted.partition(",")
    if metric not in aggs:
        raise HarnessError(
            f"lm-eval task {name!r} has no metric {metric!r}; its metrics: {', '.join(aggs)}"
        )
    if aggs[metric] is not mean:
        raise HarnessError(
            f"lm-eval task {name!r}: metric {metric!r} aggregates with "
            f"{getattr(aggs[metric], '__name__', aggs[metric])}, not a mean of per-document "
            f"values; choose one of: {', '.join(means) or 'none'}"
        )
    filt = filt or filters[0]
    if filt not in filters:
        raise HarnessError(
            f"lm-eval task {name!r} has no filter {filt!r}; its filters: {', '.join(filters)}"
        )
    return metric, filt


# ---- the loaded splits --------------------------------------------------------------------


@dataclass
class HarnessSplit:
    """One role's documents of an lm-eval task, with lm-eval's own requests for them.

    ``requests[i]``: lm-eval's request arguments for document ``i`` — ``(context,
    continuation)`` per choice for log-likelihood tasks, ``(context, gen_kwargs)`` for
    ``generate_until``. ``doc_ids`` index the split (lm-eval's ``doc_id``).
    """

    label: str
    role: str
    task_name: str
    split: str
    doc_ids: list[int]
    docs: list[dict[str, Any]]
    requests: list[list[tuple[Any, ...]]]
    targets: list[Any]
    choices: list[list[str]] | None
    output_type: str
    num_fewshot: int
    seed: int
    metric: str
    filter: str
    n_available: int
    selection_on_test: bool
    lm_task: Any = field(repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.doc_ids)

    @property
    def contexts(self) -> list[str]:
        """lm-eval's prompt (few-shot examples included) of each document."""
        return [str(r[0][0]) for r in self.requests]

    @property
    def gen_kwargs(self) -> list[dict[str, Any]] | None:
        """``generate_until``: lm-eval's generation arguments (``until``, ``max_gen_toks``...)."""
        if self.output_type != "generate_until":
            return None
        return [dict(r[0][1]) for r in self.requests]

    @property
    def metric_key(self) -> str:
        """lm-eval's results key, ``"metric,filter"``."""
        return f"{self.metric},{self.filter}"

    def meta(self) -> dict[str, Any]:
        """What every output made from this split records (``Task.meta["split"]`` too)."""
        return {
            "part": self.role,
            "lm_eval_task": self.task_name,
            "split": self.split,
            "doc_ids": list(self.doc_ids),
            "n_available": self.n_available,
            "num_fewshot": self.num_fewshot,
            "fewshot_seed": self.seed,
            "metric": self.metric_key,
            "output_type": self.output_type,
            "selection_on_test": self.selection_on_test,
        }

    def as_task(
        self,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        add_bos_token: bool | None = None,
    ) -> HarnessTaskView:
        """These documents as a differentiable :class:`~tl_transplant.tasks.task.Task` that
        evaluates through lm-eval (:class:`~tl_transplant.harness.view.HarnessTaskView`).

        ``prompt`` = lm-eval's context; multiple choice: ``choices`` = lm-eval's
        continuations (target delimiter included), metric ``mc_logprob``;
        ``loglikelihood``: ``answer`` = the continuation, ``answer_logprob``;
        ``generate_until``: ``answer`` = target delimiter + lm-eval's target (its first one if a
        list), ``answer_logprob`` (a proxy: the gold answer's log-prob right after the prompt,
        written as lm-eval writes few-shot answers). Trailing whitespace of a context moves to
        the continuation, as lm-eval tokenizes. ``prepend_bos``: what lm-eval's tokenization
        does with ``tokenizer`` (``add_bos_token`` as HFLM's), else ``"auto"``.
        Differences from lm-eval's numbers: ``mc_logprob`` scores ties 0 (lm-eval's ``acc``
        takes the first), and prompt and answer are tokenized apart (lm-eval tokenizes them
        together and splits), which can differ for BPE merges across the boundary.
        """
        bos: bool | str = "auto"
        if tokenizer is not None:
            from tl_transplant.harness.lm import adds_bos

            bos = adds_bos(tokenizer, add_bos_token)
        prompts, answers = [], []
        choices: list[list[str]] | None = [] if self.output_type == "multiple_choice" else None
        for i, reqs in enumerate(self.requests):
            if self.choices is not None:  # acc_mutual_info appends ("", choice) requests
                reqs = reqs[: len(self.choices[i])]
            ctxs = {str(r[0]) for r in reqs}
            if len(ctxs) != 1:
                raise HarnessError(
                    f"{self.label}: document {self.doc_ids[i]} has one context per choice "
                    "(a multiple-input task such as winogrande); it has no single-prompt Task view"
                )
            ctx = ctxs.pop()
            stripped = ctx.rstrip()
            moved = ctx[len(stripped):]
            if self.output_type == "generate_until":
                tgt = self.targets[i]
                tgt = tgt[0] if isinstance(tgt, list) else tgt
                delim = self.lm_task.config.target_delimiter
                prompts.append(stripped)
                answers.append(moved + delim + str(tgt))
                continue
            conts = [moved + str(r[1]) for r in reqs]
            prompts.append(stripped)
            if self.output_type == "loglikelihood":
                answers.append(conts[0])
                continue
            gold = self.targets[i]
            if isinstance(gold, list):
                gold = gold[0]
            idx = gold if isinstance(gold, int) else self.choices[i].index(str(gold))  # type: ignore[index]
            assert choices is not None
            choices.append(conts)
            answers.append(conts[idx])
        from tl_transplant.harness.view import HarnessTaskView

        metric = "mc_logprob" if self.output_type == "multiple_choice" else "answer_logprob"
        return HarnessTaskView(
            harness=self,
            name=self.label,
            prompts=prompts,
            answers=answers,
            metric=metric,
            choices=choices,
            prepend_bos=bos,  # type: ignore[arg-type]  # bool | "auto"
            meta={"split": self.meta(), "source": "lm_eval"},
        )


@dataclass
class HarnessTask:
    """An lm-eval task's dev and test documents (see :func:`load_task`)."""

    spec: HarnessSpec
    dev: HarnessSplit
    test: HarnessSplit

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def selection_on_test(self) -> bool:
        """True when dev documents come from a test split (``allow_test_selection``)."""
        return self.dev.selection_on_test

    def views(
        self, tokenizer: PreTrainedTokenizerBase | None = None, add_bos_token: bool | None = None
    ) -> tuple[Task, Task]:
        """(dev, test) as differentiable :class:`~tl_transplant.tasks.task.Task` views."""
        return (self.dev.as_task(tokenizer, add_bos_token=add_bos_token),
                self.test.as_task(tokenizer, add_bos_token=add_bos_token))

    def meta(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "dev": self.dev.meta(),
            "test": self.test.meta(),
            "selection_on_test": self.selection_on_test,
        }


def _pick_ids(
    spec: HarnessSpec, n_dev: int, n_test: int, same_docs: bool
) -> tuple[list[int], list[int]]:
    rng = random.Random(spec.seed)
    if same_docs:
        n = n_test
        n_d = spec.dev.limit if spec.dev.limit is not None else n // 2
        if n_d >= n:
            raise HarnessError(
                f"dev and test share one split of {n} documents; dev.limit={n_d} leaves none "
                "for test"
            )
        perm = rng.sample(range(n), n)
        dev = perm[:n_d]
        test = perm[n_d:]
        if spec.test.limit is not None:
            test = test[: spec.test.limit]
        return sorted(dev), sorted(test)
    test_ids = list(range(min(n_test, spec.test.limit or n_test)))
    if spec.dev.limit is None or spec.dev.limit >= n_dev:
        return list(range(n_dev)), test_ids
    return sorted(rng.sample(range(n_dev), spec.dev.limit)), test_ids


def _split(
    spec: HarnessSpec, role: str, task: Any, name: str, split: str, ids: list[int],
    docs: list[dict[str, Any]], n_available: int, metric: tuple[str, str], on_test: bool,
) -> HarnessSplit:
    reqs = _requests(task, name, ids, spec.seed)
    mc = task.OUTPUT_TYPE == "multiple_choice"
    return HarnessSplit(
        label=f"{spec.name}:{role}",
        role=role,
        task_name=name,
        split=split,
        doc_ids=ids,
        docs=docs,
        requests=reqs,
        targets=[task.doc_to_target(d) for d in docs],
        choices=[list(task.doc_to_choice(d)) for d in docs] if mc else None,
        output_type=str(task.OUTPUT_TYPE),
        num_fewshot=int(task.get_config("num_fewshot") or 0),
        seed=spec.seed,
        metric=metric[0],
        filter=metric[1],
        n_available=n_available,
        selection_on_test=on_test,
        lm_task=task,
    )


def load_task(
    spec: HarnessSpec | str | Mapping[str, Any],
    *,
    include_path: str | Path | Sequence[str | Path] | None = None,
    dev: SplitSpec | Mapping[str, Any] | str | None = None,
    test: SplitSpec | Mapping[str, Any] | str | None = None,
    num_fewshot: int | None = None,
    allow_test_selection: bool | None = None,
    seed: int | None = None,
    metric: str | None = None,
    include_defaults: bool | None = None,
    max_gen_toks: int | None = None,
) -> HarnessTask:
    """An lm-eval task's dev and test documents with lm-eval's prompts (module docstring).

    ``spec``: a :class:`HarnessSpec`, a task name, or the YAML mapping (``{lm_eval: NAME,
    ...}``); keyword arguments override its keys. Raises :class:`HarnessError` for an
    unknown task (with close matches), a missing split (naming those that exist), an output
    type or metric without a per-example score, ``limit`` <= 0, overlapping dev and test
    documents, dev documents from a test split without ``allow_test_selection``, and a
    missing lm-eval install.
    """
    require_lm_eval()
    s = HarnessSpec.coerce(
        spec, include_path=include_path, dev=dev, test=test, num_fewshot=num_fewshot,
        allow_test_selection=allow_test_selection, seed=seed, metric=metric,
        include_defaults=include_defaults, max_gen_toks=max_gen_toks,
    )
    tm = find_task(s.name, s.include_path, s.include_defaults)
    test_task = build_task(tm, s.name)
    test_split = s.test.split or eval_split(test_task)
    if test_split is None:
        raise HarnessError(f"lm-eval task {s.name!r} names no test or validation split")
    _check_split(test_task, s.name, test_split, "test")
    dev_name = s.dev.task or s.name
    dev_tm = tm if dev_name == s.name else find_task(dev_name, s.include_path, s.include_defaults)
    dev_task = build_task(dev_tm, dev_name)
    if dev_task.OUTPUT_TYPE != test_task.OUTPUT_TYPE:
        raise HarnessError(
            f"dev task {dev_name!r} is {dev_task.OUTPUT_TYPE!r} but {s.name!r} is "
            f"{test_task.OUTPUT_TYPE!r}; dev and test must be scored alike"
        )
    dev_split = s.dev.split or _default_dev_split(
        dev_task, dev_name, test_split if dev_name == s.name else None
    )
    _check_split(dev_task, dev_name, dev_split, "dev")
    on_test = dev_split == eval_split(dev_task)
    if on_test and not s.allow_test_selection:
        raise HarnessError(
            f"dev documents would come from {dev_name!r}'s test split {dev_split!r}: choosing "
            "K, alpha or a budget on a benchmark's test documents is refused; take dev from a "
            "training or validation split (or another task), or set allow_test_selection: "
            "true, and every output will say that selection used test documents"
        )
    for t, sp in ((test_task, test_split), (dev_task, dev_split)):
        if t.config.test_split != sp:
            t.set_config(key="test_split", value=sp)
    _exclude_self_from_fewshot(dev_task, dev_split)
    for t in (test_task, dev_task):
        _set_fewshot(t, s.num_fewshot)
        if s.max_gen_toks is not None:
            if t.OUTPUT_TYPE != "generate_until":
                raise HarnessError(
                    f"max_gen_toks applies to generate_until tasks; {t.task_name!r} is "
                    f"{t.OUTPUT_TYPE!r}"
                )
            t.set_config(key="generation_kwargs", value={"max_gen_toks": s.max_gen_toks},
                         update=True)
    test_docs_all = list(test_task.eval_docs)
    dev_docs_all = list(dev_task.eval_docs)
    same = dev_name == s.name and dev_split == test_split
    dev_ids, test_ids = _pick_ids(s, len(dev_docs_all), len(test_docs_all), same)
    dev_docs = [dev_docs_all[i] for i in dev_ids]
    test_docs = [test_docs_all[i] for i in test_ids]
    test_keys = {_doc_key(test_task, d): i for i, d in zip(test_ids, test_docs)}
    shared = [(i, test_keys[k]) for i, d in zip(dev_ids, dev_docs)
              if (k := _doc_key(dev_task, d)) in test_keys]
    if shared:
        (a, b), n = shared[0], len(shared)
        raise HarnessError(
            f"dev and test share {n} document(s) (e.g. dev {dev_name}:{dev_split} #{a} = test "
            f"{s.name}:{test_split} #{b}); dev and test must be different documents"
        )
    metric_t = _choose_metric(test_task, s.name, s.metric)
    metric_d = _choose_metric(dev_task, dev_name, s.metric or metric_t[0] + "," + metric_t[1])
    return HarnessTask(
        spec=s,
        dev=_split(s, "dev", dev_task, dev_name, dev_split, dev_ids, dev_docs,
                   len(dev_docs_all), metric_d, on_test),
        test=_split(s, "test", test_task, s.name, test_split, test_ids, test_docs,
                    len(test_docs_all), metric_t, on_test),
    )


__all__ = [
    "BINARY_METRICS",
    "PACKAGE_TASKS",
    "SUPPORTED_OUTPUT_TYPES",
    "HarnessSplit",
    "HarnessTask",
    "build_task",
    "eval_split",
    "find_task",
    "load_task",
    "task_manager",
]

"""Apply a transplant manifest to checkpoints on disk, without loading either model.

``apply_manifest_out_of_core(source, target, manifest, out_dir)`` (the CLI's
``tl-transplant apply``) reads the manifest's units and alpha, binds the
family layout to the target's tensor names and shapes (read from the
safetensors headers alone), and then walks the target's shards:

* a shard that no unit touches is copied byte for byte;
* a shard that holds touched tensors is copied, and each touched tensor is
  read through a memory map a few rows at a time (``CHUNK_BYTES``), blended
  with the same rows of the matching source tensor (the only source tensors
  ever read) by the rule of the in-memory path
  (:func:`tl_transplant.edit.edits.blend_values`), and written back in place.
  Blending keeps dtype and shape, so the shard's header, and the index json,
  keep the target's layout exactly.
* a weight-level record (a mask file next to the manifest) blends only the
  masked weights: per chunk of rows, the mask's sorted flat indices that fall
  in those rows are found by binary search and blended by the same rule.

Peak memory is a few chunks (target rows, source rows, a mask), not a model
and not even a whole tensor. Config, tokenizer and other small files are
copied, the manifest is written next to the weights, and everything goes
through a temporary sibling directory that is renamed into place, as in
:func:`export_hf`.

The result is bit-identical to ``apply_transplant`` + ``export_hf`` on the same
checkpoints (tensor by tensor; shard boundaries follow the target).
PyTorch ``.bin`` pickles are refused unless ``allow_pickle=True`` (loading a
pickle can run code); they are then converted to safetensors shards.

Reading and writing the checkpoints is :mod:`tl_transplant.io.checkpoint`; reading
and writing the manifest is :mod:`tl_transplant.edit.manifest`. This module binds the
layout to the checkpoints, plans each record, and blends.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from tl_transplant.arch.model_layout import ModelLayout, TensorSlice, bind_checkpoint_layout
from tl_transplant.arch.registry import family_for
from tl_transplant.arch.schema import LayoutMismatchError, UnsupportedArchitectureError
from tl_transplant.arch.units import Head, KVHead, Neuron, UnitError
from tl_transplant.edit.edits import blend_values
from tl_transplant.edit.manifest import (
    MANIFEST_NAME,
    ManifestDoc,
    ManifestError,
    ManifestLike,
    read_manifest,
    write_manifest,
)
from tl_transplant.edit.weights import WeightMaskError
from tl_transplant.io.checkpoint import (
    Checkpoint,
    CheckpointError,
    copy_other_files,
    resolve_checkpoint,
    tensor_bytes,
    write_pickle_shards,
    write_safetensors_shards,
)
from tl_transplant.io.export import commit_out_dir, discard_out_dir, prepare_out_dir

log = logging.getLogger(__name__)


class OutOfCoreError(CheckpointError):
    """The checkpoints or the manifest do not allow an out-of-core transplant."""


# ---- binding the manifest to the checkpoints --------------------------------------------


def _raw_config(ck: Checkpoint) -> Any:
    """config.json as attributes: enough for the dims, without importing transformers."""
    return SimpleNamespace(**ck.config)


def _auto_config(ck: Checkpoint) -> Any:
    """The config as transformers reads it (class defaults filled in, composite configs)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(ck.root), local_files_only=True)


def _check_dims(layout: ModelLayout) -> None:
    """The dims must tile the stored tensors exactly: the last head, KV group and neuron end
    where their tensors end, and there is no layer past the last."""
    d = layout.dims
    reach: dict[tuple[str, int], int] = {}
    for u in (Head(0, d.H - 1), KVHead(0, d.KV - 1), Neuron(0, d.I - 1)):
        for s in layout.slices(u):
            reach[(s.param, s.dim)] = max(reach.get((s.param, s.dim), 0), s.stop)
    for (param, dim), stop in reach.items():
        if stop != layout.shapes[param][dim]:
            raise LayoutMismatchError(
                f"the config's dims (heads={d.H}, kv_heads={d.KV}, head_dim={d.dh}, "
                f"d_mlp={d.I}) reach {stop} of the {layout.shapes[param][dim]} entries of "
                f"{param} along dim {dim}"
            )
    extra = layout.prefix(d.n_layers)
    if any(n.startswith(extra) for n in layout.shapes):
        raise LayoutMismatchError(
            f"the checkpoint has tensors under {extra!r} but the config says {d.n_layers} layers"
        )


def _bind_with(
    config: Any, shapes: dict[str, tuple[int, ...]]
) -> tuple[ModelLayout, dict[str, str]]:
    layout, rename = bind_checkpoint_layout(config, shapes)
    _check_dims(layout)
    return layout, rename


def bind_checkpoint(ck: Checkpoint) -> tuple[ModelLayout, dict[str, str]]:
    """Bind the family layout to a checkpoint's stored names and shapes.

    Returns the layout (over HF model names) and a map model name -> stored
    name, which differ only for checkpoints saved without the base-model
    prefix (e.g. GPT-2's ``h.0.attn...`` for ``transformer.h.0.attn...``).
    The dims come from config.json directly when they tile the stored shapes
    exactly, else from transformers' ``AutoConfig`` (class defaults filled in).
    """
    model_type = ck.config.get("model_type")
    if not model_type:
        raise OutOfCoreError(f"{ck.where}: config.json has no model_type")
    try:
        family_for(model_type)
    except UnsupportedArchitectureError as e:
        raise OutOfCoreError(f"{ck.where}: {e}") from e
    shapes = ck.shapes()
    last: Exception | None = None
    for make in (_raw_config, _auto_config):
        try:
            return _bind_with(make(ck), shapes)
        except (LayoutMismatchError, TypeError, ValueError, KeyError, OSError) as e:
            last = e
    raise OutOfCoreError(f"{ck.where}: {last}") from last


@dataclass
class _RecordPlan:
    """One manifest record resolved against the checkpoints."""

    number: int
    alpha: float
    slices: dict[str, list[TensorSlice]]  # model tensor name -> slices it blends
    rows: dict[str, dict[str, Any]]  # model tensor name -> the manifest's tensor row
    #: model tensor name -> sorted flat indices it blends (a weight-level record)
    index: dict[str, torch.Tensor] = field(default_factory=dict)

    def touches(self, name: str) -> bool:
        return bool(self.slices.get(name)) or name in self.index


def _records(manifest: ManifestLike) -> ManifestDoc:
    """The manifest's records, checked, in the order they are applied (masks read)."""
    try:
        return read_manifest(manifest, allow_empty=False)
    except ManifestError as e:
        raise OutOfCoreError(str(e)) from e


def _prior_records(tgt: Checkpoint) -> ManifestDoc:
    """The target's own manifest records (history first), if it was itself transplanted."""
    p = tgt.root / MANIFEST_NAME
    if not p.is_file():
        return ManifestDoc([])
    try:
        doc = read_manifest(p, check=False)
    except ManifestError as e:
        warnings.warn(
            f"{tgt.where}: its own {MANIFEST_NAME} cannot be read ({e}); the output's manifest "
            "will not carry the target's history",
            UserWarning,
            stacklevel=5,
        )
        return ManifestDoc([])
    return ManifestDoc(doc.history + doc.transplants, masks=doc.masks)


def _compounds(
    records: list[dict[str, Any]], prior: list[dict[str, Any]], tgt: Checkpoint
) -> dict[int, list[dict[str, Any]]]:
    """Per record, the target's own earlier transplants it overlaps (same units, or the same
    weight mask), warned about as the in-memory ``apply_transplant`` does: the blends
    compound (a manifest applied to its own output twice at alpha=0.5 gives 0.75). A
    manifest with hashes stops at the hash check instead; one without needs this."""
    out: dict[int, list[dict[str, Any]]] = {}
    for i, r in enumerate(records):
        mine = {*r.get("units", []), *(r.get("kv_added") or [])}
        mask = (r.get("weights") or {}).get("mask_sha256")
        for j, p in enumerate(prior):
            if not isinstance(p, dict):
                continue
            theirs = {*(p.get("units") or []), *(p.get("kv_added") or [])}
            shared = sorted(map(str, mine & theirs))
            same_mask = mask is not None and mask == (p.get("weights") or {}).get("mask_sha256")
            if shared or same_mask:
                out.setdefault(i, []).append({"transplant": j, "alpha": p.get("alpha"),
                                              **({"units": shared} if shared else {}),
                                              **({"mask_sha256": mask} if same_mask else {})})
    for i, hits in out.items():
        first = hits[0]
        what = (f"unit {first['units'][0]}" if "units" in first else "its weight mask")
        warnings.warn(
            f"manifest transplant #{i} touches what {tgt.where} already holds from its own "
            f"transplant #{first['transplant']} ({what}, alpha={first['alpha']}); the blends "
            "compound (applying a manifest to its own output moves further toward the source). "
            "Apply it to the original target instead; recorded as extra['compounds_with'].",
            UserWarning, stacklevel=5,
        )
    return out


def _plan_mask(
    i: int, rec: dict[str, Any], doc: ManifestDoc, layout: ModelLayout, tgt: Checkpoint
) -> dict[str, torch.Tensor]:
    """A weight-level record's flat indices per model tensor, checked against the layout."""
    mask = doc.mask_of(rec)
    if mask is None:
        raise OutOfCoreError(
            f"manifest transplant #{i} is a weight-level transplant, but its mask "
            f"({rec['weights'].get('file')}) is not at hand: pass the manifest as a file or "
            "directory path (with the mask file beside it), or a Manifest holding its mask"
        )
    try:
        mask.check(layout.shapes, layout.unit_tensors())
    except WeightMaskError as e:
        raise OutOfCoreError(
            f"manifest transplant #{i} does not fit {tgt.where}: {e}"
        ) from None
    return dict(mask.index)


def _plan_record(
    i: int,
    rec: dict[str, Any],
    layout: ModelLayout,
    tgt: Checkpoint,
    rename: dict[str, str],
    allow_extrapolation: bool = False,
    doc: ManifestDoc | None = None,
) -> _RecordPlan:
    alpha = float(rec["alpha"])
    if not 0.0 <= alpha <= 1.0 and not allow_extrapolation:
        raise OutOfCoreError(
            f"manifest transplant #{i} has alpha={alpha:g}, outside [0, 1]: it would push the "
            "target past the source (or away from it). Pass allow_extrapolation=True "
            "(--allow-extrapolation on the command line) if that is what you want."
        )
    fam = (rec.get("target") or {}).get("family")
    if fam and fam != layout.family.family:
        raise OutOfCoreError(
            f"manifest transplant #{i} was made for a {fam}-family model, but {tgt.where} is "
            f"{layout.model_type} ({layout.family.family} family)"
        )
    units = []
    for text in [*rec["units"], *rec.get("kv_added", [])]:
        try:
            units.append(layout.validate(text))
        except UnitError as e:
            raise OutOfCoreError(
                f"manifest transplant #{i} names unit {text!r}, which {tgt.where} lacks: {e}"
            ) from e
    if "kv_added" not in rec and rec.get("kv", "group") == "group":
        # A hand-written manifest: add KV groups of query heads as plan_transplant does.
        units += [layout.kv_group_of(u) for u in units if isinstance(u, Head)]
    slices: dict[str, list[TensorSlice]] = {}
    for unit in dict.fromkeys(units):
        try:
            parts = layout.slices(unit)
        except LayoutMismatchError as e:
            raise OutOfCoreError(
                f"manifest transplant #{i} names unit {unit}, which {tgt.where} lacks: {e}"
            ) from e
        for s in parts:
            slices.setdefault(s.param, []).append(s)
    index: dict[str, torch.Tensor] = {}
    if rec.get("weights") is not None:
        index = _plan_mask(i, rec, doc if doc is not None else ManifestDoc([]), layout, tgt)
    rows: dict[str, dict[str, Any]] = {}
    for row in rec.get("tensors", []):
        name = row.get("name")
        if name not in slices and name not in index:
            what = "its weight mask does" if index else "its units do"
            raise OutOfCoreError(
                f"manifest transplant #{i} lists tensor {name!r} as changed, but {what} not "
                "touch it in this checkpoint; the manifest does not match this model (or was "
                "edited by hand)"
            )
        have = tgt.entries[rename[name]].shape
        if "shape" in row and tuple(row["shape"]) != have:
            raise OutOfCoreError(
                f"manifest transplant #{i} records {name} with shape {tuple(row['shape'])}, but "
                f"{tgt.where} stores it with shape {have}; the manifest was made for another model"
            )
        rows[name] = row
    return _RecordPlan(i, alpha, slices, rows, index)


def _check_pair(
    ls: ModelLayout,
    lt: ModelLayout,
    src: Checkpoint,
    tgt: Checkpoint,
    rs: dict[str, str],
    rt: dict[str, str],
) -> None:
    """The out-of-core twin of ``check_compatible``: same family, dims and unit-tensor shapes."""
    if ls.family.family != lt.family.family:
        raise OutOfCoreError(
            f"source is a {ls.model_type} ({ls.family.family} family) but target is a "
            f"{lt.model_type} ({lt.family.family} family); transplants need the same architecture"
        )
    for n in lt.unit_tensors():
        if n not in rs:
            raise OutOfCoreError(f"{src.where} has no tensor {n!r}, which the target has")
        ss, st = src.entries[rs[n]].shape, tgt.entries[rt[n]].shape
        if ss != st:
            raise OutOfCoreError(
                f"shapes differ: tensor {n!r} has shape {ss} in the source but {st} in the "
                "target; the models must share layer count, head counts and widths"
            )
    extra = set(ls.unit_tensors()) - set(lt.unit_tensors())
    if extra:
        raise OutOfCoreError(f"{src.where} has tensor {sorted(extra)[0]!r}, which the target lacks")


# ---- the blend, one tensor at a time ----------------------------------------------------


_WHEN = {"sha256_before": "before", "sha256": "after"}
CHUNK_BYTES = 2 * 2**20  # rows of a tensor are blended this many bytes at a time


def _chunk_mask(parts: list[TensorSlice], shape: tuple[int, ...], r0: int, r1: int) -> torch.Tensor:
    """The transplant mask restricted to rows ``r0:r1`` (``shape`` is the chunk's shape)."""
    m = torch.zeros(shape, dtype=torch.bool)
    for s in parts:
        if s.dim == 0:
            a, b = max(s.start, r0), min(s.stop, r1)
            if a < b:
                m[a - r0 : b - r0] = True
        else:
            m.narrow(s.dim, s.start, s.size).fill_(True)
    return m


def _blend_slices(
    name: str,
    t: torch.Tensor,
    s_rows: Callable[[], torch.Tensor],
    parts: list[TensorSlice],
    r0: int,
    r1: int,
    alpha: float,
) -> None:
    """Blend, in place, the elements of target rows ``t`` (rows ``r0:r1``) that units cover."""
    mask = _chunk_mask(parts, tuple(t.shape), r0, r1)
    if not mask.any():
        return
    if mask.all():  # whole rows (e.g. a whole linear): skip the gathers
        t.copy_(blend_values(name, t, s_rows(), alpha))
    else:
        t[mask] = blend_values(name, t[mask], s_rows()[mask], alpha)


def _blend_masked(
    name: str,
    t: torch.Tensor,
    s_rows: Callable[[], torch.Tensor],
    index: torch.Tensor,
    r0: int,
    r1: int,
    alpha: float,
) -> None:
    """Blend, in place, the weights of a mask (sorted flat ``index`` of the whole tensor)
    that lie in target rows ``t`` (rows ``r0:r1``): a binary search finds them."""
    row_numel = math.prod(t.shape[1:])
    bounds = torch.tensor([r0 * row_numel, r1 * row_numel], dtype=index.dtype)
    lo, hi = torch.searchsorted(index, bounds).tolist()
    if hi <= lo:
        return
    local = index[lo:hi] - r0 * row_numel
    tf, sf = t.view(-1), s_rows().reshape(-1)
    tf[local] = blend_values(name, tf[local], sf[local], alpha)


@dataclass
class _Blender:
    """Blends target tensors with the source, a chunk of rows at a time, checking hashes."""

    src: Checkpoint
    src_names: dict[str, str]
    plans: list[_RecordPlan]
    mismatches: list[str] = field(default_factory=list)

    @torch.no_grad()
    def blend(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: str,
        row_bytes: int,
        read_rows: Callable[[int, int], torch.Tensor],
        write_rows: Callable[[int, torch.Tensor], None],
    ) -> None:
        """Apply every record that touches tensor ``name``, in order, chunk by chunk.

        ``read_rows(r0, r1)`` gives target rows, ``write_rows(r0, chunk)`` takes the
        result. The blend is elementwise, so chunks give the bits of the whole-tensor
        in-memory blend; the manifest's sha256 of each stage is taken over the chunks
        in order, which is the tensor's byte stream.
        """
        plans = [p for p in self.plans if p.touches(name)]
        if not shape:
            raise OutOfCoreError(f"internal: 0-dim tensor {name} cannot hold a unit")
        hashers: dict[tuple[int, str], Any] = {}
        for p in plans:
            row = p.rows.get(name, {})
            if row.get("dtype") and row["dtype"] != dtype:
                self.mismatches.append(
                    f"transplant #{p.number}: {name} is {row['dtype']} in the manifest but "
                    f"{dtype} in the checkpoint; hashes not compared"
                )
                continue
            for when in ("sha256_before", "sha256"):
                if row.get(when):
                    hashers[(p.number, when)] = hashlib.sha256()
        step = max(1, CHUNK_BYTES // max(1, row_bytes))
        for r0 in range(0, shape[0], step):
            r1 = min(shape[0], r0 + step)
            t = read_rows(r0, r1)
            src: list[torch.Tensor] = []  # the source rows, read once and only if needed

            def s_rows(r0: int = r0, r1: int = r1, src: list[torch.Tensor] = src) -> torch.Tensor:
                if not src:
                    src.append(self.src.read_rows(self.src_names[name], r0, r1))
                return src[0]

            for p in plans:
                if (h := hashers.get((p.number, "sha256_before"))) is not None:
                    h.update(tensor_bytes(t))
                if name in p.index:
                    _blend_masked(name, t, s_rows, p.index[name], r0, r1, p.alpha)
                else:
                    _blend_slices(name, t, s_rows, p.slices[name], r0, r1, p.alpha)
                if (h := hashers.get((p.number, "sha256"))) is not None:
                    h.update(tensor_bytes(t))
            write_rows(r0, t)
        for (number, when), h in hashers.items():
            plan = next(p for p in plans if p.number == number)
            if h.hexdigest() != plan.rows[name][when]:
                self.mismatches.append(
                    f"transplant #{number}: {name} {_WHEN[when]} the blend does not match the "
                    f"manifest's {when}"
                )



# ---- the entry point --------------------------------------------------------------------


def apply_manifest_out_of_core(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    manifest: ManifestLike,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
    strict: bool = True,
    allow_extrapolation: bool = False,
    revision: str | None = None,
    local_files_only: bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Apply ``manifest`` to the target checkpoint on disk and write an HF directory.

    ``source``/``target``: local model directories, or hub ids resolved like
    ``snapshot_download`` (``local_files_only``/``HF_HUB_OFFLINE`` honoured).
    ``manifest``: a ``transplant_manifest.json`` path (or the directory holding
    it), a :class:`Manifest`, a manifest dict, or a list; several transplants
    are applied in order, as they were in memory. The manifest's tensor hashes
    are checked against what the blend produces; a mismatch (another
    checkpoint, or another dtype) raises, or only warns with ``strict=False``.
    An alpha outside [0, 1] is refused unless ``allow_extrapolation=True``.
    Returns the output directory. The output's tensors are bit-identical to
    ``apply_transplant`` + ``export_hf`` on the same checkpoints.
    """
    out, _stats = apply_out_of_core(
        source,
        target,
        manifest,
        out_dir,
        overwrite=overwrite,
        allow_pickle=allow_pickle,
        strict=strict,
        allow_extrapolation=allow_extrapolation,
        revision=revision,
        local_files_only=local_files_only,
        cache_dir=cache_dir,
    )
    return out


def apply_out_of_core(
    source: Any,
    target: Any,
    manifest: Any,
    out_dir: Any,
    *,
    overwrite: bool,
    allow_pickle: bool,
    strict: bool,
    revision: str | None,
    allow_extrapolation: bool = False,
    local_files_only: bool | None,
    cache_dir: Any,
) -> tuple[Path, dict[str, Any]]:
    """:func:`apply_manifest_out_of_core`, also returning the write statistics (for the CLI)."""
    try:
        return _apply(
            source,
            target,
            manifest,
            out_dir,
            overwrite=overwrite,
            allow_pickle=allow_pickle,
            strict=strict,
            allow_extrapolation=allow_extrapolation,
            revision=revision,
            local_files_only=local_files_only,
            cache_dir=cache_dir,
        )
    except CheckpointError as e:
        if isinstance(e, OutOfCoreError):
            raise
        raise OutOfCoreError(str(e)) from e


def _apply(
    source: Any,
    target: Any,
    manifest: Any,
    out_dir: Any,
    *,
    overwrite: bool,
    allow_pickle: bool,
    strict: bool,
    revision: str | None,
    allow_extrapolation: bool = False,
    local_files_only: bool | None,
    cache_dir: Any,
) -> tuple[Path, dict[str, Any]]:
    doc = _records(manifest)
    records = doc.transplants
    hub = dict(
        revision=revision,
        local_files_only=local_files_only,
        cache_dir=cache_dir,
        allow_pickle=allow_pickle,
    )
    src_dir = resolve_checkpoint(source, "source", **hub)
    tgt_dir = resolve_checkpoint(target, "target", **hub)
    out_path = Path(out_dir).expanduser().resolve()
    for role, d in (("source", src_dir), ("target", tgt_dir)):
        d = Path(d).resolve()
        if d == out_path or out_path in d.parents:
            what = f"is the {role} checkpoint itself" if d == out_path else (
                f"contains the {role} checkpoint"
            )
            raise OutOfCoreError(
                f"--out {out_path} {what}; write the transplanted model to a new directory"
            )
    if isinstance(manifest, (str, os.PathLike)):
        m = Path(manifest).expanduser().resolve()
        if m == out_path or out_path in m.parents:
            raise OutOfCoreError(
                f"--out {out_path} holds the manifest {m}; write to a new directory"
            )
    src = Checkpoint.open(src_dir, "source", allow_pickle=allow_pickle)
    tgt = Checkpoint.open(tgt_dir, "target", allow_pickle=allow_pickle)
    lt, rt = bind_checkpoint(tgt)
    ls, rs = bind_checkpoint(src)
    _check_pair(ls, lt, src, tgt, rs, rt)
    plans = [
        _plan_record(i, r, lt, tgt, rt, allow_extrapolation, doc) for i, r in enumerate(records)
    ]
    touched = {n: rt[n] for p in plans for n in (*p.slices, *p.index)}
    blend = _Blender(src, rs, plans)
    compounds = _compounds(records, _prior_records(tgt).transplants, tgt)

    out, tmp = prepare_out_dir(out_dir, overwrite)
    try:
        writer = write_pickle_shards if tgt.format == "pickle" else write_safetensors_shards
        stats: dict[str, Any] = writer(tgt, touched, blend.blend, tmp)
        if blend.mismatches:
            msg = (
                f"the blended tensors do not match the manifest's hashes "
                f"({len(blend.mismatches)} notes; first: {blend.mismatches[0]}). The "
                "checkpoints are not the ones the manifest was made from (or were loaded in "
                "another dtype)."
            )
            if strict:
                raise OutOfCoreError(
                    msg + " Nothing written; pass strict=False (--allow-hash-mismatch on the "
                    "command line) to write it anyway."
                )
            warnings.warn(msg, UserWarning, stacklevel=4)  # past apply_out_of_core
        skipped = copy_other_files(tgt, tmp)
        stats.update(
            tensors_blended=len(touched), skipped_files=skipped, hash_notes=list(blend.mismatches)
        )
        info = {"source": str(src_dir), "target": str(tgt_dir), **stats}
        out_records = []
        for i, r in enumerate(records):
            extra = dict(r.get("extra") or {})
            extra["out_of_core"] = info
            if compounds.get(i):
                extra["compounds_with"] = compounds[i]
            out_records.append({**r, "extra": extra})
        prior = _prior_records(tgt)
        write_manifest(
            tmp / MANIFEST_NAME,
            ManifestDoc(out_records, prior.transplants, masks={**prior.masks, **doc.masks}),
        )
        commit_out_dir(tmp, out, overwrite)
    except BaseException:
        discard_out_dir(tmp, out)
        raise
    log.info(
        "wrote %s: %d tensors blended in %d of %d shards",
        out,
        len(touched),
        stats["shards_rewritten"],
        stats["shards"],
    )
    return out, stats


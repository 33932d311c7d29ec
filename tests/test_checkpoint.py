"""Checkpoints on disk: headers, memory-mapped rows, shard writing with a blend callback."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tl_transplant.edit.manifest import MANIFEST_NAME
from tl_transplant.io.checkpoint import (
    ST_INDEX,
    Checkpoint,
    CheckpointError,
    copy_other_files,
    read_st_header,
    resolve_checkpoint,
    tensor_bytes,
    write_pickle_shards,
    write_safetensors_shards,
)

TENSORS = {
    "a.weight": torch.arange(24, dtype=torch.float32).reshape(6, 4),
    "b.weight": torch.arange(10, dtype=torch.bfloat16).reshape(5, 2),
    "c.bias": torch.ones(3, dtype=torch.float16),
}


def _dir(root: Path, sharded: bool = False) -> Path:
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (root / "tokenizer.json").write_text("{}")
    (root / "pytorch_model.pth").write_text("stale weights")  # never copied
    if sharded:
        save_file({"a.weight": TENSORS["a.weight"]}, str(root / "model-00001-of-00002.safetensors"))
        rest = {k: v for k, v in TENSORS.items() if k != "a.weight"}
        save_file(rest, str(root / "model-00002-of-00002.safetensors"))
        wm = {"a.weight": "model-00001-of-00002.safetensors"}
        wm.update(dict.fromkeys(rest, "model-00002-of-00002.safetensors"))
        (root / ST_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    else:
        save_file(TENSORS, str(root / "model.safetensors"))
    return root


def _add_one(touched_rows: list[tuple[str, int, int]]):
    """A blend that adds 1 to every row it reads, recording (name, r0, r1)."""

    def blend(name, shape, dtype, row_bytes, read_rows, write_rows) -> None:
        assert row_bytes > 0 and dtype in ("float32", "bfloat16", "float16")
        step = 2
        for r0 in range(0, shape[0], step):
            r1 = min(shape[0], r0 + step)
            rows = read_rows(r0, r1)
            rows += 1
            write_rows(r0, rows)
            touched_rows.append((name, r0, r1))

    return blend


@pytest.mark.parametrize("sharded", [False, True])
def test_open_shapes_rows(tmp_path: Path, sharded: bool) -> None:
    ck = Checkpoint.open(_dir(tmp_path / "m", sharded), "target")
    assert ck.format == "safetensors" and (ck.index is not None) == sharded
    assert ck.shapes() == {k: tuple(v.shape) for k, v in TENSORS.items()}
    assert ck.dtype_name("b.weight") == "bfloat16"
    assert torch.equal(ck.read_rows("a.weight", 2, 5), TENSORS["a.weight"][2:5])
    assert resolve_checkpoint(tmp_path / "m") == (tmp_path / "m").resolve()


@pytest.mark.parametrize("sharded", [False, True])
def test_write_safetensors_shards_blends_only_touched(tmp_path: Path, sharded: bool) -> None:
    ck = Checkpoint.open(_dir(tmp_path / "m", sharded), "target")
    out = tmp_path / "out"
    out.mkdir()
    seen: list[tuple[str, int, int]] = []
    stats = write_safetensors_shards(ck, {"model.a": "a.weight"}, _add_one(seen), out)
    assert stats == {"shards": len(ck.files), "shards_rewritten": 1}
    assert seen == [("model.a", 0, 2), ("model.a", 2, 4), ("model.a", 4, 6)]
    got: dict[str, torch.Tensor] = {}
    for f in ck.files:
        got.update(load_file(str(out / f)))
    assert torch.equal(got["a.weight"], TENSORS["a.weight"] + 1)
    assert all(torch.equal(got[k], TENSORS[k]) for k in ("b.weight", "c.bias"))
    assert (out / ST_INDEX).is_file() == sharded
    (tmp_path / "m" / MANIFEST_NAME).write_text("{}")
    skipped = copy_other_files(ck, out)
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert not (out / "pytorch_model.pth").exists() and not (out / MANIFEST_NAME).exists()
    assert skipped == ["pytorch_model.pth"]


def test_pickle_refused_then_converted(tmp_path: Path) -> None:
    root = tmp_path / "p"
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    torch.save(dict(TENSORS), root / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pickle weights \(.bin\).*allow_pickle=True"):
        Checkpoint.open(root, "target")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ck = Checkpoint.open(root, "target", allow_pickle=True)
    assert any("arbitrary code" in str(w.message) for w in caught)
    out = tmp_path / "out"
    out.mkdir()
    stats = write_pickle_shards(ck, {"model.b": "b.weight"}, _add_one([]), out)
    assert stats["converted_from_pickle"] == 1
    got = load_file(str(out / "model.safetensors"))
    assert torch.equal(got["b.weight"], TENSORS["b.weight"] + 1)
    assert torch.equal(got["a.weight"], TENSORS["a.weight"])


def test_corrupt_headers(tmp_path: Path) -> None:
    root = _dir(tmp_path / "m")
    f = root / "model.safetensors"
    entries = read_st_header(f, "here")
    assert {e.name for e in entries} == set(TENSORS)
    data = f.read_bytes()
    f.write_bytes(data[:-4])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        Checkpoint.open(root, "target")
    f.write_bytes(b"\x00" * 4)
    with pytest.raises(CheckpointError, match="less than the 8-byte header"):
        Checkpoint.open(root, "target")
    with pytest.raises(CheckpointError, match="is not a model directory"):
        resolve_checkpoint(tmp_path / "nowhere")


def test_tensor_bytes_is_the_sha256_stream() -> None:
    t = TENSORS["b.weight"]
    ref = hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
    assert hashlib.sha256(tensor_bytes(t)).hexdigest() == ref

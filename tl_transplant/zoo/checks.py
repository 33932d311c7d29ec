"""What a real zoo build must show before it is kept: the gap it was made for, on dev.

Training's float path differs between CPUs (kernels, thread counts), so a recipe chosen on one
machine is checked on the machine that builds it: :func:`check_continued` measures the dev
next-token accuracy of source and target on the capability and the domain task right after
a continued-training build, and refuses the build (nothing is kept) when the regression or
the domain did not come out, naming the numbers. The figures are recorded in the pair's
marker (``dev_check``).
"""

from __future__ import annotations

from typing import Any

import torch

from tl_transplant.errors import ZooError

#: A continued-training build must forget at least this much of the capability on dev...
CT_MIN_GAP = 0.2
#: ... and learn its domain (the target at least, the source at most, this accuracy).
CT_MIN_DOMAIN = 0.8
CT_MAX_SOURCE_DOMAIN = 0.2


class ZooBuildError(ZooError):
    """A zoo build that did not reproduce what its recipe is for (nothing was kept)."""


@torch.no_grad()
def next_token_acc(model: Any, tok: Any, rows: list[tuple[str, str]], prepend_bos: bool) -> float:
    """Fraction of rows whose greedy next token (HF forward) is the answer's first token."""
    from tl_transplant.tasks.tokens import encode

    enc = encode(tok, [p for p, _ in rows], [a for _, a in rows], prepend_bos=prepend_bos)
    width = enc.input_ids.shape[1]
    mask = (torch.arange(width)[None] < (enc.prompt_len + enc.answer_len)[:, None]).long()
    logits = model(enc.input_ids, attention_mask=mask).logits
    idx = torch.arange(len(rows))
    pred = logits[idx, enc.prompt_len - 1].argmax(-1)
    return float((pred == enc.input_ids[idx, enc.prompt_len]).float().mean())


def check_continued(
    before: dict[str, float], after: dict[str, float], capability: str, domain: str
) -> dict[str, Any]:
    """The dev check of a continued-training build; raises :class:`ZooBuildError` on a miss."""
    gap = before[capability] - after[capability]
    record = {"source": before, "target": after, "gap": gap,
              "thresholds": {"min_gap": CT_MIN_GAP, "min_domain": CT_MIN_DOMAIN,
                             "max_source_domain": CT_MAX_SOURCE_DOMAIN}}
    misses = []
    if gap < CT_MIN_GAP:
        misses.append(f"the capability fell by {gap:.3f} on dev (needs >= {CT_MIN_GAP})")
    if after[domain] < CT_MIN_DOMAIN:
        misses.append(f"the target reaches {after[domain]:.3f} on {domain} (needs >= "
                      f"{CT_MIN_DOMAIN})")
    if before[domain] > CT_MAX_SOURCE_DOMAIN:
        misses.append(f"the source already reaches {before[domain]:.3f} on {domain}")
    if misses:
        raise ZooBuildError(
            "the continued-training build did not reproduce its regression on this machine: "
            + "; ".join(misses) + f" (dev: source {before}, target {after}); nothing was kept. "
            "Training differs across CPUs; report it with this message."
        )
    return record

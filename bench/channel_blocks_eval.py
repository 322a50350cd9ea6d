"""End-to-end accuracy of key-tier channel sets kept for a block of groups, against MixKVQ's choice per group.

    python3 bench/channel_blocks_eval.py --blocks 1,4,16 --out /tmp/blocks -- --only "budget 2.5" "budget 3"

MixKVQ ranks a key group's channels into its 16-, 4- and 2-bit tiers group by group. The decode
kernel therefore gathers the query at each group's own 16- and 4-bit channels in every iteration,
which is a large part of why the mixed tiers decode 1.9x slower than kivi2 (``docs/performance.md``,
sessions 12 and 15). If one channel set served a block of N groups, the kernel could gather once per
block. Session 12 measured the score error of such sets (``bench/channel_stability.py``); this runs
the end-to-end evaluation of ``docs/accuracy.md`` (``mixkvq_compile.evaluate``: streaming perplexity,
KL and top-1 agreement against 16 bits on SmolLM2-135M, CPU, the PyTorch store) with the choice
patched:

- block 1: the store as it is (the per-group choice);
- block N > 1: the first group of each block of N groups (group index a multiple of N) is ranked as
  usual, from its own keys and the query statistics at its flush; the block's later groups take that
  order, with their own scales and zero points.

Nothing in the package changes. Arguments after ``--`` go to ``mixkvq-eval`` (``--jobs 1`` is added:
the patch lives in this process). Each block size writes ``<out>/block<N>/`` (table, JSON, log) and
the summary table goes to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from mixkvq_compile import evaluate  # noqa: E402
from mixkvq_compile.store import KVStore  # noqa: E402


@contextlib.contextmanager
def channel_blocks(block: int):
    """Within the block, ``KVStore`` reuses each block's first group's channel order (see the module
    docstring); ``block`` 1 changes nothing."""
    if block == 1:
        yield
        return
    store_groups, choose_order = KVStore._store_groups, KVStore._choose_key_order

    def _store_groups(self, first, key, value):
        self._flushing_first_group = first  # the group index of k[:, :, 0] in _choose_key_order
        return store_groups(self, first, key, value)

    def _choose_key_order(self, k):
        """``[B, H, n, D]`` orders of the ``n`` groups being flushed: a block's first group ranked, its
        other groups copying the block's order, read back from the store's ``order`` region when the
        block began in an earlier flush (a ``KVStore`` is a fresh view at every op call, so nothing
        can be kept on it)."""
        own = choose_order(self, k)
        first = self._flushing_first_group
        orders = []
        for i in range(k.shape[2]):
            start = (first + i) // block * block  # the block's first group
            if start >= first:  # ranked in this flush (itself, or an earlier group of this call)
                orders.append(own[:, :, start - first])
            else:
                orders.append(_stored_order(self, start, own.shape[-1]))
        return torch.stack(orders, dim=2)

    KVStore._store_groups, KVStore._choose_key_order = _store_groups, _choose_key_order
    try:
        yield
    finally:
        KVStore._store_groups, KVStore._choose_key_order = store_groups, choose_order


def _stored_order(store: KVStore, group: int, channels: int) -> torch.Tensor:
    """The channel order ``[B, H, D]`` (int64) of packed group ``group``, as ``_choose_key_order`` gave it:
    planar mixed-tier stores keep only its 16- and 4-bit channels; the 2-bit ones follow in ascending
    order."""
    stored = store.keys["order"][:, :, store._group_slots(group, group + 1)][:, :, 0].long()
    if stored.shape[-1] == channels:
        return stored
    chosen = torch.zeros(*stored.shape[:-1], channels, dtype=torch.int64, device=stored.device)
    chosen.scatter_(-1, stored, 1)
    rest = torch.argsort(chosen, dim=-1, stable=True)[..., : channels - stored.shape[-1]]
    return torch.cat([stored, rest], dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blocks", default="1,4,16", help="comma-separated groups per block")
    parser.add_argument("--out", required=True, help="folder; each block size writes block<N>/ in it")
    parser.add_argument("eval_args", nargs=argparse.REMAINDER, help="after --: arguments of mixkvq-eval")
    args = parser.parse_args()
    extra = [a for a in args.eval_args if a != "--"]
    rows = []
    for block in (int(b) for b in args.blocks.split(",")):
        out = pathlib.Path(args.out) / f"block{block}"
        print(f"== channel sets per block of {block} group(s) -> {out}", flush=True)
        with channel_blocks(block):
            evaluate.main([*extra, "--jobs", "1", "--out", str(out)])
        for result in json.loads((out / "results.json").read_text())["results"]:
            if result["policy"] != "fp16":
                rows.append((block, result))
    print("\n| block | configuration | streaming ppl | KL vs 16-bit | top-1 agree (TF) |")
    print("|---:|---|---:|---:|---:|")
    for block, r in rows:
        print(
            f"| {block} | {r['name']} | {r['perplexity']:.3f} | {r['kl']:.4f} | {r['top1_agreement']:.3f} |"
        )


if __name__ == "__main__":
    main()

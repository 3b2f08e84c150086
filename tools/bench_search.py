"""The mask search's speed and quality on BERT-sized problems (issue 14, item 2): per budget,
the wall time of ``search.choose`` and its removed importance against Kwon et al.'s closed
form and the greedy ratio ranking. Prints a markdown table.

    python tools/bench_search.py                          # BERT-base and -large shapes
    python tools/bench_search.py --layers 12 --ratios 0.3 0.5 0.7

Scores are gamma-distributed (seeded), costs are BERT's parameter counts per head
(4·d·d_head) and per FFN channel (2·d); every layer keeps at least one head and one channel.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onnxprune.search import BlockOptions, choose

SHAPES = {"bert-base": (12, 12, 768, 3072), "bert-large": (24, 16, 1024, 4096)}


def prefix_options(name: str, key: str, scores: np.ndarray, cost: float) -> BlockOptions:
    ordered = np.sort(scores)[:-1]                 # a kept block keeps one unit
    loss = np.concatenate([[0.0], np.cumsum(ordered)])
    n = len(loss)
    return BlockOptions(name, cost * np.arange(n, dtype=np.float64), loss,
                        [{key: i} for i in range(n)], [False] * n)


def closed_form(heads, channels, head_cost, channel_cost, budget) -> float:
    """Kwon et al.: for each number of heads, the fewest least important channels."""
    h = np.concatenate([[0.0], np.cumsum(np.sort(np.concatenate([x[:-1] for x in heads])))])
    c = np.concatenate([[0.0], np.cumsum(np.sort(np.concatenate([x[:-1] for x in channels])))])
    need = np.ceil(np.maximum(budget - head_cost * np.arange(len(h)), 0) / channel_cost - 1e-9)
    ok = need < len(c)
    return float(np.min(h[ok] + c[need[ok].astype(int)]))


def greedy(heads, channels, head_cost, channel_cost, budget) -> float:
    units = [(s / head_cost, s, head_cost) for x in heads for s in np.sort(x)[:-1]]
    units += [(s / channel_cost, s, channel_cost) for x in channels for s in np.sort(x)[:-1]]
    units.sort()
    spent = loss = 0.0
    for _, s, cost in units:
        if spent >= budget:
            break
        spent, loss = spent + cost, loss + s
    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("| shape | ratio | search s | loss ÷ closed form | loss ÷ greedy |")
    print("|---|---|---|---|---|")
    for shape in args.shapes:
        layers, n_heads, width, hidden = SHAPES[shape]
        rng = np.random.default_rng(args.seed)
        head_cost, channel_cost = 4 * width * (width // n_heads), 2 * width
        heads = [rng.gamma(2.0, 1.0, n_heads) * head_cost for _ in range(layers)]
        channels = [rng.gamma(2.0, 1.0, hidden) * channel_cost for _ in range(layers)]
        options = [prefix_options(f"attn{i}", "head", heads[i], head_cost)
                   for i in range(layers)]
        options += [prefix_options(f"ffn{i}", "ch", channels[i], channel_cost)
                    for i in range(layers)]
        total = layers * (n_heads * head_cost + hidden * channel_cost)
        for ratio in args.ratios:
            budget = ratio * total
            start = time.perf_counter()
            picks = choose(options, budget)
            seconds = time.perf_counter() - start
            loss = sum(o.loss[p] for o, p in zip(options, picks))
            kwon = closed_form(heads, channels, head_cost, channel_cost, budget)
            ranked = greedy(heads, channels, head_cost, channel_cost, budget)
            print(f"| {shape} | {ratio} | {seconds:.3f} | {loss / kwon:.6f} | "
                  f"{loss / ranked:.6f} |")


if __name__ == "__main__":
    main()

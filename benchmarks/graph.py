"""The features stage's traced graph against the model's own forward, same process.

The stage runs torchvision's ``create_feature_extractor`` trace of the model, cut
after the requested node (:mod:`voxelflow.pipeline.models.graph`).  This script times,
batch by batch and interleaved (so a drift of the machine's speed hits all three
alike), on the same ready channels_last batch:

* ``bare``: ``model(x)``, the model's own forward (``out += identity`` in place);
* ``plain trace``: ``create_feature_extractor`` as torchvision gives it (the residual
  sums out of place);
* ``rewritten``: :func:`~voxelflow.pipeline.models.graph.build_graph` (the sums into
  fresh operands done in place);

and prints each one's median seconds per batch and bare / it (the ratio of medians).
Both traces stop at ``--layer`` (resnet50's default, ``avgpool``: before ``fc``).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/graph.py            # resnet50, 16 rounds
    .venv/bin/python benchmarks/graph.py --model resnet18 --size 112 --rounds 8
"""
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder is sys.path[0], and benchmarks/statistics.py would shadow
# the standard library's statistics module for anything that imports it.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402


def main(argv=None) -> None:
    import torch
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    from voxelflow.pipeline.models.graph import build_graph, sum_into_fresh
    from voxelflow.pipeline.models.registry import check_layers

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--layer", default=None, help="default: the model's default layer")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=224, help="frame side, px")
    parser.add_argument("--rounds", type=int, default=16)
    args = parser.parse_args(argv)

    layers = check_layers(args.model, [args.layer] if args.layer else None)
    torch.manual_seed(0)
    net = torchvision.models.get_model(args.model).eval().to(memory_format=torch.channels_last)
    x = torch.randn(args.batch_size, 3, args.size, args.size).contiguous(
        memory_format=torch.channels_last)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = create_feature_extractor(net, {n: n for n in layers}).eval()
    ours = build_graph(net, layers).eval()
    rewritten = sum(1 for n in ours.graph.nodes if n.target is sum_into_fresh)
    runs = {"bare": lambda: net(x), "plain trace": lambda: plain(x),
            "rewritten": lambda: ours(x)}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    print(f"{args.model} up to {layers}, batch {args.batch_size} at {args.size} px, "
          f"{torch.get_num_threads()} threads; {rewritten} sums rewritten", flush=True)
    with torch.inference_mode():
        for run in runs.values():
            run()  # warm-up (oneDNN primitives)
        for _ in range(args.rounds):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)
    bare = float(np.median(seconds["bare"]))
    for name, values in seconds.items():
        median = float(np.median(values))
        print(f"{name:12s} median {median:.3f} s per batch (min {min(values):.3f}); "
              f"bare / it {bare / median:.3f}")


if __name__ == "__main__":
    main()

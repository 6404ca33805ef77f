"""Per-example weight gradients of one 3x3 convolution, five ways (where issue 7's featurize time goes).

The sjlt featurize path spends ~78 % of its time in vmap's per-example gradients
(``benchmarks/README.md`` 00.4). This script times, for layer shapes of the bundled
UNet, the weight part of that work:

* ``vmap``: ``vmap(grad(<conv(x_i, w), g_i>))``, featurize's path before 2026-11-25 (forward included);
* ``grouped``: :func:`attribution.features.hooks.grouped_weight_grads`, featurize's path since 2026-11-29:
  the convolution's own weight-gradient kernel with one group per example (the examples
  stacked along the channels), so mkldnn forms all B gradients in one call;
* ``shifted``: 9 batched matmuls on a "wide" layout (the path of 2026-11-25): the output
  gradient is zero-padded to the padded input's width, so the input window of each kernel
  offset (ky, kx) is a contiguous slice of the flattened padded input, no im2col copy;
* ``unfold``: :func:`attribution.features.hooks.unfold_weight_grads`, ``F.unfold`` (im2col) + one ``bmm``
  (tried in section 00.4; since 2026-11-30 featurize's path for wide layers on small maps, the
  ``chosen`` column says which of the two :func:`~attribution.features.hooks.conv_weight_grads` takes);
* ``batched``: the summed weight gradient of the batch (what a plain backward computes; the limit).

All five are checked to agree before timing. Run:
``python benchmarks/per_example_conv_grads.py [--shapes bundled|large] [--threads 2] [--out results/per_example_conv_grads.json]``
(``large``: the 3x3 layers of the 10.3 M UNet of ``bench_traker.py`` at its chunk of 26 examples).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import common  # noqa: F401  (puts this checkout first on sys.path)
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from attribution.features import grouped_weight_grads, unfold_weight_grads, use_unfold

SHAPES = {  # (B, C_in, C_out, H = W)
    "bundled": [(32, 16, 16, 32), (32, 32, 32, 16), (32, 32, 32, 8), (32, 1, 16, 32)],
    "large": [(26, 80, 80, 32), (26, 160, 160, 16), (26, 240, 160, 16), (26, 240, 240, 8), (26, 480, 240, 8)],
}


def per_example_shifted(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-example weight gradients (B, O, C, 3, 3) of a 3x3, stride-1, padding-1 convolution.

    x: (B, C, H, W) layer input; g: (B, O, H, W) output gradient. With Wp = W + 2, output
    position (y, x) reads padded input (y + ky, x + kx), flat index ky*Wp + kx + (y*Wp + x):
    on the wide layout (g padded to width Wp with zeros) each offset is one strided slice.
    """
    B, C, H, W = x.shape
    Wp, L = W + 2, H * (W + 2)
    xp = F.pad(x, (1, 1, 1, 2)).flatten(2)  # (B, C, (H + 3) * Wp): one spare row for the last offsets
    gw = F.pad(g, (0, 2)).flatten(2)  # (B, O, H * Wp), zero in the 2 extra columns
    out = torch.empty(B, g.shape[1], C, 3, 3)
    for ky in range(3):
        for kx in range(3):
            off = ky * Wp + kx
            out[..., ky, kx] = torch.bmm(gw, xp[:, :, off : off + L].transpose(1, 2))
    return out


def timed_ms(f: Callable[[], object], repeats: int) -> float:
    f()
    t0 = time.perf_counter()
    for _ in range(repeats):
        f()
    return (time.perf_counter() - t0) / repeats * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="bundled")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", help="default: results/per_example_conv_grads[_large].json")
    args = ap.parse_args()
    args.out = args.out or str(common.RESULTS / f"per_example_conv_grads{'' if args.shapes == 'bundled' else '_' + args.shapes}.json")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows, results = [], []
    for B, C, O, H in SHAPES[args.shapes]:
        x, g, w = torch.randn(B, C, H, H), torch.randn(B, O, H, H), torch.randn(O, C, 3, 3)

        def loss(w: torch.Tensor, xi: torch.Tensor, gi: torch.Tensor) -> torch.Tensor:
            return (F.conv2d(xi[None], w, padding=1)[0] * gi).sum()

        vm = vmap(grad(loss), in_dims=(None, 0, 0))
        ref = vm(w, x, g)
        conv = torch.nn.Conv2d(C, O, 3, padding=1, bias=False)
        for name, out in (("shifted", per_example_shifted(x, g)), ("unfold", unfold_weight_grads(conv, x, g)),
                          ("grouped", grouped_weight_grads(conv, x, g))):
            torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-4, msg=f"{name} disagrees with vmap")
        t = {
            "vmap": timed_ms(lambda: vm(w, x, g), args.repeats),
            "grouped": timed_ms(lambda: grouped_weight_grads(conv, x, g), args.repeats),
            "shifted": timed_ms(lambda: per_example_shifted(x, g), args.repeats),
            "unfold": timed_ms(lambda: unfold_weight_grads(conv, x, g), args.repeats),
            "batched": timed_ms(lambda: torch.nn.grad.conv2d_weight(x, w.shape, g, padding=1), args.repeats),
        }
        chosen = "unfold" if use_unfold(conv, g) else "grouped"
        results.append({"B": B, "C_in": C, "C_out": O, "H": H, "ms": t, "chosen": chosen})
        rows.append([f"{B}x{C}->{O} @ {H}x{H}", *(f"{t[k]:.2f}" for k in ("vmap", "grouped", "shifted", "unfold", "batched")),
                     chosen, f"{t[chosen] / t['batched']:.2f}x"])
    table = common.print_table(rows, ["layer (B x C_in -> C_out @ H x W)", "vmap ms", "grouped ms", "shifted ms", "unfold ms",
                                      "batched ms", "chosen", "chosen / batched"])
    out = {"machine": common.machine_info(), "shapes": args.shapes, "threads": args.threads, "repeats": args.repeats, "layers": results,
           "table": table}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

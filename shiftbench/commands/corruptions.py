"""``shiftbench corruptions preview IMAGE OUT.png`` (a 19x5 grid) and ``shiftbench corruptions list``."""

from __future__ import annotations

import argparse

PREVIEW_MAX_SIDE = 320  # the image is shrunk to this longer side before corrupting (default)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    sub.required = True
    preview = sub.add_parser("preview", help="one picture: the 19 corruptions (rows) x 5 severities (columns)",
                             description="Corrupt IMAGE with every corruption at every severity and write one "
                                         "labelled 19x5 grid picture to OUT.png, for eyeballing.")
    preview.add_argument("image", metavar="IMAGE", help="a PNG or JPEG image")
    preview.add_argument("out", metavar="OUT.png", help="the grid picture to write (PNG)")
    preview.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the random corruptions (default: 0)")
    preview.add_argument("--max-side", type=int, default=PREVIEW_MAX_SIDE, metavar="PX",
                         help=f"shrink the image to this longer side first; 0 keeps it (default: {PREVIEW_MAX_SIDE})")
    preview.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto")
    sub.add_parser("list", help="the 19 corruption names, in imagecorruptions' order")


def shrink(image, max_side: int):
    """uint8 [3,H,W] -> float [1,3,h,w] in [0,1] with max(h, w) <= max_side (antialiased), >= 32 px."""
    import torch.nn.functional as F

    x = image.float().div(255).unsqueeze(0)
    h, w = x.shape[-2:]
    scale = max_side / max(h, w) if max_side else 1.0
    if scale >= 1:
        return x
    size = (max(32, round(h * scale)), max(32, round(w * scale)))
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def grid(x, seed: int):
    """float [1,3,h,w] -> uint8 [19, 5, h, w, 3]: every corruption at every severity."""
    import torch

    from corruptions import CORRUPTIONS, SEVERITIES, corrupt

    rows = [torch.cat([corrupt(x, name, s, seed=seed) for s in SEVERITIES]) for name in CORRUPTIONS]
    return (torch.stack(rows) * 255).to(torch.uint8).permute(0, 1, 3, 4, 2).cpu()


def mosaic(cells, gap: int = 3):
    """uint8 [R, C, h, w, 3] -> one uint8 image [R (h+gap) - gap, C (w+gap) - gap, 3] on white."""
    import torch

    n_rows, n_cols, h, w, _ = cells.shape
    canvas = torch.full((n_rows, n_cols, h + gap, w + gap, 3), 255, dtype=torch.uint8)
    canvas[:, :, :h, :w] = cells
    return canvas.permute(0, 2, 1, 3, 4).reshape(n_rows * (h + gap), n_cols * (w + gap), 3)[:-gap, :-gap]


def render(cells, path) -> None:
    """Write the grid with row labels (corruption names) and column labels (severities) as a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from corruptions import CORRUPTIONS, SEVERITIES
    from shiftbench import io

    n_rows, n_cols, h, w, _ = cells.shape
    image = mosaic(cells)
    scale = 2.2 / w  # inches per pixel: 2.2 inch wide cells
    left, top = 1.6, 0.35  # inches for the labels
    width, height = left + image.shape[1] * scale, top + image.shape[0] * scale
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((left / width, 0, 1 - left / width, 1 - top / height))
    ax.imshow(image.numpy(), interpolation="nearest")
    ax.set_axis_off()
    # labels offset in points from the grid's edge, not in image pixels (which shrink to nothing for small images)
    for r, name in enumerate(CORRUPTIONS[:n_rows]):
        ax.annotate(name, (-0.5, r * (h + 3) + h / 2), xytext=(-6, 0), textcoords="offset points", ha="right",
                    va="center", fontsize=10, annotation_clip=False)
    for c, severity in enumerate(SEVERITIES[:n_cols]):
        ax.annotate(f"severity {severity}", (c * (w + 3) + w / 2, -0.5), xytext=(0, 4), textcoords="offset points",
                    ha="center", va="bottom", fontsize=11, annotation_clip=False)
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from corruptions import CORRUPTIONS
    from shiftbench.commands.corrupt import discover, load_given, resolve_device
    from shiftbench.errors import ShiftbenchError

    if args.action == "list":
        print("\n".join(CORRUPTIONS))
        return 0
    if Path(args.out).suffix.lower() != ".png":
        raise ShiftbenchError(f"OUT {args.out!r} must end in .png")
    if args.max_side < 0 or 0 < args.max_side < 32:
        raise ShiftbenchError(f"--max-side {args.max_side} is not allowed; use 0 (keep the size) or >= 32")
    if not Path(args.image).exists():  # discover's own line offers folders, which preview refuses
        raise ShiftbenchError(f"IMAGE {args.image!r} does not exist; give one PNG or JPEG image")
    if Path(args.image).is_dir():
        raise ShiftbenchError(f"IMAGE {args.image!r} is a folder; give one PNG or JPEG image")
    sources, _ = discover(Path(args.image), what="IMAGE")
    if min(sources[0].size) < 32:
        raise ShiftbenchError(f"IMAGE is {sources[0].size[0]}x{sources[0].size[1]}; images must be at least 32x32")
    image = load_given(sources[0], "IMAGE")
    x = shrink(image, args.max_side).to(resolve_device(args.device))
    render(grid(x, args.seed), args.out)
    print(f"shiftbench: wrote {args.out} ({len(CORRUPTIONS)} corruptions x 5 severities at "
          f"{x.shape[-2]}x{x.shape[-1]})")
    return 0

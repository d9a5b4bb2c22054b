"""``shiftbench data synth OUT --format a2d2|cityscapes``: synthetic scenes in a real dataset's on-disk format."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    sub.required = True
    s = sub.add_parser("synth", help="write synthetic street scenes as an A2D2 or Cityscapes tree",
                       description="Write COUNT synthetic scenes per domain and split (highway and urban: train, "
                                   "val, test; ambiguous: test) in the A2D2 or Cityscapes on-disk format.")
    s.add_argument("out", metavar="OUT", help="output folder (created if missing)")
    s.add_argument("--format", required=True, metavar="FORMAT", help="a2d2 or cityscapes")
    s.add_argument("--domain", default="all", metavar="D", help="highway, urban, ambiguous or all (default: all)")
    s.add_argument("--count", type=int, default=32, metavar="N", help="scenes per domain and split (default: 32)")
    s.add_argument("--seed", type=int, default=0, metavar="S", help="dataset seed (default: 0)")
    s.add_argument("--size", default="128x256", metavar="HxW", help="image size (default: 128x256)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")


def parse_size(text: str) -> tuple[int, int]:
    """``"128x256"`` -> (128, 256)."""
    from shiftbench.errors import ShiftbenchError

    try:
        H, W = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ShiftbenchError(f"--size {text!r} is not HxW, e.g. 128x256") from None
    return H, W


def main(args: argparse.Namespace) -> int:
    from shiftbench.data.export import export
    from shiftbench.data.synthetic import DOMAINS
    from shiftbench.errors import ShiftbenchError

    if args.domain == "all":
        domains = DOMAINS
    elif args.domain in DOMAINS:
        domains = (args.domain,)
    else:
        raise ShiftbenchError(f"--domain {args.domain!r} is not one of {', '.join(DOMAINS)}, all")
    n = export(args.format, args.out, domains, args.count, args.seed, parse_size(args.size), progress=not args.quiet)
    print(f"shiftbench: wrote {n} {args.format} scenes to {args.out}")
    return 0

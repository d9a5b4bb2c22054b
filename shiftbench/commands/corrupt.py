"""``shiftbench corrupt IN OUT``: corrupt an image or a folder tree into OUT/<corruption>/<severity>/<path>.

This is how Cityscapes-C / A2D2-C style copies are made: every PNG/JPEG under IN is corrupted
with each requested corruption and severity and written, with the same relative path and
format, under ``OUT/<corruption>/<severity>/``. Images of one size are corrupted in batches;
sample b's noise is keyed by (--seed, its relative path), so the output never depends on the
batch size, the device's batch composition or which files were already done. Every file is
written to a temporary name and renamed, and a re-run skips the files that exist. OUT records
the seed and device type it was made with (``OUT/corrupt.json``); a re-run with others is refused,
since its images would mix with the old ones. Temporaries a killed run left (over a minute old) in the
folders a re-run writes are removed.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}
#: torchvision 0.29 deprecates its image codecs in favour of torchcodec; they still work, quietly.
_CODEC_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"
JPEG_QUALITY = 95  # when writing a .jpg/.jpeg output (PNG outputs are lossless)
MANIFEST = "corrupt.json"  # in OUT: what its images were made with
STALE_S = 60  # a temporary older than this is a killed run's (one image takes well under a second to write)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="IN", help="an image file or a folder tree of PNG/JPEG images")
    p.add_argument("output", metavar="OUT", help="output root; images go to OUT/<corruption>/<severity>/<path>")
    p.add_argument("--corruption", default="all", metavar="NAME",
                   help="a corruption name, several separated by commas, or all (default: all 19)")
    p.add_argument("--severity", default="all", metavar="N", help="1..5, several separated by commas, or all (default)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="run seed; per-image seeds are keyed by "
                                                                     "(S, relative path) (default: 0)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto (cuda if present)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per batch (default: 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


@dataclass(frozen=True)
class Source:
    """One input image: its path, its path relative to IN (the output's relative path) and its size."""

    path: Path
    rel: str
    size: tuple[int, int]  # (H, W)


def parse_corruptions(text: str) -> list[str]:
    """``"all"`` or comma-separated names -> names in the registry's order."""
    from corruptions import CORRUPTIONS
    from shiftbench.errors import ShiftbenchError, comma_items

    if text.strip() == "all":
        return list(CORRUPTIONS)
    names = comma_items(text, "--corruption", f"all or some of: {', '.join(CORRUPTIONS)}")
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown:
        raise ShiftbenchError(f"--corruption {text!r}: unknown name {', '.join(unknown)}; "
                              f"use all or some of: {', '.join(CORRUPTIONS)}")
    return [n for n in CORRUPTIONS if n in names]


def parse_severities(text: str) -> list[int]:
    """``"all"`` or comma-separated integers in 1..5."""
    from shiftbench.errors import ShiftbenchError, comma_items

    if text.strip() == "all":
        return [1, 2, 3, 4, 5]
    items = comma_items(text, "--severity", "all or integers in 1..5, e.g. 3 or 1,5")
    try:
        values = sorted({int(v) for v in items})
    except ValueError:
        values = []
    if not values or any(v not in range(1, 6) for v in values):
        raise ShiftbenchError(f"--severity {text!r} is not allowed; use all or integers in 1..5, e.g. 3 or 1,5")
    return values


def discover(root: Path, exclude: Path | None = None, what: str = "input") -> tuple[list[Source], list[str]]:
    """The images under ``root`` (a file or a folder; files under ``exclude`` left out) and the
    skipped files with the reason, in sorted path order; ``what`` names ``root`` in the errors."""
    from PIL import Image, UnidentifiedImageError

    from shiftbench.errors import ShiftbenchError, counted

    if not root.exists():
        raise ShiftbenchError(f"{what} {str(root)!r} does not exist; give an image file or a folder of PNG/JPEG images")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    exclude = exclude.resolve() if exclude is not None else None
    sources, skipped, reason = [], [], ""
    for path in files:
        if exclude is not None and exclude in path.resolve().parents:
            continue  # our own outputs when OUT lies inside IN
        rel = path.name if root.is_file() else path.relative_to(root).as_posix()
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            reason = "not a .png/.jpg/.jpeg file"
        else:
            try:
                with Image.open(path) as im:  # reads the header only
                    width, height = im.size
                sources.append(Source(path, rel, (height, width)))
                continue
            except (UnidentifiedImageError, OSError) as exc:
                reason = f"unreadable: {type(exc).__name__}"
        skipped.append(f"{rel} ({reason})")
    if root.is_file() and not sources:  # the one file given was skipped, for ``reason``
        raise not_an_image(what, root, reason)
    if not sources:
        others = f" ({counted(len(skipped), 'other file')}, e.g. {skipped[0]})" if skipped else ""
        raise ShiftbenchError(f"{what} {str(root)!r} holds no readable PNG/JPEG image{others}; "
                              "give an image file or a folder of PNG/JPEG images")
    return sources, skipped


def not_an_image(what: str, path: Path, reason: str) -> Exception:
    """The one-line error for the single image a command was given (``what`` names the argument)."""
    from shiftbench.errors import ShiftbenchError

    return ShiftbenchError(f"{what} {str(path)!r} is not a readable PNG/JPEG image ({reason})")


def load_given(source: Source, what: str):
    """:func:`load` for the single image a command was given: data that does not decode is an error, not a skip."""
    try:
        return load(source)
    except UnreadableImage as exc:
        raise not_an_image(what, source.path, exc.reason) from None


def batches(sources: list[Source], batch_size: int) -> list[list[Source]]:
    """Same-size groups of at most ``batch_size`` images (sizes in order of first appearance)."""
    groups: dict[tuple[int, int], list[Source]] = {}
    for s in sources:
        groups.setdefault(s.size, []).append(s)
    return [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


class UnreadableImage(Exception):
    """An image whose header reads but whose data does not decode; ``reason`` is the decoder's message."""

    def __init__(self, source: Source, reason: str):
        super().__init__(f"{source.rel}: {reason}")
        self.reason = reason


def load(source: Source):
    """uint8 RGB [3,H,W] (grey and alpha converted, 16-bit scaled to 8), via torchvision; raises
    :class:`UnreadableImage` when the data does not decode (a truncated or corrupt file)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", _CODEC_DEPRECATION, DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_image, read_file

        try:
            image = decode_image(read_file(str(source.path)), mode=ImageReadMode.RGB)
        except (RuntimeError, OSError) as exc:  # torchvision's message without its source location
            raise UnreadableImage(source, re.sub(r"^.*?\.cpp:\d+, ", "", " ".join(str(exc).split()))) from None
    if image.dtype != torch.uint8:
        image = (image.float() * (255 / torch.iinfo(image.dtype).max)).to(torch.uint8)
    return image


def load_or_skip(source: Source, skipped: list[str]):
    """:func:`load`, or None for an image whose data cannot be decoded: reported on stderr and added to
    ``skipped``."""
    import sys

    try:
        return load(source)
    except UnreadableImage as exc:
        skipped.append(f"{source.rel} (unreadable: {exc.reason})")
        print(f"shiftbench: skipping {skipped[-1]}", file=sys.stderr)
        return None


def encode(image, suffix: str) -> bytes:
    """uint8 [3,H,W] (CPU) -> file bytes in the format of ``suffix``."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", _CODEC_DEPRECATION, DeprecationWarning)
        from torchvision.io import encode_jpeg, encode_png

        if IMAGE_SUFFIXES[suffix.lower()] == "jpeg":
            return encode_jpeg(image, quality=JPEG_QUALITY).numpy().tobytes()
        return encode_png(image).numpy().tobytes()


def to_uint8(x):
    """float [...] in [0,1] -> uint8, truncating like imagecorruptions (np.uint8(255 x))."""
    import torch

    return (x * 255).clamp_(0, 255).to(torch.uint8)


def resolve_device(name: str):
    import torch

    from shiftbench.errors import ShiftbenchError

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ShiftbenchError("--device cuda: no CUDA device is available; use --device cpu or auto")
    return torch.device(name)


def open_output(out: Path, made_with: dict, folders: list[Path]) -> None:
    """Create OUT, or check that it was made with the same ``made_with`` (seed, device type): the
    images of two settings must not mix. Removes the temporaries a killed run left in ``folders`` (the
    <corruption>/<severity> folders this run writes) more than :data:`STALE_S` ago, so that a ``corrupt``
    writing other conditions into the same OUT at the same time keeps its own."""
    import time

    from shiftbench import io
    from shiftbench.errors import ShiftbenchError
    from shiftbench.runner.store import MANIFEST as RUN_MANIFEST  # a 'shiftbench run' folder's: not an OUT

    manifest = out / MANIFEST
    if not manifest.is_file() and (out / RUN_MANIFEST).is_file():
        raise ShiftbenchError(f"{out}: holds a 'shiftbench run' (its {RUN_MANIFEST}); corrupted images would mix "
                              "with its results: give another OUT")
    if manifest.is_file():
        old = io.read_json_object(manifest)
        if isinstance(old, str):
            raise ShiftbenchError(f"{manifest}: unreadable ({old}); remove it if OUT holds nothing else of value, "
                                  "or use another OUT")
        diff = [f"--{k} {old.get(k)}" for k, v in made_with.items() if old.get(k) != v]
        if diff:
            now = ", ".join(f"--{k} {made_with[k]}" for k in made_with)
            raise ShiftbenchError(f"{out}: was made with {', '.join(diff)}, this run has {now}; its images would mix "
                                  "with the old ones: use the same settings or another OUT")
        stale = time.time() - STALE_S
        for folder in folders:
            for tmp in folder.rglob(".*.tmp*") if folder.is_dir() else ():
                try:
                    if tmp.stat().st_mtime < stale:  # a killed run's half-written file, not a live writer's
                        tmp.unlink()
                except FileNotFoundError:  # renamed into place meanwhile by a live writer
                    continue
    else:
        io.write_json(manifest, made_with)


def main(args: argparse.Namespace) -> int:
    import sys

    import torch
    from tqdm import tqdm

    from corruptions import corrupt
    from shiftbench import io
    from shiftbench.errors import ShiftbenchError, counted
    from shiftbench.seeding import sample_seeds

    names, severities = parse_corruptions(args.corruption), parse_severities(args.severity)
    if args.batch_size < 1:
        raise ShiftbenchError(f"--batch-size {args.batch_size} is not allowed; use a positive integer")
    device = resolve_device(args.device)
    root, out = Path(args.input), Path(args.output)
    sources, skipped = discover(root, out)
    given = {sources[0].rel: load_given(sources[0], "input")} if root.is_file() else {}  # decoded once, reused
    small = [s for s in sources if min(s.size) < 32]
    if small:
        raise ShiftbenchError(f"{small[0].rel} is {small[0].size[0]}x{small[0].size[1]}; images must be at least 32x32")
    conditions = [(n, s) for n in names for s in severities]
    open_output(out, {"seed": args.seed, "device": device.type}, [out / n / str(s) for n, s in conditions])
    for line in skipped:
        print(f"shiftbench: skipping {line}", file=sys.stderr)
    found = len(skipped)  # skipped by their headers; those whose data fails to decode are added below
    target = {(n, s, src.rel): out / n / str(s) / src.rel for n, s in conditions for src in sources}
    written = existing = 0
    with tqdm(total=len(target), unit="img", desc="corrupt", disable=args.quiet) as bar:
        for batch in batches(sources, args.batch_size):
            todo = {c: [i for i, src in enumerate(batch) if not target[(*c, src.rel)].exists()] for c in conditions}
            existing += sum(len(batch) - len(idx) for idx in todo.values())
            bar.update(sum(len(batch) - len(idx) for idx in todo.values()))
            if not any(todo.values()):
                continue
            # None: its header read, its data does not
            loaded = [given[src.rel] if src.rel in given else load_or_skip(src, skipped) for src in batch]
            bar.update(sum(1 for idx in todo.values() for i in idx if loaded[i] is None))
            todo = {c: [i for i in idx if loaded[i] is not None] for c, idx in todo.items()}
            if not any(todo.values()):
                continue
            blank = next(image for image in loaded if image is not None)
            images = torch.stack([blank if image is None else image for image in loaded])  # unreadable: never used
            images = images.to(device).float().div_(255)
            seeds = sample_seeds(args.seed, [src.rel for src in batch])  # on the host, where corrupt reads them
            for (name, severity), idx in todo.items():
                if not idx:
                    continue
                pick = torch.tensor(idx)  # on the host: indexes the images on any device, and the seeds
                result = to_uint8(corrupt(images[pick], name, severity, seed=seeds[pick])).cpu()
                for k, i in enumerate(idx):
                    io.write_bytes(target[(name, severity, batch[i].rel)], encode(result[k], batch[i].path.suffix))
                written += len(idx)
                bar.update(len(idx))
    inputs = len(sources) - (len(skipped) - found)  # an input whose data cannot be read counts as skipped only
    print(f"shiftbench: wrote {counted(written, 'image')} to {out} ({counted(inputs, 'input')} x "
          f"{counted(len(conditions), 'condition')}; {existing} already there, "
          f"{counted(len(skipped), 'file')} skipped)")
    return 0

"""Training input pipeline throughput, and `dvc status` on an ADE20K-sized prepared split.

    python benchmarks/input_pipeline.py                      # both parts (~2-4 min on 2 cores)
    python benchmarks/input_pipeline.py --skip-dvc           # throughput only
    python benchmarks/input_pipeline.py --images 64 --rounds 5

1. Throughput, single-threaded (images/s per core: OpenCV and torch on one thread, numpy's element-wise work
   is single-threaded anyway): the paper's augmentation + normalisation of an ADE20K-sized image (512x683) to
   a 473x473 crop, each timed with the JPEG + label PNG decode excluded (decoded beforehand) and included:

   - ``TrainTransform`` (pipeline/data/transforms.py): one affine warp straight into the crop, uint8 until
     the normalisation;
   - the authors' pipeline, written here step by step as hszhao/semseg's ``util/transform.py`` does it
     (RandScale, RandRotate with p=0.5, RandomGaussianBlur, RandomHorizontalFlip, Crop, ToTensor, Normalize,
     each a pass over the whole scaled image), once on the float32 image semseg's loader gives
     (``np.float32(image)`` after decoding, counted as part of the decode) and once on the uint8 image.

   Each round runs every candidate on every image, taking turns image by image so that load from other
   processes hits them alike. Printed: the best rate of each, and the median over rounds of the per-round
   ratio ours / the faster reference (goal >= 1.5x), decode excluded and included. Then how close the outputs are with the same random draws
   (the reference rotating every sample, as ours does): label agreement and mean absolute image difference on
   the pixels both call image content.

2. `dvc status` on a stand-in for the prepared ADE20K split: 20,210 train + 2,000 val rows written in the
   real shard format (``pipeline.data.prepare.schema``, 1,024 rows per shard) into a temporary git + DVC
   repository and tracked with `dvc add`. Rows reuse a pool of generated JPEG/PNG pairs, sized so that the
   shards total about what the real release holds (the ADE20K zip is 923 MB), so the bytes DVC hashes are
   realistic. Timed: `dvc add` (hash + cache), `dvc status` right after (warm: DVC's stat cache), and
   `dvc status` after the stat cache is dropped (cold: rehash every shard).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import torch

from pipeline.data.prepare import MANIFEST, schema
from pipeline.data.transforms import BLUR_KERNEL, TrainTransform

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
AUG = {"crop_size": 473, "scale_min": 0.5, "scale_max": 2.0, "rotate": 10.0, "blur": True, "flip": True}
ADE_SIZE = (512, 683)  # H, W
ADE_ROWS = {"train": 20210, "val": 2000}
ADE_ZIP_BYTES = 923e6  # datasets.ade20k_sceneparsing.size in shared/reference/pspnet_reference.yaml


# --------------------------------------------------------------------------------------------------------------
# Stand-in images


def make_pair(rng: np.random.Generator, h: int, w: int, *, noise: float = 6.0) -> tuple[bytes, bytes]:
    """A JPEG (quality 90) of smooth colour regions with texture noise, and a PNG label of 1..150 regions."""
    k = int(rng.integers(8, 20))
    seeds = np.stack([rng.uniform(0, h / 4, k), rng.uniform(0, w / 4, k)], 1)
    yy, xx = np.mgrid[0 : h // 4, 0 : w // 4].astype(np.float32)
    dist = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
    region = cv2.resize(dist.argmin(-1).astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)  # Voronoi
    colours = rng.uniform(30, 225, (k, 3)).astype(np.float32)
    shade = cv2.resize(rng.normal(0, 25, (6, 8)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    image = colours[region] + shade[..., None] + rng.normal(0, noise, (h, w, 3)).astype(np.float32)
    image = np.clip(image, 0, 255).astype(np.uint8)
    label = rng.integers(1, 151, k).astype(np.uint8)[region]
    label[rng.random((h, w)) < 0.002] = 0  # a few "other" pixels
    jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    png = cv2.imencode(".png", label)[1].tobytes()
    return jpeg, png


def decode(jpeg: bytes, png: bytes) -> tuple[np.ndarray, np.ndarray]:
    """As ``ShardedSegmentation.read``: (H, W, 3) uint8 RGB, (H, W) uint8."""
    image = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    label = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    return image, label


# --------------------------------------------------------------------------------------------------------------
# The plain step-by-step pipeline (semseg's tool/train.py transforms, float32 from the start)


class SemsegSteps:
    """RandScale -> RandRotate -> RandomGaussianBlur -> RandomHorizontalFlip -> Crop -> ToTensor -> Normalize.

    Every step is a pass over the whole (scaled) image, in the image's dtype (float32 as semseg's loader gives
    it, or uint8). ``rotate_p`` is RandRotate's probability (semseg: 0.5; its coin is drawn before the angle).
    With ``rotate_p=1`` no coin is drawn and the random numbers come in ``TrainTransform``'s order from the
    same distributions, so the same seed gives the same parameters.
    """

    def __init__(
        self, *, crop_size, scale_min, scale_max, rotate, blur, flip, rotate_p=0.5, seed=None
    ) -> None:
        self.crop, self.scale_min, self.scale_max = crop_size, scale_min, scale_max
        self.rotate, self.blur, self.flip, self.rotate_p = rotate, blur, flip, rotate_p
        self.rng = np.random.default_rng(seed)

    def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rng, crop, mean = self.rng, self.crop, list(MEAN)
        s = rng.uniform(self.scale_min, self.scale_max)  # RandScale
        image = cv2.resize(image, None, fx=s, fy=s, interpolation=cv2.INTER_LINEAR)
        label = cv2.resize(label, None, fx=s, fy=s, interpolation=cv2.INTER_NEAREST)
        if self.rotate_p >= 1 or rng.random() < self.rotate_p:  # RandRotate about the centre, same canvas
            sh, sw = label.shape
            matrix = cv2.getRotationMatrix2D((sw / 2, sh / 2), rng.uniform(-self.rotate, self.rotate), 1)
            image = cv2.warpAffine(image, matrix, (sw, sh), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_CONSTANT, borderValue=mean)  # fmt: skip
            label = cv2.warpAffine(label, matrix, (sw, sh), flags=cv2.INTER_NEAREST,
                                   borderMode=cv2.BORDER_CONSTANT, borderValue=255)  # fmt: skip
        if self.blur and rng.random() < 0.5:  # RandomGaussianBlur
            image = cv2.GaussianBlur(image, (BLUR_KERNEL, BLUR_KERNEL), 0)
        if self.flip and rng.random() < 0.5:  # RandomHorizontalFlip
            image, label = cv2.flip(image, 1), cv2.flip(label, 1)
        sh, sw = label.shape  # Crop: pad (centred) with mean / 255 to at least crop x crop, random window
        pad_h, pad_w = max(crop - sh, 0), max(crop - sw, 0)
        if pad_h or pad_w:
            top, left = pad_h // 2, pad_w // 2
            image = cv2.copyMakeBorder(
                image, top, pad_h - top, left, pad_w - left, cv2.BORDER_CONSTANT, value=mean
            )
            label = cv2.copyMakeBorder(
                label, top, pad_h - top, left, pad_w - left, cv2.BORDER_CONSTANT, value=255
            )
        ph, pw = label.shape
        h_off = int(rng.integers(0, ph - crop + 1))
        w_off = int(rng.integers(0, pw - crop + 1))
        image = image[h_off : h_off + crop, w_off : w_off + crop]
        label = label[h_off : h_off + crop, w_off : w_off + crop]
        tensor = torch.from_numpy(image.transpose(2, 0, 1))  # ToTensor: a (3, h, w) view, float unless it is
        tensor = tensor if tensor.dtype == torch.float32 else tensor.float()
        for channel, m, sd in zip(tensor, MEAN, STD, strict=True):  # Normalize, in place per channel
            channel.sub_(m).div_(sd)
        return tensor, torch.from_numpy(label).long()


def semseg_decode(jpeg: bytes, png: bytes) -> tuple[np.ndarray, np.ndarray]:
    """As semseg's ``SemData``: the decoded RGB image as float32, the label as uint8."""
    image, label = decode(jpeg, png)
    return image.astype(np.float32), label


# --------------------------------------------------------------------------------------------------------------
# 1. Throughput


def throughput(pairs: list[tuple[bytes, bytes]], candidates: dict, rounds: int) -> tuple[dict, list[dict]]:
    """Images/s of each candidate ``name: (decode, make)``: ``make(round)`` builds the transform, timed over
    ``pairs`` once on images decoded beforehand ("<name> | decode excluded") and once decoding each pair
    ("<name> | decode included"). The candidates take turns image by image, so that load from other
    processes hits them alike. Returns the best rate of each and every round's rates.
    """
    decoded = {name: [decode_fn(*pair) for pair in pairs] for name, (decode_fn, _) in candidates.items()}
    per_round = []
    for r in range(rounds):
        seconds = {}
        for part in ("decode excluded", "decode included"):
            transforms = {name: make(r) for name, (_, make) in candidates.items()}
            for i, (jpeg, png) in enumerate(pairs):
                for name, (decode_fn, _) in candidates.items():
                    key, start = f"{name} | {part}", time.perf_counter()
                    transforms[name](
                        *(decoded[name][i] if part == "decode excluded" else decode_fn(jpeg, png))
                    )
                    seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - start
        per_round.append({key: len(pairs) / s for key, s in seconds.items()})
    best = {key: max(rates[key] for rates in per_round) for key in per_round[0]}
    return best, per_round


def ratios(per_round: list[dict], ours: str, references: list[str], part: str) -> list[float]:
    """Per round, ``ours / the fastest reference`` within that round, for one ``part`` (decode excluded or not)."""
    return [r[f"{ours} | {part}"] / max(r[f"{ref} | {part}"] for ref in references) for r in per_round]


def agreement(pairs: list[tuple[bytes, bytes]], seed: int) -> tuple[float, float]:
    """Label agreement and mean |image difference| (normalised units x std = 0..255) with the same draws."""
    fast = TrainTransform(**AUG, mean=MEAN, std=STD, seed=seed)
    plain = SemsegSteps(**AUG, rotate_p=1.0, seed=seed)
    same, total, diffs = 0, 0, []
    std = torch.tensor(STD).view(3, 1, 1)
    for jpeg, png in pairs:
        image, label = decode(jpeg, png)
        a_img, a_lab = fast(image, label)
        b_img, b_lab = plain(image.astype(np.float32), label)
        same += int((a_lab == b_lab).sum())
        total += a_lab.numel()
        both = (a_lab != 255) & (b_lab != 255)
        if both.any():
            diffs.append(float(((a_img - b_img).abs() * std)[:, both].mean()))
    return same / total, float(np.mean(diffs))


# --------------------------------------------------------------------------------------------------------------
# 2. dvc status on an ADE20K-sized prepared split


def write_standin(out: Path, pool: list[tuple[bytes, bytes]], shard_rows: int = 1024) -> int:
    """``out/{train,val}/shard-*.arrow`` + manifests with ADE20K's row counts; returns the bytes written."""
    sch = schema(150)
    total = 0
    for split, rows in ADE_ROWS.items():
        folder = out / split
        folder.mkdir(parents=True)
        shards = []
        for first in range(0, rows, shard_rows):
            n = min(shard_rows, rows - first)
            name = f"shard-{len(shards):05d}.arrow"
            with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_file(sink, sch) as writer:
                for start in range(first, first + n, 8):
                    batch = []
                    for i in range(start, min(start + 8, first + n)):
                        jpeg, png = pool[i % len(pool)]
                        counts = [0] * 150
                        counts[i % 150] = ADE_SIZE[0] * ADE_SIZE[1]
                        prefix = "train" if split == "train" else "val"
                        batch.append({"id": f"ADE_{prefix}_{i + 1:08d}", "image": jpeg, "label": png,
                                      "height": ADE_SIZE[0], "width": ADE_SIZE[1], "class_pixels": counts})  # fmt: skip
                    writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=sch))
            shards.append({"name": name, "rows": n})
            total += (folder / name).stat().st_size
        (folder / MANIFEST).write_text(json.dumps({"rows": rows, "shards": shards}, indent=2))
    return total


def _timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return seconds


def dvc_status(pool: list[tuple[bytes, bytes]], base: Path | None) -> dict:
    dvc = str(Path(sys.executable).parent / "dvc")
    with tempfile.TemporaryDirectory(dir=base, prefix="dvc-standin-") as tmp:
        repo = Path(tmp)
        git = ["git", "-c", "user.email=b@b", "-c", "user.name=b"]
        subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
        subprocess.run([dvc, "init", "-q"], cwd=repo, check=True)
        site = repo / ".dvc" / "site-cache"  # DVC's stat cache (hashes by inode/mtime/size), kept in the repo
        subprocess.run([dvc, "config", "core.site_cache_dir", str(site)], cwd=repo, check=True)
        start = time.perf_counter()
        size = write_standin(repo / "data" / "prepared" / "ade20k", pool)
        write_s = time.perf_counter() - start
        files = sum(1 for _ in (repo / "data").rglob("*") if _.is_file())
        add_s = _timed([dvc, "add", "-q", "data/prepared/ade20k"], repo)
        warm_s = min(_timed([dvc, "status", "-q"], repo) for _ in range(3))
        shutil.rmtree(site)  # forget every hash: the next status reads all shards again (from the page cache)
        os.sync()
        cold_s = _timed([dvc, "status", "-q"], repo)
    return {
        "bytes": size,
        "files": files,
        "write_s": write_s,
        "add_s": add_s,
        "warm_s": warm_s,
        "cold_s": cold_s,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--images", type=int, default=48, help="distinct JPEG/label pairs to time (default 48)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed passes (default 5)")
    parser.add_argument("--pool-noise", type=float, default=1.5, help="texture noise of the stand-in rows "
                        "(1.5: about the 42 kB per row of the real release)")  # fmt: skip
    parser.add_argument("--skip-dvc", action="store_true", help="only the throughput part")
    parser.add_argument("--tmp", type=Path, default=None, help="where the temporary DVC repo goes")
    args = parser.parse_args(argv)

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    pairs = [make_pair(rng, *ADE_SIZE) for _ in range(args.images)]
    jpeg_kb = np.mean([len(j) for j, _ in pairs]) / 1e3
    png_kb = np.mean([len(p) for _, p in pairs]) / 1e3
    print(f"[input] {len(pairs)} pairs of {ADE_SIZE[1]}x{ADE_SIZE[0]}: JPEG {jpeg_kb:.0f} kB, PNG {png_kb:.0f} kB "
          f"(mean); crop {AUG['crop_size']}, scale {AUG['scale_min']}-{AUG['scale_max']}, rotate +-{AUG['rotate']}, "
          "blur, flip; 1 thread")  # fmt: skip

    ours, refs = "TrainTransform (one warp)", ["semseg steps, float32", "semseg steps, uint8"]
    candidates = {
        ours: (decode, lambda r: TrainTransform(**AUG, mean=MEAN, std=STD, seed=r)),
        refs[0]: (semseg_decode, lambda r: SemsegSteps(**AUG, seed=r)),
        refs[1]: (decode, lambda r: SemsegSteps(**AUG, seed=r)),
        "decode only": (decode, lambda r: lambda image, label: None),
    }
    best, per_round = throughput(pairs, candidates, args.rounds)
    for key, rate in best.items():
        if not key.startswith("decode only | decode excluded"):
            print(f"[input] {key:50s} {rate:7.1f} images/s per core (best of {args.rounds})")
    for part in ("decode excluded", "decode included"):
        each = ratios(per_round, ours, refs, part)
        print(f"[input] ratio ours / fastest reference, {part}: {np.median(each):.2f}x (median of per-round ratios "
              f"{', '.join(f'{r:.2f}' for r in each)}; goal >= 1.5x)")  # fmt: skip
    labels_same, image_mad = agreement(pairs, seed=123)
    print(f"[input] same draws: labels agree on {labels_same:.2%} of pixels, images differ by {image_mad:.2f} / 255 "
          "on average where both are image content")  # fmt: skip

    if args.skip_dvc:
        return
    pool = [make_pair(rng, *ADE_SIZE, noise=args.pool_noise) for _ in range(64)]
    per_row = np.mean([len(j) + len(p) for j, p in pool])
    print(f"[dvc] stand-in: {sum(ADE_ROWS.values())} rows from a pool of {len(pool)} pairs "
          f"({per_row / 1e3:.0f} kB per row; the real zip: {ADE_ZIP_BYTES / sum(ADE_ROWS.values()) / 1e3:.0f} kB)")  # fmt: skip
    r = dvc_status(pool, args.tmp)
    print(f"[dvc] {r['files']} files, {r['bytes'] / 1e9:.2f} GB written in {r['write_s']:.1f} s")
    print(f"[dvc] dvc add {r['add_s']:.1f} s | dvc status warm {r['warm_s']:.2f} s | "
          f"cold (stat cache dropped) {r['cold_s']:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()

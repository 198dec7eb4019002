"""A user's own picture of one digit in MNIST's form (to_mnist), for predict.py, its page and the tests.
numpy and Pillow only (no torch): with an exported .onnx file and onnxruntime it is a whole deployment
(docs/predict_onnxruntime.py).

MNIST's own recipe for an arbitrary picture of one digit:
greyscale; ink polarity from the background; background and uneven lighting removed; the ink's
bounding box scaled into 20x20 keeping its aspect ratio, with antialiasing; placed in 28x28 so its
centre of mass is at pixel (14, 14), as in MNIST (test-set mean 13.99, 14.01). One step beyond MNIST's
recipe: strokes far thinner than MNIST's (a fine pen photographed large) are widened first.
"""
import os
import stat

import numpy as np

from errors import UserError

WORK_SIDE = 800   # larger pictures are reduced to at most this many pixels a side first
MIN_CONTRAST = 0.1   # ink must differ from the paper by 10% of the grey scale, else "no ink"
MAX_FILE_BYTES = 256 << 20   # a file larger than this is refused unread (a digit needs a few MB at most)
STROKE = 0.09   # MNIST's median stroke width over digit size (0.06 to 0.15 for 90% of the test set)


class ImageError(UserError):
    """A file or upload that is not a usable picture of a digit; the message says why (the caller names it)."""


def read_file(path):
    """A regular file's bytes. ImageError for a FIFO, socket or device (a read could wait or never end)
    and for a file over MAX_FILE_BYTES; OSError (no such file, permission denied, a symlink loop) as it is."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ImageError("not a regular file (a FIFO, socket or device)")
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:   # a FIFO swapped in since: no wait
        raw = f.read(MAX_FILE_BYTES + 1) or b""
    if len(raw) > MAX_FILE_BYTES:
        raise ImageError(f"over {MAX_FILE_BYTES >> 20} MB: larger than any picture of a digit needs")
    return raw


def open_image(source, max_pixels=None):
    """A fully decoded PIL image (first frame, EXIF orientation applied) from a path or bytes.
    ImageError for anything that is not a whole image of a sane size: over Pillow's own limit
    (Image.MAX_IMAGE_PIXELS), or over max_pixels, checked on the header before anything is decoded
    (the caller names the file)."""
    import io
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError
    raw = read_file(source) if isinstance(source, str) else source
    if not raw:
        raise ImageError("empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(raw))   # the header only
            if max_pixels and img.width * img.height > max_pixels:
                raise ImageError(f"{img.width} x {img.height} pixels: over this limit of {max_pixels:,} "
                                "(a decompression bomb?); a digit needs far fewer")
            img.load()
            ImageOps.exif_transpose(img, in_place=True)   # in place: no second full-size copy
            return img
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(f"too large: over Pillow's limit of {Image.MAX_IMAGE_PIXELS:,} pixels "
                            "(a decompression bomb?); a digit needs far fewer") from None
        except UnidentifiedImageError:
            raise ImageError("not an image Pillow can read (PNG, JPEG, BMP, GIF, TIFF, WebP)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageError(f"truncated or corrupt image ({str(e) or type(e).__name__})") from None


def _grey(img):
    """float32 greyscale [H, W] in [0, 1] (ITU-R 601 luma, as Pillow's 'L'), at most WORK_SIDE a side.
    Transparent parts are laid on white under dark ink and on black under light ink."""
    from PIL import Image
    if img.mode.startswith("I;16"):
        img = img.convert("I")
    elif img.mode not in ("I", "F", "L", "LA", "RGB", "RGBA") or "transparency" in img.info:
        img = img.convert("RGBA")   # palette, 1-bit, CMYK, YCbCr, LAB, ...
    factor = -(-max(img.size) // WORK_SIDE)
    if factor > 1:
        img = img.reduce(factor)
    elif max(img.size) < 112:   # small pictures: finer steps for the box and the thresholds
        k = -(-112 // max(img.size))
        img = img.resize((img.width * k, img.height * k), Image.BICUBIC)
    a = np.asarray(img, dtype=np.float32)
    if img.mode in ("I", "F"):
        return np.clip(a / (65535 if img.mode == "I" else max(1.0, float(a.max()))), 0, 1)
    a = a / 255
    if a.ndim == 2:
        return a
    grey = a[..., :3] @ np.float32([0.299, 0.587, 0.114]) if a.shape[2] >= 3 else a[..., 0]
    if img.mode not in ("LA", "RGBA") or a[..., -1].min() == 1:
        return grey
    alpha = a[..., -1]
    under = 1.0 if (grey * alpha).sum() < 0.5 * max(alpha.sum(), 1e-6) else 0.0
    return alpha * grey + (1 - alpha) * under


def _blur3(a):
    """3x3 box mean, edges repeated."""
    p = np.pad(a, 1, mode="edge")
    h, w = a.shape
    return sum(p[i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9


def _paper(g):
    """The background under the ink: a quadratic surface (uneven lighting) fitted to a <= 32x32
    area-averaged copy of g, ink left out as outliers. Returns it at full size."""
    from PIL import Image
    h, w = g.shape

    def axis(n):
        return (np.arange(n) + 0.5) / n * 2 - 1

    def surface(c, y, x):
        return c[0] + c[1] * x + c[2] * y + c[3] * x * x + c[4] * x * y + c[5] * y * y

    small = np.asarray(Image.fromarray(g).resize((min(w, 32), min(h, 32)), Image.BOX), dtype=np.float64)
    y, x = (a.ravel() for a in np.meshgrid(axis(small.shape[0]), axis(small.shape[1]), indexing="ij"))
    basis, v = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], 1), small.ravel()
    coef, keep = np.zeros(6), np.ones(v.size, bool)
    coef[0] = np.median(v)
    for terms in (3, 6, 6, 6):   # median, plane, then quadratic: an early fit cannot bend to the ink
        r = v - basis @ coef
        keep = np.abs(r) < max(3 * 1.4826 * np.median(np.abs(r[keep])), 0.01)
        coef[:terms] = np.linalg.lstsq(basis[keep, :terms], v[keep], rcond=None)[0]
    return surface(coef, axis(h)[:, None], axis(w)[None, :]).astype(np.float32)


def ink_of(img):
    """Ink intensity [H, W] in [0, 1] (1: ink, 0: paper) of a PIL image, whatever its polarity."""
    g = _grey(img)
    r = g - _paper(g)
    noise = 1.4826 * float(np.median(np.abs(r)))
    t = max(6 * noise, 0.05)
    dark = np.maximum(-r - t, 0).sum() > np.maximum(r - t, 0).sum()
    ink = np.maximum(-r if dark else r, 0)
    peak = float(_blur3(ink).max())
    if peak < max(MIN_CONTRAST, 8 * noise):
        raise ImageError("no ink found: the image is blank or too faint to hold a digit")
    return np.clip((ink / peak - 0.25) / 0.5, 0, 1)   # paper and noise to 0, the strokes' core to 1


def to_png(image):
    """PNG bytes of a uint8 array [28, 28] (what to_mnist gives): --save-preprocessed's files, the page's picture."""
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def mnist_form(img):
    """The uint8 array [28, 28] of a 28x28 greyscale image with a dark border (MNIST's own form), else None."""
    if img.size != (28, 28) or img.mode not in ("L", "RGB") or "transparency" in img.info:
        return None
    a = np.array(img)
    if a.ndim == 3:
        if not (a == a[..., :1]).all():
            return None
        a = a[..., 0].copy()
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return a if border.mean() < 32 and a.max() >= 128 else None


def _bold(box):
    """Strokes far thinner than MNIST's (a fine pen, photographed large) dilated to MNIST's median
    width; the rest unchanged. Stroke width: ink area over half its perimeter."""
    mask = box > 0.5
    edges = (mask[1:] != mask[:-1]).sum() + (mask[:, 1:] != mask[:, :-1]).sum()
    width, want = 2 * mask.sum() / max(edges, 1), STROKE * max(box.shape)
    grow = int(want - width) // 2
    if width > 0.55 * want or grow < 1:
        return box
    out = np.pad(box, 2 * grow)
    for axis in (0, 1):   # a square max filter, one axis at a time; the box grows by `grow` a side
        out = np.lib.stride_tricks.sliding_window_view(out, 2 * grow + 1, axis=axis).max(-1)
    return out


def to_mnist(img):
    """What the models see for a PIL image of one digit: a uint8 numpy array [28, 28], white on black,
    MNIST's normalisation (see above). An image already in MNIST's form is returned unchanged.
    ImageError when there is no ink."""
    from PIL import Image
    same = mnist_form(img)
    if same is not None:
        return same
    ink = ink_of(img)
    rows, cols = np.nonzero(_blur3(ink) > 0.3)   # the blur drops lone noisy pixels from the box
    if rows.size == 0:
        raise ImageError("no ink found: the image is blank or too faint to hold a digit")
    box = _bold(ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1])
    h, w = box.shape
    size = (max(1, round(20 * w / max(h, w))), max(1, round(20 * h / max(h, w))))
    patch = np.clip(np.asarray(Image.fromarray(box).resize(size, Image.LANCZOS)), 0, None)
    patch = np.round(patch * (255 / patch.max()))
    ys, xs = np.indices(patch.shape)
    top, left = (round(14 - float((c * patch).sum() / patch.sum())) for c in (ys, xs))
    out = np.zeros((28, 28), np.uint8)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + patch.shape[0], 28), min(left + patch.shape[1], 28)
    out[y0:y1, x0:x1] = patch[y0 - top:y1 - top, x0 - left:x1 - left]
    return out

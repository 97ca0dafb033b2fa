"""Image decoding: only common formats, the pixel count checked from the header before any pixel is decoded,
the first frame of animations, EXIF orientation applied; truncated or corrupt files are a 400.

Two steps, so that the pixel budget can be taken between them: `open_image` reads and checks the header,
`decode_pixels` (in a thread) decodes."""

from __future__ import annotations

import io

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import MediaError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """The decoded image from encoded bytes: allowed formats only, pixel cap checked before decoding."""
    return decode_pixels(open_image(data, max_pixels))


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """The image with its header read and checked (allowed format, 1 to max_pixels pixels); not decoded yet."""
    if not data:
        raise MediaError("the image is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError as exc:
        raise MediaError("the image is not a png, jpeg, webp, gif or bmp file") from exc
    except Image.DecompressionBombError as exc:
        raise MediaError(f"the image has more than {max_pixels} pixels") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise MediaError("the image file is corrupt") from exc
    width, height = image.size
    if width < 1 or height < 1:
        raise MediaError("the image has no pixels")
    if width * height > max_pixels:
        raise MediaError(f"the image has {width}x{height} pixels, more than the limit of {max_pixels}")
    return image


SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that turn the image by 90 degrees


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as `decode_pixels` will give it, read from the header alone (no pixels decoded)."""
    width, height = image.size
    try:  # the base class reads the header's EXIF; PngImageFile.getexif would decode the pixels to look further
        orientation = Image.Image.getexif(image).get(0x0112)
    except (OSError, SyntaxError, ValueError, EOFError):
        orientation = None
    return (height, width) if orientation in SWAPPING_ORIENTATIONS else (width, height)


def decode_pixels(image: Image.Image) -> Image.Image:
    """The opened image with its first frame decoded and turned upright by its EXIF orientation.

    Its mode stays as decoded (palette, L, LA, RGBA, CMYK...): the processor converts it to RGB the way its
    compat says (transformers composites transparency on white, the original Ovis2 drops it), exactly as it does
    for an image handed to `LLM.chat`; a conversion here would decide that for it."""
    try:
        image.seek(0)  # the first frame of an animation
        ImageOps.exif_transpose(image, in_place=True)  # as displayed (and as transformers' load_image does)
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise MediaError("the image file is corrupt or truncated") from exc
    # a loaded WebP keeps its decoder's canvas and frame (36 MP: 627 MB held, 352 MB for the pixels alone)
    if image.format == "WEBP":
        pixels = image.copy()
        image.close()
        return pixels
    return image

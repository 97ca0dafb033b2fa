"""Media from `image_url` and `video_url` parts, fetched and decoded safely (see "Image inputs, safely" in the reference).

- policy.py: where media may come from (MediaPolicy, address checks, host allow-list, the checked DNS lookup)
- fetch.py:  the bytes behind a data:, http(s):// or file:// URL (redirects, timeouts, byte cap)
- image.py:  image decoding (format allow-list, pixel cap from the header, first frame, EXIF orientation)
- loader.py: ImageLoader ties them to the pixel budget (server/pixel_budget.py), off the event loop
- video.py:  VideoLoader: `video_url` bytes (fetch.py's VIDEO kind), packets and frames in a bounded thread pool
- media_loader.py: a request's images and videos decoded under the pixel budget together
"""

from .errors import MediaError
from .fetch import MediaFetcher, decode_data_url, parse_url, read_local_file
from .image import ALLOWED_FORMATS, decode_image, decode_pixels, open_image
from .loader import DEFAULT_PIXELS_IN_FLIGHT, ImageLoader
from .policy import MediaPolicy, address_problem, host_allowed, resolve_checked

__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_PIXELS_IN_FLIGHT",
    "ImageLoader",
    "MediaError",
    "MediaFetcher",
    "MediaPolicy",
    "address_problem",
    "decode_data_url",
    "decode_image",
    "decode_pixels",
    "host_allowed",
    "open_image",
    "parse_url",
    "read_local_file",
    "resolve_checked",
]

"""ustudents: Uninformed Students anomaly detection for production-line inspection."""
import os
import re
import sys
import warnings

# Before torch is imported (this package's modules import it): PyTorch's CPU allocator backs large
# tensors with transparent huge pages when this is set. The FFT convolutions' intermediates are
# hundreds of MB, and with 4 KiB pages the page faults on every fresh allocation cost as much as the
# arithmetic (engines/fftconv.py). A value the user set wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
# OpenCV decodes images of up to this many pixels (its own default is 2^30): a PNG of a few hundred KB
# can claim gigapixels and take the process down for memory. 2^26 = 67 megapixels holds the largest
# machine-vision sensors (65 MP); a value the user set wins. OpenCV reads it when cv2 is imported, so
# this holds where ustudents is imported first (its commands, the worker); a program that imports cv2
# before ustudents is warned, and its images are decoded under OpenCV's default.
_cv2_first = "cv2" in sys.modules and not os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS")
if not os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", "").strip():  # empty (an unset compose variable): OpenCV
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(1 << 26)  # aborts the process parsing it at import
elif "cv2" not in sys.modules and not re.fullmatch(r"0*[1-9][0-9]{0,18}(KB|Kb|kb|MB|Mb|mb)?",
                                                   os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"]):
    # OpenCV reads digits (into 64 bits) with an optional KB/MB suffix; anything else aborts the process
    # at `import cv2` ("terminate called ... stoull"), naming nothing, whatever was run, --help included
    sys.stderr.write(f"Error: OPENCV_IO_MAX_IMAGE_PIXELS={os.environ['OPENCV_IO_MAX_IMAGE_PIXELS']!r} is not a pixel "
                     f"count: set a whole number above 0 (ustudents' default is {1 << 26}) or unset it\n")
    raise SystemExit(2)
try:  # the limit in force, for messages; a value OpenCV reads its own way (empty, "100MB") is not known here
    OPENCV_MAX_PIXELS: int | None = 1 << 30 if _cv2_first else int(os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"])
except ValueError:
    OPENCV_MAX_PIXELS = None
if _cv2_first:
    warnings.warn("cv2 was imported before ustudents, so OpenCV decodes images of up to 2^30 pixels (its default), "
                  "not ustudents' 2^26: a small PNG claiming gigapixels can exhaust memory. Import ustudents first, "
                  "or set OPENCV_IO_MAX_IMAGE_PIXELS in the environment.", stacklevel=2)
# OpenCV logs its own "[ERROR:0@0.397] ... IHDR chunk shall be first" for every broken image it is
# given; ustudents names each such file itself (what, where, what to do), so only OpenCV's fatal
# messages are let through. A value the user set wins.
os.environ.setdefault("OPENCV_LOG_LEVEL", "FATAL")
# FFmpeg, which reads videos for `publish`, logs through its own channel ("moov atom not found" for a
# file that is no video): fatal messages only (AV_LOG_FATAL), for the same reason.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "8")

__version__ = "0.1.0"

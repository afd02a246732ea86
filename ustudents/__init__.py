"""ustudents: Uninformed Students anomaly detection for production-line inspection."""
import os

# Before torch is imported (this package's modules import it): PyTorch's CPU allocator backs large
# tensors with transparent huge pages when this is set. The FFT convolutions' intermediates are
# hundreds of MB, and with 4 KiB pages the page faults on every fresh allocation cost as much as the
# arithmetic (engines/fftconv.py). A value the user set wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"

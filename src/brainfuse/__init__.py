"""brainfuse: raw DICOM or BIDS to a cross-validated multimodal mixture-of-experts model."""
import os

__version__ = "0.1.0"

# nipype calls home once per process unless told not to (nothing is reachable on clusters or CI).
os.environ.setdefault("NIPYPE_NO_ET", "1")

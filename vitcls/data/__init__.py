"""Input data: example sources (TFDS, image folders), host pp ops and the device pipeline."""

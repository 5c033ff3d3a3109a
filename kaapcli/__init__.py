"""kaapcli: Kaapana's DICOM processing operators as one Unix command-line toolkit."""

__version__ = "0.1.0"

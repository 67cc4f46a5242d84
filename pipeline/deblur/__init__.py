"""deblur: distributed batch image deblurring with MIMO-UNet on Ray."""

__version__ = "0.1.0"

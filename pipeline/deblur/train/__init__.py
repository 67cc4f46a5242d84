"""Training: `deblur train` (Ray Train), the synthetic camera-shake generator, the MIMO-UNet loss.

``blur`` makes blurry images from sharp ones, ``data`` turns a source into (blurry, sharp)
crops, ``loss`` is the authors' multi-scale L1 + FFT loss, ``trainer`` the loop, checkpoints
and the Ray Train driver. Nothing here is imported by the job path.
"""

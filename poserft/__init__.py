"""poserft: Pose-RFT as a reproducible workflow."""
__version__ = "0.1.0"
